"""Where uploads and results live (one temporary folder per server), how long, and the viewer's arrays.

Uploads sit in ``<root>/uploads/<random>/`` only while their request runs. Results sit in
``<root>/results/<random id>/`` and are removed after ``ttl_s`` seconds, on DELETE, or when the server stops.
"""

from __future__ import annotations

import logging
import re
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from normdino.io import rendering

log = logging.getLogger(__name__)

_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class _Entry:
    folder: Path
    created: float
    files: frozenset[str] = field(default_factory=frozenset)
    size: int = 0


ROOT_PREFIX = "normdino-serve-"
_LOCK = ".lock"


class ResultStore:
    """Temporary folders for uploads and results under one root, with result expiry (thread-safe).

    Results expire ``ttl_s`` seconds after they are published, and take at most ``max_bytes`` in all: past
    it, the oldest are removed first. A server's root holds a lock for the server's life; at start, the roots
    that servers killed without cleaning up left behind in the same temporary folder (their lock is free) are
    removed.
    """

    def __init__(self, ttl_s: float, root: Path | None = None, clock: Callable[[], float] = time.monotonic,
                 max_bytes: int | None = None):
        if root is None:
            removed = remove_stale_roots(Path(tempfile.gettempdir()))
            if removed:
                log.info("removed %d results folder(s) left by servers that were stopped without cleaning up",
                         removed)
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix=ROOT_PREFIX))
        self.ttl_s = float(ttl_s)
        self.max_bytes = max_bytes
        self.clock = clock
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        (self.root / "uploads").mkdir(parents=True, exist_ok=True)
        self._root_lock = _hold_lock(self.root / _LOCK)
        (self.root / "results").mkdir(exist_ok=True)

    def upload_folder(self) -> Path:
        """A fresh folder for one request's upload; the caller removes it with :meth:`discard`."""
        folder = self.root / "uploads" / secrets.token_hex(16)
        folder.mkdir()
        return folder

    def new_result(self) -> tuple[str, Path]:
        """A fresh result id and its folder; nothing in it is served until :meth:`publish`."""
        result_id = secrets.token_hex(16)
        folder = self.root / "results" / result_id
        folder.mkdir()
        with self._lock:
            self._entries[result_id] = _Entry(folder, self.clock())
        return result_id, folder

    def publish(self, result_id: str, names: set[str] | frozenset[str]) -> None:
        """Make these files of a result downloadable; its lifetime starts now. Past the size cap, the oldest
        other results are removed first."""
        size = sum(p.stat().st_size for p in self._entries[result_id].folder.iterdir() if p.is_file())
        evicted = []
        with self._lock:
            entry = self._entries[result_id]
            entry.files = frozenset(names)
            entry.created = self.clock()
            entry.size = size
            if self.max_bytes is not None:
                total = sum(e.size for e in self._entries.values())
                for key in sorted((k for k, e in self._entries.items() if e.files and k != result_id),
                                  key=lambda k: self._entries[k].created):
                    if total <= self.max_bytes:
                        break
                    total -= self._entries[key].size
                    evicted.append(self._entries.pop(key))
        for old in evicted:
            discard(old.folder)
        if evicted:
            log.info("results over the size cap: the %d oldest removed", len(evicted))

    def total_bytes(self) -> int:
        """Bytes the published results take."""
        with self._lock:
            return sum(e.size for e in self._entries.values())

    def file(self, result_id: str, name: str) -> Path | None:
        """The path of a published, unexpired result file, or None (unknown id or name, expired, removed)."""
        if not _ID.match(result_id):
            return None
        self.sweep()
        with self._lock:
            entry = self._entries.get(result_id)
            if entry is None or name not in entry.files:
                return None
            return entry.folder / name

    def remove(self, result_id: str) -> bool:
        """Delete a result now; False if there is none."""
        with self._lock:
            entry = self._entries.pop(result_id, None) if _ID.match(result_id) else None
        if entry is None:
            return False
        discard(entry.folder)
        return True

    def sweep(self) -> int:
        """Delete results older than the lifetime; returns how many."""
        now = self.clock()
        with self._lock:
            expired = [k for k, e in self._entries.items() if now - e.created > self.ttl_s]
            entries = [self._entries.pop(k) for k in expired]
        for entry in entries:
            discard(entry.folder)
        return len(entries)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def close(self) -> None:
        """Delete everything: every result and upload, and the root folder."""
        with self._lock:
            self._entries.clear()
        discard(self.root)
        if self._root_lock is not None:
            self._root_lock.close()
            self._root_lock = None


def _hold_lock(path: Path) -> Any:
    """An open file holding an exclusive lock on ``path`` while the store lives (None where locks are missing)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no stale-folder detection
        return None
    # Locked under a private name, then renamed: another server's start-up sweep never sees it unlocked.
    private = path.with_name(f"{path.name}.{secrets.token_hex(8)}")
    handle = open(private, "w")
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    private.rename(path)
    return handle


def remove_stale_roots(folder: Path) -> int:
    """Remove the store roots in ``folder`` whose server is gone (their lock file is free); returns how many.

    A root without a lock file (one being created, or left by a version without locks) is left alone.
    """
    try:
        import fcntl
    except ImportError:
        return 0
    removed = 0
    for root in folder.glob(ROOT_PREFIX + "*"):
        if not root.is_dir() or root.is_symlink():
            continue
        lock = root / _LOCK
        try:
            with open(lock, "r") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises while a live server holds it
                discard(root)
        except OSError:  # no lock file, held by a live server, or not ours to open
            continue
        removed += 1
    return removed


def discard(folder: Path) -> None:
    """Remove a folder and everything in it; a folder already gone is fine."""
    shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------------------------------- viewer arrays


def quantize_map(pixel_map: np.ndarray, low: float, high: float) -> np.ndarray:
    """uint16 values of a score map on [low, high]: the 16-bit PNG's that predict writes (the same function)."""
    return rendering.scaled_levels(pixel_map, low, high, rendering.PNG16_MAX, np.uint16)


def display_image(image: np.ndarray) -> np.ndarray:
    """uint8 picture of a model input: values in [0, 1] kept as they are, anything else min-max scaled."""
    a = np.nan_to_num(np.asarray(image, dtype=np.float32))
    low, high = float(a.min(initial=0.0)), float(a.max(initial=0.0))
    if low < 0.0 or high > 1.0:
        a = (a - low) / (high - low) if high > low else np.zeros_like(a)
    return np.rint(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)


# Screen directions (down, right) in RAS+ world axes with their sign: radiological convention, the patient's
# right on the screen's left; axial: anterior up; coronal and sagittal: superior up; sagittal: anterior left.
_SCREEN = {"axial": ((1, -1), (0, -1)), "coronal": ((2, -1), (0, -1)), "sagittal": ((2, -1), (1, -1))}
_LETTERS = (("L", "R"), ("P", "A"), ("I", "S"))  # (negative, positive) end of each RAS axis


@dataclass(frozen=True)
class Orientation:
    """How a slice (rows, columns = the two other array axes in order) is turned for display, and its labels."""

    transpose: bool = False
    flip_rows: bool = False
    flip_cols: bool = False
    plane: str = ""
    labels: tuple[str, str, str, str] = ("", "", "", "")  # top, bottom, left, right
    pixel_aspect: float = 1.0  # displayed pixel height / width

    def apply(self, plane: np.ndarray) -> np.ndarray:
        a = np.swapaxes(plane, 0, 1) if self.transpose else plane
        if self.flip_rows:
            a = a[::-1]
        if self.flip_cols:
            a = a[:, ::-1]
        return np.ascontiguousarray(a)


def slice_orientation(affine: np.ndarray, axis: int) -> Orientation:
    """Turn slices along array ``axis`` of a volume with this RAS affine so they show as radiologists read them.

    An exactly-identity affine is what converters write when they know no geometry (no scanner gives one):
    such slices are shown as stored, without orientation letters, rather than turned on a guess.
    """
    affine = np.asarray(affine, dtype=np.float64)
    if np.array_equal(affine, np.eye(4)):
        return Orientation()
    axes = [a for a in range(3) if a != axis]
    dirs = [affine[:3, a] for a in axes]
    plane = ("sagittal", "coronal", "axial")[int(np.argmax(np.abs(affine[:3, axis])))]
    (down, down_sign), (right, right_sign) = _SCREEN[plane]
    keep = abs(dirs[0][down]) + abs(dirs[1][right])
    swap = abs(dirs[1][down]) + abs(dirs[0][right])
    transpose = swap > keep
    row_dir, col_dir = (dirs[1], dirs[0]) if transpose else (dirs[0], dirs[1])
    flip_rows = np.sign(row_dir[down]) != down_sign
    flip_cols = np.sign(col_dir[right]) != right_sign

    def letter(world_axis: int, sign: int) -> str:
        return _LETTERS[world_axis][1 if sign > 0 else 0]

    labels = (letter(down, -down_sign), letter(down, down_sign), letter(right, -right_sign), letter(right, right_sign))
    row_mm, col_mm = float(np.linalg.norm(row_dir)), float(np.linalg.norm(col_dir))
    aspect = row_mm / col_mm if row_mm > 0 and col_mm > 0 else 1.0
    return Orientation(bool(transpose), bool(flip_rows), bool(flip_cols), plane, labels, aspect)


class ViewerArrays:
    """The viewer's data for one result: per shown slice, an 8-bit picture and the 16-bit map, appended in order.

    Files: ``view_images.u8`` (n, H, W, C) and ``view_maps.u16`` (n, H, W) little-endian, raw, C order.
    """

    IMAGES, MAPS = "view_images.u8", "view_maps.u16"

    def __init__(self, folder: Path, map_range: tuple[float, float], orientation: Orientation = Orientation()):
        self.folder = Path(folder)
        self.map_range = (float(map_range[0]), float(map_range[1]))
        self.orientation = orientation
        self.indices: list[int] = []
        self.scores: list[float] = []
        self.shape: tuple[int, int, int] | None = None
        self._images = open(self.folder / self.IMAGES, "wb")
        self._maps = open(self.folder / self.MAPS, "wb")

    def add(self, index: int, image: np.ndarray, pixel_map: np.ndarray, score: float) -> None:
        picture = self.orientation.apply(display_image(image))
        values = self.orientation.apply(quantize_map(pixel_map, *self.map_range))
        if picture.ndim == 2:
            picture = picture[:, :, None]
        if self.shape is None:
            self.shape = picture.shape
        self._images.write(picture.tobytes())
        self._maps.write(values.astype("<u2").tobytes())
        self.indices.append(int(index))
        self.scores.append(float(score))

    def close(self) -> None:
        self._images.close()
        self._maps.close()

    def describe(self) -> dict:
        height, width, channels = self.shape or (0, 0, 1)
        o = self.orientation
        return {"n": len(self.indices), "height": height, "width": width, "channels": channels,
                "slice_indices": self.indices, "slice_scores": self.scores,
                "map_range": list(self.map_range), "plane": o.plane, "pixel_aspect": o.pixel_aspect,
                "labels": dict(zip(("top", "bottom", "left", "right"), o.labels))}
