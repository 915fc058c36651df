"""``python -m normdino`` runs the command line; this is also what ``torchrun -m normdino`` starts on every rank."""

import sys

from normdino.cli import main

if __name__ == "__main__":
    sys.exit(main())
