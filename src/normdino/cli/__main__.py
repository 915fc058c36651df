"""``python -m normdino.cli`` runs the command line (as ``python -m normdino`` does)."""

from normdino.cli import entry

if __name__ == "__main__":
    entry()
