"""The ``normdino`` command line: fit, predict, info, evaluate, bench, demo, serve, reproduce, weights.

One module per command (``normdino.cli.fit`` ...), each with ``add_parser(sub)`` and ``run(args)``: it parses,
calls one library function, and prints. This module assembles the parser and maps errors to exit codes: every
user error ends in one readable line on stderr and exit code 1; usage errors exit with 2. :func:`main` runs a
command line and returns its exit code; :func:`entry`, the ``normdino`` program, also starts and ends the
process quickly.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import errno
import gc
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence

from normdino import __version__
from normdino.cli import bench, demo, evaluate, fit, info, predict, reproduce, serve, weights
from normdino.cli.logs import configure_logging, end_progress_bars
from normdino.errors import NormdinoError, StopRequested
from normdino.torchrun import in_process_group, is_main_rank, join_job

COMMANDS = {"fit": fit, "predict": predict, "info": info, "demo": demo, "evaluate": evaluate, "bench": bench,
            "serve": serve, "reproduce": reproduce, "weights": weights}
"""Command name -> its module (``add_parser``, ``run``), in the order ``normdino --help`` lists them."""
ESTIMATOR_COMMANDS = ("fit", "bench")
"""Commands whose parser gets every method's hyper-parameters (this imports torch, so only when they run)."""


def build_parser(estimator_options: bool = False) -> argparse.ArgumentParser:
    """The parser; ``estimator_options`` adds every method's hyper-parameters to fit and bench (imports torch)."""
    parser = argparse.ArgumentParser(
        prog="normdino",
        description="Anomaly detection and segmentation in medical images with a normative model of DINO patch embeddings.")
    parser.add_argument("--version", action="version", version=f"normdino {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        if name in ESTIMATOR_COMMANDS:
            module.add_parser(sub, estimator_options)
        else:
            module.add_parser(sub)
    return parser


def _join_torchrun_job(args) -> bool:
    """Under torchrun: join the job (normdino.torchrun.join_job); ranks other than 0 stay quiet."""
    joined, args.device = join_job(args.command, getattr(args, "device", None))
    if not is_main_rank():
        args.quiet = True  # progress bars and logs on rank 0 only; errors are agreed and printed there
    return joined


#: errno values that mean "this output cannot be written" (full disk, quota, read-only, permissions).
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO}


def _error(command: str, message: str) -> int:
    end_progress_bars()
    print(f"normdino {command}: error: {message}", file=sys.stderr)
    return 1


def _raise_stop(signum: int, frame: object) -> None:
    raise StopRequested(signal.Signals(signum).name)


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (what ``kill``, systemd and schedulers send) handled like Ctrl-C while a command runs: every
    ``finally`` runs, half-written files are removed and the results say the run stopped. Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _is_short_write(err: OSError) -> bool:
    """numpy's "65536 requested and 23520 written" (no errno): the disk filled up under the write."""
    return err.errno is None and "requested and" in str(err) and "written" in str(err)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The parsed command line ``argv`` (default: sys.argv); usage errors and ``--help`` exit here (SystemExit)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(estimator_options=bool(argv) and argv[0] in ESTIMATOR_COMMANDS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on ``argv`` (default: sys.argv) and return the exit code."""
    return run_command(parse_args(argv))


def entry() -> None:
    """The ``normdino`` program (console script, ``python -m normdino``): :func:`main` in a process of its own.

    Two things only the owner of a whole process may do, which take ~0.45 s off every command (a fifth of a
    2-image predict; at 42 images on 2 cores, 3 % of the model's own time):

    - torch is imported with Python's cycle collector paused, and what the import made is frozen
      (``gc.freeze``): its ~250 000 objects live as long as the process, so the three full passes the import
      would trigger, and every later pass over them, are wasted work (~0.12 s);
    - the process ends as Python's exit does (threads joined, exit handlers run, outputs flushed) but without
      the teardown that then frees those objects one by one (~0.3 s): every file is closed and renamed by
      then. An uncaught error (main() does not return) gets Python's whole exit, traceback and all.
    """
    gc.disable()
    try:
        args = parse_args()  # usage errors and --help end here, without torch
        import torch  # noqa: F401  (every command uses it)
        gc.freeze()
    finally:
        gc.enable()
    code = run_command(args)
    _exit_without_teardown(code)
    sys.exit(code)


def _exit_without_teardown(code: int) -> None:
    """Python's own exit up to its teardown, then the end of the process with ``code`` (see :func:`entry`):
    threads joined (idle worker pools stopped first), exit handlers run, logs and outputs flushed. Returns, for
    Python's whole exit, where it cannot: not CPython, not the main thread, or an output that cannot be flushed."""
    join_threads = getattr(threading, "_shutdown", None)  # CPython's first two steps of an exit
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)
    if join_threads is None or run_exit_handlers is None or threading.current_thread() is not threading.main_thread():
        return
    try:
        join_threads()
        run_exit_handlers()  # those of multiprocessing, tempfile, a coverage run...
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        return
    os._exit(code)


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed command line ``args`` and return the exit code (every user error: 1 and one line)."""
    try:
        joined = _join_torchrun_job(args)
    except NormdinoError as err:
        return _error(args.command, str(err))
    configure_logging(getattr(args, "quiet", False), getattr(args, "verbose", False))
    handler = COMMANDS[args.command].run
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(_sigterm_as_interrupt())
        if in_process_group():  # an error on any rank ends every rank with the same message
            with sys.modules["normdino.distributed"].failing_together(args.command):
                code = handler(args)
        else:
            code = handler(args)
        sys.stdout.flush()  # a closed pipe (| head) shows up here, not in an interpreter-exit traceback
        return code
    except NormdinoError as err:
        if not is_main_rank() and type(err).__name__ in ("DistributedError", "PeerFailedError"):
            return 1  # every rank has this message; rank 0 prints it
        return _error(args.command, str(err))
    except BrokenPipeError:  # the reader went away (| head): stop quietly, as a SIGPIPE would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except MemoryError:
        return _error(args.command, "ran out of memory; use smaller inputs, a smaller --batch-size or a machine "
                                    "with more memory")
    except OSError as err:
        if err.errno not in _WRITE_ERRNOS and not _is_short_write(err):
            raise
        from normdino.files import describe_write_error

        verb = "access" if err.errno in (errno.EACCES, errno.EPERM, errno.EIO) else "write"
        where = os.path.dirname(os.path.abspath(err.filename)) if err.filename else os.getcwd()
        return _error(args.command, f"cannot {verb} {err.filename or 'a file'}: {describe_write_error(err, where)}")
    except StopRequested as err:
        end_progress_bars()
        print(f"normdino: stopped by {err.signal_name}", file=sys.stderr)
        return 128 + int(getattr(signal, err.signal_name, signal.SIGTERM))
    except KeyboardInterrupt:
        end_progress_bars()
        print("normdino: interrupted", file=sys.stderr)
        return 130
    finally:
        stack.close()
        if joined:
            sys.modules["normdino.distributed"].shutdown()
