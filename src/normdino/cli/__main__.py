"""``python -m normdino.cli`` runs the command line (as ``python -m normdino`` does)."""

import sys

from normdino.cli import main

if __name__ == "__main__":
    sys.exit(main())
