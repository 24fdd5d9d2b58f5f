"""`python -m parity`: see parity/cli.py."""

import sys

from .cli import main

sys.exit(main())
