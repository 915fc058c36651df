"""The token cache folder: entry keys and shard names, the check that the folder can be written, and the
temporaries of writers (named by host and pid, so that a temporary whose writer is gone can be removed).

:mod:`normdino.features.cache` reads and writes the shards in such a folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Sequence
from pathlib import Path

from normdino.errors import InputError

logger = logging.getLogger(__name__)

CACHE_FORMAT = 2
STALE_SECONDS = 24 * 3600  # a temporary untouched this long is stale even if its writer cannot be checked
TMP_PATTERN = re.compile(r"\.(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)\.[0-9a-f]+(\.old)?\.tmp$")
WRITING: set[str] = set()
"""Names of the temporaries this process is writing now (the shard writer adds and discards them)."""


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, with an InputError naming a file that cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as err:
        raise InputError(f"Image {path} cannot be read ({err.strerror or err}).") from err
    return digest.hexdigest()


def entry_key(identifier: str, file_hash: str, cls: bool) -> str:
    """Hex key of one image's tokens: backbone settings + the file's content hash + whether CLS is stored."""
    payload = json.dumps({"format": CACHE_FORMAT, "backbone": identifier, "image": file_hash, "cls": bool(cls)})
    return hashlib.sha256(payload.encode()).hexdigest()


def shard_name(keys: Sequence[str]) -> str:
    """Folder name of the shard that holds exactly ``keys`` in this order."""
    return "tokens-" + hashlib.sha256("\n".join(keys).encode()).hexdigest()[:40]


def check_cache_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` if needed and make sure files can be written there; one InputError sentence otherwise.

    The CLI calls it before any work, so a wrong ``--cache-dir`` fails in a second rather than after extraction.
    """
    root = Path(path).expanduser()
    if root.exists() and not root.is_dir():
        raise InputError(f"Token cache folder {root} is a file, not a folder; pass a folder to --cache-dir.")
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / temporary_name("probe")
        probe.write_bytes(b"")
        probe.unlink(missing_ok=True)
    except OSError as err:
        raise InputError(
            f"Token cache folder {root} is not writable ({err.strerror or err}); pass a writable --cache-dir "
            "or leave it out."
        ) from None
    return root


def remove_stale_temporaries(root: Path) -> list[Path]:
    """Delete temporaries (``.*.tmp``) in ``root`` whose writer has exited or that are a day old; return them."""
    removed = []
    now = time.time()
    for path in [*root.glob(".*.tmp"), *root.glob("tokens-*/.*.tmp")]:
        if not is_stale(path, now):
            continue
        try:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        except FileNotFoundError:
            continue  # another process removed it first
        except OSError as err:
            logger.warning("Cannot remove the stale temporary %s (%s)", path, err.strerror or err)
            continue
        logger.info("Removed stale temporary %s", path)
        removed.append(path)
    return removed


def writer_tag() -> str:
    """'<host>-<pid>' of this process, embedded in temporary names so that others can tell when it is gone."""
    host = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:64] or "host"
    return f"{host}-{os.getpid()}"


def temporary_name(stem: str, suffix: str = ".tmp") -> str:
    """'.<stem>.<host>-<pid>.<random>.tmp': unique, hidden, and telling which process writes it."""
    return f".{stem}.{writer_tag()}.{secrets.token_hex(4)}{suffix}"


def is_stale(path: Path, now: float) -> bool:
    """True when a temporary's writer (same host, pid in its name) has exited, or it is untouched for a day."""
    try:
        age = now - path.stat().st_mtime
    except FileNotFoundError:
        return False
    if age > STALE_SECONDS:
        return True
    match = TMP_PATTERN.search(path.name)
    host, pid = writer_tag().rsplit("-", 1)
    if match is None or match["host"] != host:
        return False  # not ours to judge before a day has passed
    if match["pid"] == pid:
        return path.name not in WRITING  # our pid, but not one of our writes: a dead process had this pid
    if os.name == "nt":
        return False  # signal 0 cannot probe a process there
    try:
        os.kill(int(match["pid"]), 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, but belongs to another user
        return False
    return False
