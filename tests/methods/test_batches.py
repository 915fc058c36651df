"""EM batches: every row once per epoch, blocks read whole from a store file, results independent of how they are read."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

from normdino.errors import InputError
from normdino.features.tokens import TokenSet
from normdino.methods import batches as batches_module
from normdino.methods.batches import BatchSource, BlockReader, iter_batches, store_file
from normdino.methods.dpmm import DPMM
from normdino.methods.mixture import DirichletProcessMixture, _generator


def _numbered(n: int, d: int = 3) -> np.ndarray:
    """(n, d) float16 rows whose first column is the row's own number (exact in float16 below 2048)."""
    x = np.random.default_rng(n).normal(size=(n, d)).astype(np.float16)
    x[:, 0] = np.arange(n)
    return x


def _store(tmp_path, x: np.ndarray, name: str = "tokens.npy") -> np.ndarray:
    np.save(tmp_path / name, x)
    return np.load(tmp_path / name, mmap_mode="r")


@pytest.mark.parametrize("block_rows,batch_size", [(1, 20), (7, 20), (7, 7), (50, 20), (200, 30)])
def test_every_row_is_read_exactly_once_per_epoch_in_whole_blocks_and_file_order(tmp_path, block_rows, batch_size):
    x = _numbered(103)
    store = _store(tmp_path, x)
    g = torch.Generator().manual_seed(0)
    epochs = []
    for _ in range(3):
        batches = list(iter_batches(store, batch_size, g, block_rows=block_rows))
        rows = np.concatenate([b[:, 0] for b in batches]).astype(np.int64)
        assert np.array_equal(np.bincount(rows, minlength=103), np.ones(103, dtype=np.int64))  # counted apart
        for b in batches:
            ids = b[:, 0].astype(np.int64)
            assert np.all(np.diff(ids) > 0)  # file order
            blocks = np.unique(ids // block_rows)
            expected = np.concatenate([np.arange(k * block_rows, min((k + 1) * block_rows, 103)) for k in blocks])
            assert np.array_equal(ids, expected)  # whole blocks only
            assert np.array_equal(b, x[ids])  # the bytes of the store
        if block_rows == 1:  # near-equal batches of single rows
            assert max(map(len, batches)) - min(map(len, batches)) <= 1
        epochs.append([tuple(b[:, 0]) for b in batches])
    assert (epochs[0] != epochs[1]) == (block_rows < 103)  # permuted anew each epoch (one block: one batch)


def test_batches_do_not_depend_on_the_reader_threads_or_on_reading_a_file(tmp_path):
    x = _numbered(1000, 5)
    store = _store(tmp_path, x)
    assert store_file(store) is not None
    runs = []
    for source, threads in ((store, 1), (store, 4), (np.array(x), 4), (torch.from_numpy(x.astype(np.float32)), 2)):
        g = torch.Generator().manual_seed(3)
        batches = [np.asarray(b, dtype=np.float16) for b in iter_batches(source, 120, g, block_rows=40, read_threads=threads)]
        runs.append(batches)
    for other in runs[1:]:
        assert len(other) == len(runs[0])
        assert all(np.array_equal(a, b) for a, b in zip(runs[0], other))


def test_the_file_offset_of_a_token_layer_view_is_found_and_other_layouts_read_the_map(tmp_path):
    patches = np.random.default_rng(1).normal(size=(6, 1, 2, 3, 4)).astype(np.float16)
    flat = TokenSet(_store(tmp_path, patches), [(8, 8)] * 6).flat_layer(-1)[4:]  # a view that starts mid-file
    name, offset = store_file(flat)
    assert offset == 128 + 4 * 4 * 2  # .npy header of 128 bytes, then 4 rows of 4 float16
    from_file = list(iter_batches(flat, 4, torch.Generator().manual_seed(0), block_rows=3))
    in_memory = list(iter_batches(np.array(flat), 4, torch.Generator().manual_seed(0), block_rows=3))
    assert all(np.array_equal(a, b) for a, b in zip(from_file, in_memory)) and len(from_file) == len(in_memory) == 8
    two_layers = TokenSet(_store(tmp_path, np.random.default_rng(2).normal(size=(6, 2, 2, 3, 4)).astype(np.float16), "two.npy"),
                          [(8, 8)] * 6).flat_layer(-1)
    assert store_file(two_layers) is None  # not contiguous rows: read through the map
    g = torch.Generator().manual_seed(0)
    read = list(iter_batches(two_layers, 12, g, block_rows=6))
    assert sorted(map(bytes, np.concatenate(read))) == sorted(map(bytes, np.asarray(two_layers)))
    assert store_file(np.load(tmp_path / "two.npy")[:, 0].reshape(-1, 4)) is None  # in memory


def test_fit_with_block_batches_is_the_same_model_for_any_reader_and_source(tmp_path):
    g = torch.Generator().manual_seed(5)
    x = torch.nn.functional.normalize(torch.randn(8, 6, generator=g)[torch.randint(8, (1200,), generator=g)]
                                      + 0.05 * torch.randn(1200, 6, generator=g), dim=1).to(torch.float16).numpy()
    store = _store(tmp_path, x)
    fits = [DirichletProcessMixture(n_components=10, seed=2).fit(source, epochs=3, batch_size=240, block_rows=60,
                                                                  read_threads=threads).to_tensors()
            for source, threads in ((store, 1), (store, 4), (x, 1))]
    for other in fits[1:]:
        assert all(torch.equal(fits[0][k], other[k]) for k in fits[0])


def test_block_rows_1_gives_the_row_batches_of_an_independent_loop():
    """block_rows=1 keeps normdino's earlier batches: ceil(N / batch) near-equal sets of random rows per epoch."""
    x = torch.from_numpy(np.random.default_rng(4).normal(size=(500, 4)).astype(np.float32))
    fitted = DirichletProcessMixture(n_components=5, seed=7).fit(x, epochs=2, batch_size=90, block_rows=1)
    by_hand = DirichletProcessMixture(n_components=5, seed=7)
    g = _generator(7, 2, 0)
    for _ in range(2):
        for part in torch.tensor_split(torch.randperm(500, generator=g), 6):
            by_hand.partial_fit(x[torch.sort(part).values])
    assert all(torch.equal(a, b) for a, b in zip(fitted.to_tensors().values(), by_hand.to_tensors().values()))


def test_block_batches_initialise_from_rows_of_all_the_data(monkeypatch):
    x = np.repeat(np.eye(10, 12, dtype=np.float32), 30, axis=0) + 0.01  # 10 blocks of 30 rows, one cluster each
    seen = {}
    original = DirichletProcessMixture._initialise

    def spy(self, batch):
        seen["rows"] = batch.clone()
        return original(self, batch)

    monkeypatch.setattr(DirichletProcessMixture, "_initialise", spy)
    model = DirichletProcessMixture(n_components=8, seed=0).fit(x, epochs=1, batch_size=30, block_rows=30)
    assert model.n_iter_ == 10
    assert len(seen["rows"]) == 30
    assert len(torch.unique(seen["rows"].argmax(1))) >= 6  # a first batch would be one block: one cluster


def test_bad_block_rows_is_refused():
    with pytest.raises(InputError, match="block_rows"):
        DirichletProcessMixture(n_components=2).fit(np.zeros((10, 3)), block_rows=0)


def test_dpmm_batches_are_whole_images_of_the_token_set(monkeypatch):
    tokens = np.random.default_rng(6).normal(size=(10, 1, 2, 2, 4)).astype(np.float16)
    images = {tokens[i, 0].reshape(-1, 4).tobytes(): i for i in range(10)}
    batches = []
    original = DirichletProcessMixture.partial_fit

    def spy(self, x, distributed=False):
        batches.append(np.asarray(x))
        return original(self, x, distributed)

    monkeypatch.setattr(DirichletProcessMixture, "partial_fit", spy)
    DPMM(n_components=3, epochs=2, batch_images=3).fit(TokenSet(tokens, [(28, 28)] * 10))
    assert [len(b) for b in batches] == [12, 12, 8, 8] * 2  # ceil(10 / 3) batches of whole images
    for epoch in (batches[:4], batches[4:]):
        seen = [images[b[i:i + 4].tobytes()] for b in epoch for i in range(0, len(b), 4)]
        assert sorted(seen) == list(range(10))


def test_a_copy_on_write_map_is_read_through_the_map_with_its_private_changes(tmp_path):
    np.save(tmp_path / "tokens.npy", _numbered(60))
    private = np.load(tmp_path / "tokens.npy", mmap_mode="c")
    private[:, 1] = 7  # changes the map only, not the file
    assert store_file(private) is None
    batches = list(iter_batches(private, 20, torch.Generator().manual_seed(0), block_rows=10))
    assert all(np.all(b[:, 1] == 7) for b in batches)


def _direct_io_works(path) -> bool:
    """Whether the file system of ``path`` takes O_DIRECT reads (tmpfs and some others refuse them)."""
    if not hasattr(os, "O_DIRECT"):
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    try:
        os.preadv(fd, [batches_module.huge_page_buffer(batches_module.DIRECT_ALIGN)], 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


@pytest.fixture
def small_direct_buffers(monkeypatch):
    """Direct reads through 8 KB buffers: a block of more than ~8 KB is read in several pieces."""
    monkeypatch.setattr(batches_module, "DIRECT_BUFFER_BYTES", 2 * batches_module.DIRECT_ALIGN)


@pytest.mark.parametrize("block_rows,batch_size", [(700, 1400), (1, 500), (2046, 2047), (1000, 1)])
def test_direct_reads_give_the_page_cache_batches_bit_for_bit(tmp_path, small_direct_buffers, block_rows, batch_size):
    x = _numbered(2047, 5)  # rows of 10 bytes after a 128-byte header: no block starts on an aligned offset
    store = _store(tmp_path, x)
    if not _direct_io_works(tmp_path / "tokens.npy"):
        pytest.skip("this file system refuses O_DIRECT")
    source = BatchSource(store, batch_size, block_rows=block_rows, direct=True)
    buffered = BatchSource(store, batch_size, block_rows=block_rows, direct=False)
    assert source.reader.direct and not buffered.reader.direct
    g, h = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    for _ in range(2):
        direct_batches = list(source(g))
        assert source.reader._fd is None  # the epoch closed the file and its threads
        cached_batches = list(buffered(h))
        assert len(direct_batches) == len(cached_batches) > 0
        assert all(np.array_equal(a, b) for a, b in zip(direct_batches, cached_batches))
        rows = np.concatenate([b[:, 0] for b in direct_batches]).astype(np.int64)
        assert np.array_equal(np.bincount(rows, minlength=2047), np.ones(2047, dtype=np.int64))
        assert all(np.array_equal(b, x[b[:, 0].astype(np.int64)]) for b in direct_batches)


def test_direct_reads_of_edge_ranges_return_exactly_their_rows(tmp_path, small_direct_buffers):
    x = _numbered(2000, 7)  # 14-byte rows, 28 000 bytes of rows after the header: the file ends mid-page
    store = _store(tmp_path, x)
    if not _direct_io_works(tmp_path / "tokens.npy"):
        pytest.skip("this file system refuses O_DIRECT")
    reader = BlockReader(store, threads=3, direct=True)
    cases = [[(0, 1)], [(1999, 2000)], [(0, 2000)], [(3, 5), (5, 9)], [(1500, 1990), (2, 3), (1990, 2000)],
             [(292, 293), (585, 586)]]  # single rows across the 4 KB page boundaries of the file
    with reader.opened():
        assert reader._direct_fd is not None
        for ranges in cases:
            expected = np.concatenate([x[a:b] for a, b in ranges])
            assert np.array_equal(reader.read(ranges), expected), ranges


def test_the_read_ahead_is_taken_by_the_read_of_the_same_ranges_only(tmp_path, monkeypatch):
    x = _numbered(400, 4)
    store = _store(tmp_path, x)
    for direct in (False, True) if _direct_io_works(tmp_path / "tokens.npy") else (False,):
        reader = BlockReader(store, threads=2, direct=direct)
        reads = []
        original = reader._read_file
        monkeypatch.setattr(reader, "_read_file", lambda ranges: reads.append(list(ranges)) or original(ranges))
        with reader.opened():
            reader.prefetch([(10, 20), (30, 40)])
            assert np.array_equal(reader.read([(10, 20), (30, 40)]), np.concatenate([x[10:20], x[30:40]]))
            assert reads == [[(10, 20), (30, 40)]]  # read once, ahead
            reader.prefetch([(50, 60)])
            assert np.array_equal(reader.read([(0, 5)]), x[0:5])  # not the read-ahead's rows
            assert np.array_equal(reader.read([(50, 60)]), x[50:60])  # read again: the read-ahead was let go
        assert reads[1:] == [[(50, 60)], [(0, 5)], [(50, 60)]]


def test_an_epoch_left_with_a_batch_read_ahead_closes_its_file(tmp_path):
    store = _store(tmp_path, _numbered(300))
    source = BatchSource(store, 30, block_rows=10)
    epoch = source(torch.Generator().manual_seed(0))
    first = next(epoch)
    assert source.reader._pending is not None and len(first) == 30
    epoch.close()
    assert source.reader._fd is None and source.reader._pending is None


@pytest.mark.parametrize("direct", [False, True])
def test_a_store_truncated_while_read_says_so(tmp_path, direct):
    store = _store(tmp_path, _numbered(1000, 8))
    if direct and not _direct_io_works(tmp_path / "tokens.npy"):
        pytest.skip("this file system refuses O_DIRECT")
    reader = BlockReader(store, direct=direct)
    os.truncate(tmp_path / "tokens.npy", 128 + 500 * 16)
    assert np.array_equal(reader.read([(0, 400)]), np.asarray(store[:400]))
    with pytest.raises(InputError, match="truncated"):
        reader.read([(450, 600)])


def test_direct_reads_are_chosen_for_a_store_over_half_the_available_memory(tmp_path, monkeypatch):
    assert batches_module.wants_direct_reads(600, 1000) == hasattr(os, "O_DIRECT")
    assert not batches_module.wants_direct_reads(500, 1000)
    assert not batches_module.wants_direct_reads(10**12, None)  # memory unknown: the page cache
    store = _store(tmp_path, _numbered(100))
    monkeypatch.setattr(batches_module, "memory_available", lambda: 2 * store.nbytes)
    assert not BlockReader(store).direct
    monkeypatch.setattr(batches_module, "memory_available", lambda: 2 * store.nbytes - 2)
    assert BlockReader(store).direct == hasattr(os, "O_DIRECT")
    assert not BlockReader(np.array(store)).direct  # not a file
    if sys.platform.startswith("linux"):
        monkeypatch.undo()
        assert batches_module.memory_available() > 0


def test_a_file_system_refusing_direct_reads_falls_back_to_the_page_cache(tmp_path, monkeypatch):
    x = _numbered(500, 4)
    store = _store(tmp_path, x)
    real_open = os.open

    def refuse_direct(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(22, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refuse_direct)
    source = BatchSource(store, 100, block_rows=20, direct=True)
    batches = list(source(torch.Generator().manual_seed(1)))
    assert not source.reader.direct
    expected = list(BatchSource(np.array(x), 100, block_rows=20)(torch.Generator().manual_seed(1)))
    assert all(np.array_equal(a, b) for a, b in zip(batches, expected)) and len(batches) == len(expected) == 5


def test_fit_reading_directly_is_the_same_model(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(6)
    x = torch.nn.functional.normalize(torch.randn(6, 5, generator=g)[torch.randint(6, (900,), generator=g)]
                                      + 0.05 * torch.randn(900, 5, generator=g), dim=1).to(torch.float16).numpy()
    store = _store(tmp_path, x)
    cached = DirichletProcessMixture(n_components=8, seed=1).fit(store, epochs=2, batch_size=180, block_rows=45)
    monkeypatch.setattr(batches_module, "wants_direct_reads", lambda store_bytes, available: True)
    direct = DirichletProcessMixture(n_components=8, seed=1).fit(store, epochs=2, batch_size=180, block_rows=45)
    a, b = cached.to_tensors(), direct.to_tensors()
    assert all(torch.equal(a[k], b[k]) for k in a)
