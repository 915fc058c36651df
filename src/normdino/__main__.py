"""``python -m normdino`` runs the command line; this is also what ``torchrun -m normdino`` starts on every rank."""

from normdino.cli import entry

if __name__ == "__main__":
    entry()
