"""python -m loadtest.ruler: see cli.py (its docstring is the --help)."""

import sys

from .cli import main

sys.exit(main())
