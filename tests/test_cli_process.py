"""The ``normdino`` program as a process (normdino.cli.entry): the quick exit loses no output, runs every exit
handler and keeps the exit code; torch is imported, frozen, before a command runs."""

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from normdino import cli

SRC = Path(cli.__file__).resolve().parents[2]

# A command stands in for the real ones: it prints more than a pipe holds, logs to a file, registers an exit
# handler and reports what the process looked like when it ran.
SCRIPT = r"""
import atexit, gc, logging, sys, threading
from pathlib import Path
from normdino import cli

out = Path(sys.argv[1])

def command(args):
    log = logging.getLogger("probe")
    log.addHandler(logging.FileHandler(out / "log.txt"))
    log.warning("logged")
    atexit.register(lambda: (out / "atexit.txt").write_text("ran"))
    # A worker still waiting when the command returns, released by Python's exit (as idle pool workers are):
    # it finishes only if the exit joins the threads first.
    release = threading.Event()
    threading._register_atexit(release.set)
    worker = threading.Thread(target=lambda: (release.wait(), (out / "late.txt").write_text("done")))
    worker.start()
    sys.stdout.write("x" * 300_000)
    state = dict(gc_enabled=gc.isenabled(), frozen=gc.get_freeze_count(), torch="torch" in sys.modules)
    (out / "state.txt").write_text(repr(state))
    return 3

cli.run_command = command
sys.argv = ["normdino", *sys.argv[2:]]
cli.entry()
"""


def _run(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(SRC), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), *argv], capture_output=True, env=env,
                          timeout=120)


def test_the_quick_exit_keeps_the_code_the_output_the_logs_the_threads_and_the_exit_handlers(tmp_path):
    done = _run(tmp_path, "weights", "list")
    assert done.returncode == 3
    assert done.stdout == b"x" * 300_000
    assert (tmp_path / "log.txt").read_text() == "logged\n"
    assert (tmp_path / "atexit.txt").read_text() == "ran"
    assert (tmp_path / "late.txt").read_text() == "done"


def test_a_command_starts_with_torch_imported_and_frozen(tmp_path):
    done = _run(tmp_path, "info", "model.normdino")
    assert done.returncode == 3, done.stderr
    state = eval((tmp_path / "state.txt").read_text())
    assert state["torch"] and state["gc_enabled"]
    assert state["frozen"] > 100_000  # torch's modules, out of every later collection


def test_usage_errors_exit_as_argparse_says_with_the_collector_back_on(tmp_path):
    done = _run(tmp_path, "predict")
    assert done.returncode == 2
    assert b"the following arguments are required" in done.stderr


def test_the_real_program_predicts_and_exits_0_with_the_files_of_an_in_process_run(tmp_path, tiny_dinov2_dir):
    """``python -m normdino predict`` (the quick exit) writes what ``main()`` writes in a process that lives on:
    the same scores.csv and, for every image, the same map bytes; no file is lost at the exit."""
    import numpy as np
    from PIL import Image

    from normdino import AnomalyDetector

    rng = np.random.default_rng(3)
    images = [(rng.random((48, 48)) * 255).astype(np.uint8) for _ in range(11)]
    model = AnomalyDetector(backbone=str(tiny_dinov2_dir), image_size=56, n_components=4, epochs=1,
                            progress=False).fit(images[:5], images[5:8]).save(tmp_path / "m.normdino")
    inputs = []
    for i, image in enumerate(images[8:]):
        inputs.append(str(tmp_path / f"scan_{i}.png"))
        Image.fromarray(image).save(inputs[-1])
    env = dict(os.environ, PYTHONPATH=str(SRC), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "normdino", "predict", str(model), *inputs, "-o",
                           str(tmp_path / "process"), "-q"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert cli.main(["predict", str(model), *inputs, "-o", str(tmp_path / "in-process"), "-q"]) == 0

    written = sorted(p.name for p in (tmp_path / "in-process").iterdir())
    assert sorted(p.name for p in (tmp_path / "process").iterdir()) == written
    assert len([name for name in written if name.endswith("_anomaly.npy")]) == 3
    csv = (tmp_path / "process" / "scores.csv").read_text()
    assert csv == (tmp_path / "in-process" / "scores.csv").read_text() and csv.count("\n") == 4
    for name in written:
        if name.endswith((".npy", ".png")):
            assert (tmp_path / "process" / name).read_bytes() == (tmp_path / "in-process" / name).read_bytes(), name


@pytest.fixture
def exits(monkeypatch):
    """Python's exit steps and os._exit recorded instead of run (this is pytest's process)."""
    calls = []
    monkeypatch.setattr(cli.threading, "_shutdown", lambda: calls.append("threads joined"))
    monkeypatch.setattr(cli.atexit, "_run_exitfuncs", lambda: calls.append("handlers run"))
    monkeypatch.setattr(cli.os, "_exit", lambda code: calls.append(f"exit {code}"))
    return calls


def test_the_process_ends_after_the_threads_and_the_exit_handlers(exits):
    cli._exit_without_teardown(5)
    assert exits == ["threads joined", "handlers run", "exit 5"]


def test_only_the_main_thread_ends_the_process(exits):
    worker = threading.Thread(target=cli._exit_without_teardown, args=(0,))
    worker.start()
    worker.join()
    assert exits == []


def test_an_output_that_cannot_be_flushed_gets_pythons_own_exit(exits, monkeypatch):
    class Closed:
        def flush(self):
            raise ValueError("I/O operation on closed file")

    monkeypatch.setattr(cli.sys, "stdout", Closed())
    cli._exit_without_teardown(0)
    assert exits == ["threads joined", "handlers run"]
