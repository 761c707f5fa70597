"""Benchmark harness (shipped as ``xsam.bench``)."""


def main(argv=None) -> int:
    raise SystemExit("xsam bench is not implemented yet")
