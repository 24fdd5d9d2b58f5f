"""`python -m parity`: see parity/cli/__init__.py."""

import sys

from .cli import main

try:
    sys.exit(main())
except KeyboardInterrupt:  # Ctrl-C: a one-line message, not a traceback
    print("python -m parity: interrupted", file=sys.stderr)
    sys.exit(130)
