"""How the command line talks: log lines that do not break progress bars, -q / -v levels, and closing
every open bar before an error is printed."""

from __future__ import annotations

import logging
import sys


class ProgressAwareHandler(logging.StreamHandler):
    """Prints log lines through ``tqdm.write``, which lifts any progress bar off the line first."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def configure_logging(quiet: bool, verbose: bool) -> None:
    """INFO to stderr; ``-q``: errors only (no warnings, no progress bars of the libraries); ``-v``: debug."""
    import os
    import warnings

    level = logging.ERROR if quiet else logging.DEBUG if verbose else logging.INFO
    handler = ProgressAwareHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s" if not verbose else "%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.ERROR if quiet else logging.WARNING)
    logging.getLogger("normdino").setLevel(level)
    warnings.showwarning = warning_as_log_line
    if quiet:
        warnings.filterwarnings("ignore")
        for library in ("transformers", "huggingface_hub", "torch"):
            logging.getLogger(library).setLevel(logging.ERROR)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        if "transformers" in sys.modules:  # already imported (a caller of main): switch its bars off directly
            sys.modules["transformers"].utils.logging.disable_progress_bar()


def warning_as_log_line(message, category, filename, lineno, file=None, line=None) -> None:
    """A Python warning (a metric undefined on these labels, a library's notice) as one line of the log: its
    message, without the file:line and source line Python prints, which mean nothing to a user."""
    logging.getLogger("normdino").warning("%s", str(message).removesuffix("; returning NaN."))


def end_progress_bars() -> None:
    """Close every open progress bar, so that a message printed next starts on a line of its own and no bar is
    redrawn after it."""
    std = sys.modules.get("tqdm.std")
    for bar in list(getattr(getattr(std, "tqdm", None), "_instances", ())):
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - a bar that cannot close must not hide the error being reported
            pass
