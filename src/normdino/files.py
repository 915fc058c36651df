"""Atomic file writing: a file appears complete under its final name or not at all."""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
import threading
from pathlib import Path
from typing import BinaryIO, Iterator


def default_cache_dir() -> Path:
    """The token cache folder used unless told otherwise: $NORMDINO_CACHE_DIR, else ~/.cache/normdino/tokens."""
    return Path(os.environ.get("NORMDINO_CACHE_DIR") or Path.home() / ".cache" / "normdino" / "tokens")


_UMASK_LOCK = threading.Lock()


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    """The process's umask, read once: reading it means setting it, which must never race with another thread."""
    with _UMASK_LOCK:
        mask = os.umask(0)
        os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():  # mkstemp makes 0600 files: give the result the usual permissions
            os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Yield a temporary file beside ``path``, open for binary writing; it becomes ``path`` only if the block
    succeeds. ``atomic_path`` without reopening the file or looking it up again: fewer system calls for the
    many small files of a prediction."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            if hasattr(os, "fchmod"):  # mkstemp makes 0600 files: give the result the usual permissions
                os.fchmod(f.fileno(), 0o666 & ~_umask())
        if not hasattr(os, "fchmod"):
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def describe_write_error(err: OSError, folder: str | os.PathLike) -> str:
    """Why a write failed, for a sentence: a full disk is named as such (ENOSPC, a quota, or a write that stopped
    short, as numpy reports one: "65536 requested and 23520 written", with no errno)."""
    import errno

    text = err.strerror or str(err)
    short = err.errno is None and "requested and" in text and "written" in text
    if err.errno in (errno.ENOSPC, errno.EDQUOT) or short:
        return f"the disk holding {folder} is full ({text})"
    return text


def read_safetensors(path: str | os.PathLike, what: str) -> tuple[dict[str, str], dict]:
    """Metadata and tensors of a safetensors file; one ModelFileError saying it is not ``what`` if unreadable."""
    from safetensors import safe_open

    from normdino.errors import ModelFileError

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}, {key: f.get_tensor(key) for key in f.keys()}
    except Exception:  # safetensors raises its own error types for truncated or foreign files (never quoted)
        raise ModelFileError(f"{path} is not {what}, or it is truncated or corrupt") from None


def _nearest_existing(path: Path) -> Path:
    """``path`` itself or its closest ancestor that exists."""
    path = Path(os.path.abspath(path))
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def _probe_folder(folder: Path, target: Path, what: str) -> None:
    """Create and remove a temporary file in ``folder``: the one reliable test that ``target`` can be written."""
    from normdino.errors import OutputError

    try:
        fd, probe = tempfile.mkstemp(prefix=".normdino-probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputError(f"cannot write the {what} {target}: {folder} is not writable ({err.strerror})") from None


def check_writable_folder(path: str | os.PathLike, what: str = "output folder") -> None:
    """An OutputError sentence unless ``path`` is, or can be created as, a folder that accepts files; creates nothing."""
    from normdino.errors import OutputError

    target = Path(path)
    existing = _nearest_existing(target)
    if existing.is_file() or (os.path.lexists(existing) and not existing.is_dir()):
        where = "is a file" if existing == Path(os.path.abspath(target)) else f"lies under the file {existing}"
        raise OutputError(f"cannot use {target} as the {what}: it {where}")
    _probe_folder(existing, target, what)


def check_writable_file(path: str | os.PathLike, what: str = "output file") -> None:
    """An OutputError sentence unless a file can be written (atomically) at ``path``; creates nothing."""
    from normdino.errors import OutputError

    target = Path(path)
    if target.is_dir():
        raise OutputError(f"cannot write the {what} {target}: it is a folder; give a file name inside it, "
                          f"e.g. {target / 'model.normdino'}")
    if os.path.lexists(target) and not target.is_file():
        raise OutputError(f"cannot write the {what} {target}: it exists and is not a regular file")
    existing = _nearest_existing(target.parent)
    if not existing.is_dir():
        raise OutputError(f"cannot write the {what} {target}: it lies under {existing}, which is not a folder")
    _probe_folder(existing, target, what)


_SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
                       "I8": "i1", "U8": "u1", "BOOL": "?"}


def read_safetensors_layout(path: str | os.PathLike) -> tuple[dict, int]:
    """The JSON header of a safetensors file (tensor dtypes, shapes, offsets; ``__metadata__``) and where data starts.

    Reads only the header (8-byte little-endian length + JSON), without torch; ValueError if it is not one.
    """
    import json
    import struct

    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > 100 * 2**20:
            raise ValueError("header too large")
        layout = json.loads(handle.read(length))
    if not isinstance(layout, dict):
        raise ValueError("header is not an object")
    return layout, 8 + length


def read_safetensors_arrays(path: str | os.PathLike, names: list[str]) -> dict:
    """Named tensors of a safetensors file as numpy arrays, read without torch; ValueError if one is missing or bad."""
    import numpy as np

    layout, start = read_safetensors_layout(path)
    arrays = {}
    with open(path, "rb") as handle:
        for name in names:
            entry = layout[name]
            begin, end = (int(v) for v in entry["data_offsets"])
            dtype = np.dtype(_SAFETENSORS_DTYPES[entry["dtype"]])
            handle.seek(start + begin)
            data = handle.read(end - begin)
            arrays[name] = np.frombuffer(data, dtype=dtype).reshape(entry["shape"]).copy()
    return arrays
