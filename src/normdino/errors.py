"""Errors that speak to the user: the CLI prints their message and exits non-zero."""


class NormdinoError(Exception):
    """Base class of every error whose message is meant for the user."""


class InputError(NormdinoError, ValueError):
    """Bad input data: a missing path, an unreadable image, a batch of the wrong shape."""


class ModelFileError(NormdinoError, ValueError):
    """A saved model that is not one, is truncated, or comes from an incompatible version."""


class WeightsNotFoundError(NormdinoError, OSError):
    """Backbone weights that are neither cached locally nor reachable on the hub."""


class OutputError(NormdinoError, OSError):
    """An output that cannot be written: a folder that is a file, a read-only place, a full disk."""


class StopRequested(KeyboardInterrupt):
    """A termination signal (SIGTERM) raised as Ctrl-C's KeyboardInterrupt is, so every ``finally`` runs, half-written
    files are removed and the run is reported as stopped; ``signal_name`` says which signal."""

    def __init__(self, signal_name: str = "SIGTERM"):
        super().__init__(signal_name)
        self.signal_name = signal_name
