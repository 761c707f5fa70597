"""``python -m xsam.bench [args]``: the same as ``xsam bench [args]``."""
import sys

from . import main

sys.exit(main(sys.argv[1:]))
