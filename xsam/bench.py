"""Benchmark harness: ``xsam bench`` (or ``python -m xsam.bench``). The sources are the repository's ``bench/``
folder (``xsam/_source_folders.py`` says why)."""
import sys

from xsam._source_folders import source_folder

__path__ = source_folder("bench")

from xsam.bench.harness import CSV_NAME, PLOT_NAME, TABLE_NAME, build_parser, main  # noqa: E402

__all__ = ["CSV_NAME", "PLOT_NAME", "TABLE_NAME", "build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
