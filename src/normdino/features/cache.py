"""Token store: each image's tokens are computed once per backbone setting and reused by any later command.

Layout of a cache folder (format 2)::

    tokens-<40 hex>/            a shard: the tokens of one requested image list, in its order
        patches.npy             (N, L, h, w, D) float16
        cls.npy                 (N, L, D) float16, when CLS tokens are stored
        index.json              backbone identifier; per image its entry key, the SHA-256 of the file,
                                the path it had, and the CRC-32 of its token bytes
    .tokens-<40 hex>.<host>-<pid>.<random>.tmp/    a shard being written

An image's entry key is SHA-256(format, ``backbone.identifier``, SHA-256 of the file's bytes, CLS stored), so
renaming a file keeps its tokens and any change of content, weights or setting misses (a request without CLS
also takes entries stored with CLS). A list that matches
a shard (same entries, same order) is served as read-only memory maps of that shard, without a copy. Any
other list gets a new shard: rows found in any shard are copied (one extra copy, read and written row by row
with ordinary file I/O, so resident memory stays small), missing rows are computed in batches. The
1338-image lgg-flair training set (1 GB at L=1) is thus one shard, assembled with at most one copy.

Fault tolerance: shards are written with ordinary writes (never a memory map, whose writes on a full disk
kill the process with SIGBUS) after a free-space check, and ENOSPC becomes one InputError sentence; a shard
appears by renaming its folder, so a killed writer leaves only a ``.tmp`` folder, removed on next use once
its process is gone (or after a day). Each row's CRC-32 is checked whenever it is copied, and a shard served
whole is checked whenever its files' size, mtime, ctime or inode differ from when it was last verified (any
write changes ctime, even at the same size with mtime put back; a moved cache is checked once), so an altered
file is recomputed with a warning while an untouched one costs one stat. Old shards are never deleted:
delete the folder to reclaim space.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import logging
import os
import shutil
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from normdino.errors import InputError
from normdino.features.cache_folder import (CACHE_FORMAT, WRITING, check_cache_dir, entry_key, file_sha256,
                                           remove_stale_temporaries, shard_name, temporary_name)
from normdino.features.tokens import TokenSet
from normdino.files import atomic_write_text
from normdino.io.reading import image_shape
from normdino.parallel import default_workers, ordered_map

logger = logging.getLogger(__name__)

_FULL_DISK = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


# ---------------------------------------------------------------------- public API
def extract_tokens(
    backbone,
    images: Sequence[Path],
    cache_dir: Path | None = None,
    batch_size: int = 8,
    progress: bool = True,
    cls: bool = False,
    workers: int | None = None,
) -> TokenSet:
    """Float16 tokens of image files: patches (N, L, h, w, D) over ``backbone.layers``, CLS (N, L, D) with ``cls``.

    Without ``cache_dir`` they are computed into memory; with it each image's tokens are read from the store
    when any earlier call computed them (read-only memory maps when the list matches a shard as a whole).
    """
    paths = [Path(p) for p in images]
    if not paths:
        raise InputError("No images were given to extract tokens from.")
    if int(batch_size) < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}.")
    shapes = [image_shape(p) for p in paths]  # fails on a missing or broken file before any work
    sources = [str(p) for p in paths]
    if cache_dir is None:
        patches, cls_tokens = _allocate(backbone, len(paths), cls)
        encoded = backbone.iter_encoded(paths, batch_size=batch_size, progress=progress, workers=workers,
                                        dtype=torch.float16)
        for start, out in encoded:
            patches[start : start + len(out.patch_tokens)] = out.patch_tokens.numpy()
            if cls_tokens is not None:
                cls_tokens[start : start + len(out.cls_tokens)] = out.cls_tokens.numpy()
        return TokenSet(patches, shapes, cls_tokens, sources)

    root = check_cache_dir(cache_dir)
    remove_stale_temporaries(root)
    identifier = backbone.identifier
    hashes = [file_sha256(p) for p in paths]
    wanted = [entry_key(identifier, h, cls) for h in hashes]
    candidates = [wanted] if cls else [wanted, [entry_key(identifier, h, True) for h in hashes]]
    corrupt: set[str] = set()
    for keys in candidates:  # the whole list in one shard: no copy
        shard = _Shard.open(root / shard_name(keys))
        if shard is None or shard.keys != keys:
            continue
        if shard.unchanged():
            logger.info("Reusing cached tokens %s", shard.folder)
            return shard.token_set(shapes, sources, cls)
        bad = shard.corrupt_rows()
        if not bad:
            logger.info("Reusing cached tokens %s (checksums verified: its files changed on disk)", shard.folder)
            shard.record_stats()
            return shard.token_set(shapes, sources, cls)
        logger.warning(
            "Cached tokens of %d image(s) in %s fail their checksum (e.g. %s); recomputing them",
            len(bad), shard.folder, shard.sources[bad[0]],
        )
        corrupt.add(shard.folder.name)
    shard = _assemble(backbone, root, identifier, paths, hashes, cls, batch_size, progress, workers, corrupt)
    return shard.token_set(shapes, sources, cls)


def embed_arrays(
    backbone,
    arrays: Iterable[np.ndarray],
    batch_size: int = 8,
    cls: bool = False,
    progress: bool = True,
    sources: Sequence[str] | None = None,
) -> TokenSet:
    """Float16 tokens of image arrays ((H, W) or (H, W, 3), uint8 or floats in [0, 1]), streamed batch by batch.

    At most three batches of images are held at a time (one in the model, two read ahead by threads); the
    tokens go into memory (preallocated when ``arrays`` has a length, else gathered and joined once). ``sources`` names each image (default: its position).
    """
    if int(batch_size) < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}.")
    total = len(arrays) if hasattr(arrays, "__len__") else None
    patches, cls_tokens = _allocate(backbone, total, cls) if total is not None else (None, None)
    patch_parts: list[np.ndarray] = []
    cls_parts: list[np.ndarray] = []
    shapes: list[tuple[int, int]] = []
    # threads preprocess the next images while the model runs (the stream itself is read in this thread)
    prepared = ordered_map(lambda a: (a.shape[:2], backbone.preprocess(a)), arrays,
                           default_workers(getattr(backbone, "device", "cpu")), ahead=2 * int(batch_size))
    with tqdm(total=total, unit="img", desc="DINO tokens", disable=not progress) as bar:
        for batch in _batched(prepared, int(batch_size)):
            out = backbone.encode(torch.stack([pixels for _, pixels in batch]))
            start, stop = len(shapes), len(shapes) + len(batch)
            shapes.extend((int(shape[0]), int(shape[1])) for shape, _ in batch)
            batch_patches = out.patch_tokens.to(torch.float16).cpu().numpy()
            batch_cls = out.cls_tokens.to(torch.float16).cpu().numpy() if cls else None
            if patches is not None:  # known length: straight into the result
                patches[start:stop] = batch_patches
                if cls_tokens is not None:
                    cls_tokens[start:stop] = batch_cls
            else:
                patch_parts.append(batch_patches)
                if cls:
                    cls_parts.append(batch_cls)
            bar.update(len(batch))
    if not shapes:
        raise InputError("No images were given to embed.")
    if patches is None:
        patches = np.concatenate(patch_parts)
        cls_tokens = np.concatenate(cls_parts) if cls else None
    names = [str(s) for s in sources] if sources is not None else []
    if names and len(names) != len(shapes):
        raise InputError(f"{len(shapes)} images were embedded but {len(names)} sources were given.")
    return TokenSet(patches, shapes, cls_tokens, names)


# ---------------------------------------------------------------------- shards
@dataclass
class _Shard:
    """One committed shard: its folder and its index."""

    folder: Path
    identifier: str
    has_cls: bool
    shape: tuple[int, ...]
    keys: list[str]
    crcs: list[int]
    sources: list[str]
    stats: dict[str, list[int]] | None = None  # (size, mtime, ctime, inode) of the data files when last verified

    @classmethod
    def open(cls, folder: Path) -> "_Shard | None":
        """The shard in ``folder`` when its index is readable, else None (with a warning when it is corrupt)."""
        index_file = folder / "index.json"
        if not index_file.is_file():
            return None
        try:
            index = json.loads(index_file.read_text())
            if index["format"] != CACHE_FORMAT:
                return None
            shard = cls(
                folder, str(index["identifier"]), bool(index["cls"]), tuple(int(n) for n in index["shape"]),
                list(index["keys"]), [int(c) for c in index["crc32"]], list(index["sources"]), index.get("stats"),
            )
        except (OSError, ValueError, KeyError, TypeError) as err:
            logger.warning("Ignoring the unreadable token cache index %s (%s)", index_file, err)
            return None
        if not (len(shard.keys) == len(shard.crcs) == len(shard.sources) == shard.shape[0]):
            logger.warning("Ignoring the inconsistent token cache index %s", index_file)
            return None
        return shard

    def index(self) -> dict:
        """The JSON-able index of the shard."""
        return {
            "format": CACHE_FORMAT, "identifier": self.identifier, "cls": self.has_cls, "shape": list(self.shape),
            "dtype": "float16", "keys": self.keys, "crc32": self.crcs, "sources": self.sources, "stats": self.stats,
        }

    def file_stats(self) -> dict[str, list[int]] | None:
        """Size, mtime, ctime and inode of the data files now (None when one is missing)."""
        names = ["patches.npy", "cls.npy"] if self.has_cls else ["patches.npy"]
        try:
            found = {name: (self.folder / name).stat() for name in names}
        except OSError:
            return None
        return {name: [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino] for name, st in found.items()}

    def record_stats(self) -> None:
        """Remember the data files' metadata as verified (best effort: a failure only costs a re-check later)."""
        self.stats = self.file_stats()
        try:
            atomic_write_text(self.folder / "index.json", json.dumps(self.index()))
        except OSError as err:
            logger.info("Cannot update the token cache index in %s (%s)", self.folder, err.strerror or err)

    def unchanged(self) -> bool:
        """True when no data file was touched since its CRCs were last verified (any write changes ctime)."""
        return self.stats is not None and self.stats == self.file_stats()

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:])) * 2

    @property
    def cls_row_bytes(self) -> int:
        return int(self.shape[1] * self.shape[-1]) * 2 if self.has_cls else 0

    def rows(self, indices: Iterable[int]) -> Iterator[tuple[int, bytes | None, bytes | None]]:
        """(index, patch bytes, CLS bytes) of rows; bytes are None when a row is unreadable or fails its CRC."""
        with contextlib.ExitStack() as stack:
            try:
                patches = stack.enter_context(open(self.folder / "patches.npy", "rb"))
                cls_file = stack.enter_context(open(self.folder / "cls.npy", "rb")) if self.has_cls else None
                patch_offset = _data_offset(patches)
                cls_offset = _data_offset(cls_file) if cls_file is not None else 0
            except (OSError, ValueError):
                patches = None
            for i in indices:
                row, cls_row = b"", b""
                if patches is not None:
                    patches.seek(patch_offset + i * self.row_bytes)
                    row = patches.read(self.row_bytes)
                    if cls_file is not None:
                        cls_file.seek(cls_offset + i * self.cls_row_bytes)
                        cls_row = cls_file.read(self.cls_row_bytes)
                intact = len(row) == self.row_bytes and len(cls_row) == self.cls_row_bytes
                if intact and zlib.crc32(cls_row, zlib.crc32(row)) == self.crcs[i]:
                    yield i, row, cls_row or None
                else:
                    yield i, None, None

    def corrupt_rows(self) -> list[int]:
        """Indices of rows that are missing or fail their CRC-32 (reads the whole shard once, on a few threads:
        file reads and zlib.crc32 release the GIL)."""
        n = len(self.keys)
        workers = max(1, min(8, os.cpu_count() or 1, n))
        bounds = np.linspace(0, n, workers + 1).astype(int)

        def bad_rows(span: tuple[int, int]) -> list[int]:
            return [i for i, row, _ in self.rows(range(*span)) if row is None]

        with ThreadPoolExecutor(max_workers=workers) as pool:
            found = pool.map(bad_rows, zip(bounds[:-1].tolist(), bounds[1:].tolist()))
            return sorted(itertools.chain.from_iterable(found))

    def token_set(self, shapes: list[tuple[int, int]], sources: list[str], cls: bool) -> TokenSet:
        """Read-only memory maps of the shard as a TokenSet (CLS only when asked for)."""
        patches = np.load(self.folder / "patches.npy", mmap_mode="r")
        cls_tokens = np.load(self.folder / "cls.npy", mmap_mode="r") if cls else None
        if patches.shape != self.shape or patches.dtype != np.float16:
            raise InputError(f"Token cache {self.folder} changed while it was read; run the command again.")
        return TokenSet(patches, shapes, cls_tokens, sources)


def _data_offset(handle) -> int:
    """Byte offset of the data in an open .npy file."""
    handle.seek(0)
    version = np.lib.format.read_magic(handle)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    read_header(handle)
    return handle.tell()


def _index(root: Path, identifier: str, skip: set[str]) -> dict[str, tuple[_Shard, int]]:
    """Every stored entry of ``identifier``: key -> (shard, row)."""
    found: dict[str, tuple[_Shard, int]] = {}
    for index_file in sorted(root.glob("tokens-*/index.json")):
        if index_file.parent.name in skip:
            continue
        shard = _Shard.open(index_file.parent)
        if shard is None or shard.identifier != identifier:
            continue
        for row, key in enumerate(shard.keys):
            found.setdefault(key, (shard, row))
    return found


def _assemble(
    backbone, root: Path, identifier: str, paths: list[Path], hashes: list[str], cls: bool,
    batch_size: int, progress: bool, workers: int | None, corrupt: set[str],
) -> _Shard:
    """Write the shard of this list: rows copied from other shards, the rest computed; commit it by renaming."""
    keys = [entry_key(identifier, h, cls) for h in hashes]
    grid_h, grid_w = backbone.grid_shape()
    shape = (len(paths), len(backbone.layers), grid_h, grid_w, int(backbone.embed_dim))
    shard = _Shard(root / shard_name(keys), identifier, cls, shape, keys, [0] * len(paths), [str(p) for p in paths])
    stored = _index(root, identifier, set())
    found: dict[int, tuple[_Shard, int]] = {}
    for i, h in enumerate(hashes):
        hit = stored.get(keys[i]) or (None if cls else stored.get(entry_key(identifier, h, True)))
        if hit is not None:
            found[i] = hit
    _check_free_space(root, shard, len(paths))
    tmp = root / temporary_name(shard.folder.name)
    WRITING.add(tmp.name)
    try:
        tmp.mkdir()
        with _ShardWriter(tmp, shard) as writer:
            missing = _copy_rows(writer, found)
            if found:
                logger.info("Reusing cached tokens of %d of %d images", len(paths) - len(missing), len(paths))
            if missing:
                logger.info("Computing tokens of %d images into %s", len(missing), shard.folder)
                encoded = backbone.iter_encoded(
                    [paths[i] for i in missing], batch_size=batch_size, progress=progress, workers=workers,
                    dtype=torch.float16,
                )
                for start, out in encoded:
                    batch_patches = out.patch_tokens.half().numpy()
                    batch_cls = out.cls_tokens.half().numpy() if cls else None
                    for j in range(len(batch_patches)):
                        writer.write(missing[start + j], batch_patches[j], None if batch_cls is None else batch_cls[j])
        if _commit(tmp, shard.folder, keys, corrupt):
            shard.record_stats()  # rows just written from checked sources: the next exact hit needs no re-check
    except OSError as err:
        raise _write_error(root, err) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        WRITING.discard(tmp.name)
    return shard


def _copy_rows(writer: "_ShardWriter", found: dict[int, tuple[_Shard, int]]) -> list[int]:
    """Copy the rows found in other shards (checking their CRC); return the positions still to compute."""
    missing = sorted(set(range(writer.shard.shape[0])) - set(found))
    by_source: dict[Path, list[tuple[int, int]]] = {}
    sources: dict[Path, _Shard] = {}
    for position, (source, row) in found.items():
        by_source.setdefault(source.folder, []).append((row, position))
        sources[source.folder] = source
    for folder, pairs in by_source.items():
        source = sources[folder]
        pairs.sort()  # read each source file front to back (a row may serve several positions)
        for (row, position), (_, data, cls_data) in zip(pairs, source.rows([r for r, _ in pairs])):
            if data is None:
                logger.warning(
                    "Cached tokens of %s in %s fail their checksum; recomputing them", source.sources[row], folder
                )
                missing.append(position)
                continue
            same_layout = writer.shard.has_cls == source.has_cls  # then the stored CRC covers the same bytes
            cls_part = cls_data if writer.shard.has_cls else None
            writer.write_bytes(position, data, cls_part, source.crcs[row] if same_layout else None)
    return sorted(missing)


class _ShardWriter:
    """Ordinary positional writes of rows into the .npy files of a shard being written, then its index."""

    def __init__(self, folder: Path, shard: _Shard) -> None:
        self.folder, self.shard = folder, shard
        self.handles: list = []

    def __enter__(self) -> "_ShardWriter":
        self.patches, self.patch_offset = self._start("patches.npy", self.shard.shape)
        if self.shard.has_cls:
            n, n_layers, *_, dim = self.shard.shape
            self.cls, self.cls_offset = self._start("cls.npy", (n, n_layers, dim))
        self.written = np.zeros(self.shard.shape[0], dtype=bool)
        return self

    def _start(self, name: str, shape: tuple[int, ...]):
        handle = open(self.folder / name, "wb")
        self.handles.append(handle)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(handle, header)
        return handle, handle.tell()

    def write(self, position: int, patches: np.ndarray, cls: np.ndarray | None) -> None:
        """Write one image's float16 tokens at its position."""
        self.write_bytes(
            position, np.ascontiguousarray(patches, dtype=np.float16).tobytes(),
            None if cls is None else np.ascontiguousarray(cls, dtype=np.float16).tobytes(),
        )

    def write_bytes(self, position: int, data: bytes, cls_data: bytes | None, crc: int | None = None) -> None:
        """Write one image's raw rows at its position and record their CRC-32 (given when copied from a shard)."""
        self.patches.seek(self.patch_offset + position * self.shard.row_bytes)
        self.patches.write(data)
        if self.shard.has_cls:
            self.cls.seek(self.cls_offset + position * self.shard.cls_row_bytes)
            self.cls.write(cls_data)
        if crc is None:
            crc = zlib.crc32(data)
            crc = zlib.crc32(cls_data, crc) if self.shard.has_cls else crc
        self.shard.crcs[position] = crc
        self.written[position] = True

    def __exit__(self, kind, value, traceback) -> None:
        try:
            if kind is None:
                if not self.written.all():
                    raise RuntimeError("a token shard was left with unwritten rows")
                for handle in self.handles:  # no fsync: a row torn by a crash fails its CRC and is recomputed
                    handle.flush()
        finally:
            for handle in self.handles:
                handle.close()
        if kind is None:
            (self.folder / "index.json").write_text(json.dumps(self.shard.index()))


def _commit(tmp: Path, final: Path, keys: list[str], corrupt: set[str]) -> bool:
    """Rename a finished shard folder into place (True); a sound shard of the same list committed meanwhile is
    kept instead (False)."""
    try:
        os.rename(tmp, final)
        return True
    except OSError as err:
        if err.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EACCES, errno.EPERM) or not final.is_dir():
            raise
    existing = _Shard.open(final)
    if existing is not None and existing.keys == keys and final.name not in corrupt:
        return False  # another process wrote the same list meanwhile: its shard is as good as ours
    trash = final.with_name(temporary_name(final.name, ".old.tmp"))
    os.rename(final, trash)
    os.rename(tmp, final)
    shutil.rmtree(trash, ignore_errors=True)
    return True


def _check_free_space(root: Path, shard: _Shard, n: int) -> None:
    """Refuse, before any work, a shard that does not fit on the cache's disk."""
    need = n * (shard.row_bytes + shard.cls_row_bytes) + (1 << 20)
    free = shutil.disk_usage(root).free
    if need > free:
        raise InputError(
            f"The token cache in {root} needs {need / 2**20:.0f} MB for {n} images but only {free / 2**20:.0f} MB "
            "are free on that disk; free some space, pass another --cache-dir, or run without a cache."
        )


def _write_error(root: Path, err: OSError) -> InputError:
    """One sentence for a failed cache write (a full disk above all)."""
    if err.errno in _FULL_DISK:
        return InputError(
            f"The disk of the token cache in {root} is full ({err.strerror}); free some space, pass another "
            "--cache-dir, or run without a cache."
        )
    return InputError(f"Cannot write the token cache in {root} ({err.strerror or err}).")


# ---------------------------------------------------------------------- small helpers
def _allocate(backbone, n: int, cls: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Empty float16 arrays for the patches (n, L, h, w, D) and, with ``cls``, the CLS tokens (n, L, D)."""
    grid_h, grid_w = backbone.grid_shape()
    n_layers, dim = len(backbone.layers), int(backbone.embed_dim)
    patches = np.empty((n, n_layers, grid_h, grid_w, dim), dtype=np.float16)
    return patches, (np.empty((n, n_layers, dim), dtype=np.float16) if cls else None)


def _batched(items: Iterable[np.ndarray], size: int) -> Iterator[list[np.ndarray]]:
    """Consecutive lists of at most ``size`` items of any iterable."""
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch
