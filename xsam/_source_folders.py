"""Where the subpackages kept at the top of the repository (``kernels/``, ``bench/``) live.

Those folders have no ``__init__.py``: a checkout on ``sys.path`` (``python -m pytest`` or any
script run from its root puts it first) would otherwise shadow the PyPI packages ``kernels``
(imported by transformers) and ``bench``. ``xsam/kernels.py`` and ``xsam/bench.py`` are their
packages instead (a module with a ``__path__`` is a package): a wheel holds the sources beside
them (``xsam/kernels/``), an editable install or a checkout at the top of the repository.
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
