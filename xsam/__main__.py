"""``python -m xsam ...`` is the ``xsam`` command line."""
import sys

from .cli import main

sys.exit(main())
