"""``python -m qklib``: the command line of :mod:`qklib.cli`."""

import sys

from .cli import main

sys.exit(main())
