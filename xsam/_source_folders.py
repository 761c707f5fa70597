"""Where the subpackages kept at the top of the repository (``kernels/``, ``bench/``) live.

Those folders have no ``__init__.py``, so that a checkout first on ``sys.path`` does not shadow the PyPI
packages ``kernels`` (imported by transformers) and ``bench``. ``xsam/kernels.py`` and ``xsam/bench.py`` (modules
with a ``__path__``) are their packages: a wheel holds the sources beside them, a checkout at its top.
"""
import os

_HERE = os.path.dirname(os.path.abspath(__file__))


def source_folder(name: str) -> list[str]:
    """The ``__path__`` of the subpackage whose sources are the folder ``name``."""
    for candidate in (os.path.join(_HERE, name), os.path.join(os.path.dirname(_HERE), name)):
        if os.path.isdir(candidate):
            return [candidate]
    raise ImportError(f"xsam.{name}: its sources are neither in {os.path.join(_HERE, name)} (an installed wheel) "
                      f"nor at the top of the repository (an editable install); reinstall xsam")
