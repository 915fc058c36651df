"""Token store: tokens equal an independent forward pass, are reused per image bit-identically, and faults are clear."""

from __future__ import annotations

import collections
import json
import logging
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoModel

from normdino.errors import InputError
from normdino.features import vit
from normdino.features.backbone import Backbone
from normdino.features.cache import embed_arrays, extract_tokens
from normdino.features.cache_folder import check_cache_dir, remove_stale_temporaries
from normdino.io.reading import read_image

TINY = {"tiny_dinov2_dir": 14, "tiny_dinov2_reg_dir": 14, "tiny_dinov3_dir": 16}


@pytest.fixture
def images(tmp_path):
    """Five small 8-bit PNGs of different sizes."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    paths = []
    for i in range(5):
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, size=(20 + 3 * i, 24), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def backbone(tiny_dinov2_dir):
    return Backbone.from_pretrained(tiny_dinov2_dir, image_size=56, layers=(1, 2))


def _count_encoded(monkeypatch, backbone) -> list[int]:
    """Record the batch size of every forward pass of ``backbone``."""
    calls: list[int] = []
    original = backbone.encode

    def counting(pixels, *args, **kwargs):
        calls.append(len(pixels))
        return original(pixels, *args, **kwargs)

    monkeypatch.setattr(backbone, "encode", counting)
    return calls


def _shards(cache):
    return sorted(p for p in cache.iterdir() if p.is_dir() and not p.name.startswith("."))


def _reference(folder, paths, image_size, layers):
    """Patch and CLS tokens from transformers' output_hidden_states, normed like get_intermediate_layers(norm=True)."""
    model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    norm = getattr(model, "layernorm", None) or model.norm
    prefix = 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)
    preprocess = Backbone(model, "reference", image_size=image_size).preprocess
    pixels = torch.stack([preprocess(read_image(p)) for p in paths])
    with torch.no_grad():
        hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states
        per_layer = torch.stack([norm(hidden[layer]) for layer in layers], dim=1)  # (N, L, 1+R+h*w, D)
    side = image_size // model.config.patch_size
    patches = per_layer[:, :, prefix:].reshape(len(paths), len(layers), side, side, -1)
    return F.normalize(patches, dim=-1).numpy(), F.normalize(per_layer[:, :, 0], dim=-1).numpy()


# ---------------------------------------------------------------------- what the tokens are
@pytest.mark.parametrize("fixture", sorted(TINY))
def test_multi_layer_and_cls_tokens_equal_hidden_states(request, fixture, images, tmp_path):
    folder = request.getfixturevalue(fixture)
    size = 4 * TINY[fixture]
    backbone = Backbone.from_pretrained(folder, image_size=size, layers=(0, 1, -1))
    expected_patches, expected_cls = _reference(folder, images, size, layers=(0, 1, 2))
    for cache in (None, tmp_path / "cache", tmp_path / "cache"):  # in memory, cold store, warm store
        tokens = extract_tokens(backbone, images, cache_dir=cache, batch_size=2, progress=False, cls=True)
        assert tokens.patches.shape == (5, 3, 4, 4, 32) and tokens.patches.dtype == np.float16
        assert tokens.cls.shape == (5, 3, 32) and tokens.cls.dtype == np.float16
        np.testing.assert_allclose(tokens.patches.astype(np.float32), expected_patches, atol=2e-3, rtol=0)
        np.testing.assert_allclose(tokens.cls.astype(np.float32), expected_cls, atol=2e-3, rtol=0)
        assert tokens.shapes == [(20 + 3 * i, 24) for i in range(5)]
        assert tokens.sources == [str(p) for p in images]
    assert isinstance(tokens.patches, np.memmap) and not tokens.patches.flags.writeable
    assert extract_tokens(backbone, images, progress=False).cls is None


def test_embed_arrays_streams_and_matches_files(backbone, images, monkeypatch):
    from_files = extract_tokens(backbone, images, batch_size=2, progress=False, cls=True)
    pulled = []

    def stream():
        for path in images:
            pulled.append(path)
            yield read_image(path)

    calls = _count_encoded(monkeypatch, backbone)
    seen_at_call = []
    original = backbone.encode
    monkeypatch.setattr(backbone, "encode", lambda pixels: (seen_at_call.append(len(pulled)), original(pixels))[1])
    streamed = embed_arrays(backbone, stream(), batch_size=2, cls=True, progress=False, sources=list("abcde"))
    assert calls == [2, 2, 1]
    assert streamed.patches.tobytes() == from_files.patches.tobytes()
    assert streamed.cls.tobytes() == from_files.cls.tobytes()
    assert streamed.shapes == from_files.shapes and streamed.sources == list("abcde")
    # a long stream is read at most two batches ahead of the forward pass (bounded memory)
    pulled.clear()
    seen_at_call.clear()
    long_stream = (pulled.append(i) or read_image(images[i % len(images)]) for i in range(20))
    embed_arrays(backbone, long_stream, batch_size=2, progress=False)
    assert len(seen_at_call) == 10 and all(seen <= 2 * (i + 1) + 2 * 2 for i, seen in enumerate(seen_at_call))
    listed = embed_arrays(backbone, [read_image(p) for p in images], batch_size=2, progress=False)
    assert listed.cls is None and listed.patches.tobytes() == from_files.patches.tobytes()
    with pytest.raises(InputError, match="No images"):
        embed_arrays(backbone, iter([]), progress=False)
    with pytest.raises(InputError, match="2 sources"):
        embed_arrays(backbone, [read_image(images[0])], progress=False, sources=["a", "b"])


# ---------------------------------------------------------------------- reuse
def test_each_image_is_reused_by_any_later_list(backbone, images, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    calls = _count_encoded(monkeypatch, backbone)
    first = extract_tokens(backbone, images[:3], cache, batch_size=2, progress=False)
    first_bytes = [first.patches[i].tobytes() for i in range(3)]
    assert sum(calls) == 3

    mixed = extract_tokens(backbone, [images[4], images[2], images[0], images[3]], cache, batch_size=2, progress=False)
    assert sum(calls) == 5  # only images 4 and 3 were new
    assert mixed.patches[1].tobytes() == first_bytes[2] and mixed.patches[2].tobytes() == first_bytes[0]
    fresh = extract_tokens(backbone, [images[4], images[3]], batch_size=2, progress=False)  # no store: 2 more
    assert mixed.patches[[0, 3]].tobytes() == fresh.patches.tobytes()

    renamed = images[1].with_name("renamed.png")
    shutil.copy(images[1], renamed)
    again = extract_tokens(backbone, [images[3], renamed, images[0]], cache, progress=False)
    assert sum(calls) == 7 and again.patches[1].tobytes() == first_bytes[1]
    assert again.sources[1] == str(renamed)

    same = extract_tokens(backbone, [images[3], renamed, images[0]], cache, progress=False)
    assert sum(calls) == 7 and same.patches.tobytes() == again.patches.tobytes()
    assert len(_shards(cache)) == 3  # the repeated list is served from its own shard, not copied again

    with_cls = extract_tokens(backbone, images[:2], cache, progress=False, cls=True)
    assert sum(calls) == 9  # CLS tokens were not stored before
    extract_tokens(backbone, images[1::-1], cache, progress=False)
    assert sum(calls) == 9  # a request without CLS reuses entries stored with CLS
    assert with_cls.patches[0].tobytes() == first_bytes[0]


def test_repeated_images_in_a_list(backbone, images, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    calls = _count_encoded(monkeypatch, backbone)
    twice = extract_tokens(backbone, [images[0], images[1], images[0]], cache, progress=False)
    assert twice.patches[0].tobytes() == twice.patches[2].tobytes()
    copied = extract_tokens(backbone, [images[1], images[0], images[0], images[1]], cache, progress=False)
    assert sum(calls) == 3  # the second list is copied from the first, one source row to two places
    assert copied.patches[[1, 2]].tobytes() == twice.patches[[0, 2]].tobytes()
    assert copied.patches[[0, 3]].tobytes() == twice.patches[[1, 1]].tobytes()


def test_changed_content_recomputes_only_that_image(backbone, images, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    original = np.array(extract_tokens(backbone, images, cache, progress=False).patches)
    calls = _count_encoded(monkeypatch, backbone)
    Image.fromarray(np.zeros((26, 24), dtype=np.uint8)).save(images[2])
    changed = extract_tokens(backbone, images, cache, progress=False)
    assert sum(calls) == 1
    np.testing.assert_array_equal(np.delete(changed.patches, 2, axis=0), np.delete(original, 2, axis=0))
    assert not np.array_equal(changed.patches[2], original[2])


@pytest.mark.parametrize("setting", [dict(image_size=70), dict(layers=(1,)), dict(normalize=False)])
def test_a_changed_setting_recomputes(tiny_dinov2_dir, images, tmp_path, monkeypatch, setting):
    cache = tmp_path / "cache"
    extract_tokens(Backbone.from_pretrained(tiny_dinov2_dir, image_size=56), images, cache, progress=False)
    other = Backbone.from_pretrained(tiny_dinov2_dir, **{"image_size": 56, **setting})
    calls = _count_encoded(monkeypatch, other)
    extract_tokens(other, images, cache, progress=False)
    assert sum(calls) == 5 and len(_shards(cache)) == 2


def test_one_changed_weight_value_invalidates_the_cache(tiny_dinov2_dir, images, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    reference = Backbone.from_pretrained(tiny_dinov2_dir, image_size=56)
    base = extract_tokens(reference, images, cache, progress=False)
    model = AutoModel.from_pretrained(tiny_dinov2_dir, local_files_only=True)
    weight = model.encoder.layer[-1].mlp.fc1.weight  # (128, 32): a strided sample of it skips odd indices
    kept = weight[0, 1].item()
    with torch.no_grad():
        weight[0, 1] += 0.5
    changed = Backbone(model, "changed", image_size=56)
    assert changed.identifier != reference.identifier
    calls = _count_encoded(monkeypatch, changed)
    tokens = extract_tokens(changed, images, cache, progress=False)
    assert sum(calls) == 5 and not np.array_equal(tokens.patches, base.patches)
    with torch.no_grad():
        weight[0, 1] = kept
    assert Backbone(model, "restored", image_size=56).identifier == reference.identifier
    with torch.no_grad():
        model.encoder.layer[-1].mlp.fc2.bias[-1] += 1e-3  # the last block's bias, one value
    assert Backbone(model, "bias", image_size=56).identifier != reference.identifier


def test_identifier_ignores_the_folder_but_not_runtime_or_versions(tiny_dinov2_dir, images, tmp_path, monkeypatch):
    moved = shutil.copytree(tiny_dinov2_dir, tmp_path / "moved")
    here = Backbone.from_pretrained(tiny_dinov2_dir, image_size=56)
    there = Backbone.from_pretrained(moved, image_size=56)
    assert here.identifier == there.identifier
    assert f"impl={vit.IMPLEMENTATION}|torch={torch.__version__}" in here.identifier  # who computes DINOv2's tokens
    extract_tokens(here, images, tmp_path / "cache", progress=False)
    calls = _count_encoded(monkeypatch, there)
    extract_tokens(there, images, tmp_path / "cache", progress=False)
    assert calls == []
    there.runtime = "compiled"
    assert there.identifier != here.identifier


# ---------------------------------------------------------------------- faults
def test_cache_altered_at_the_same_size_is_recomputed_with_a_warning(backbone, images, tmp_path, monkeypatch, caplog):
    cache = tmp_path / "cache"
    good = np.array(extract_tokens(backbone, images, cache, batch_size=1, progress=False).patches)
    (shard,) = _shards(cache)
    data = shard / "patches.npy"
    stat = data.stat()
    raw = bytearray(data.read_bytes())
    raw[len(raw) - good[0].nbytes * 2 + 10] ^= 0x40  # a bit of image 3's tokens
    data.write_bytes(bytes(raw))
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same mtime
    assert data.stat().st_size == stat.st_size
    calls = _count_encoded(monkeypatch, backbone)
    with caplog.at_level(logging.WARNING, logger="normdino.features.cache"):
        again = extract_tokens(backbone, images, cache, batch_size=1, progress=False)
    assert "checksum" in caplog.text and "3.png" in caplog.text
    assert sum(calls) == 1  # only the altered image
    assert again.patches.tobytes() == good.tobytes()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="normdino.features.cache"):
        extract_tokens(backbone, images, cache, progress=False)
    assert caplog.text == "" and sum(calls) == 1  # the rewritten shard is clean


def test_a_moved_cache_is_verified_once_and_reused(backbone, images, tmp_path, monkeypatch, caplog):
    good = extract_tokens(backbone, images, tmp_path / "cache", progress=False)
    moved = shutil.copytree(tmp_path / "cache", tmp_path / "moved")  # new inodes and ctimes
    calls = _count_encoded(monkeypatch, backbone)
    with caplog.at_level(logging.INFO, logger="normdino.features.cache"):
        again = extract_tokens(backbone, images, moved, progress=False)
    assert calls == [] and "checksums verified" in caplog.text and "WARNING" not in caplog.text
    assert again.patches.tobytes() == good.patches.tobytes()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="normdino.features.cache"):
        extract_tokens(backbone, images, moved, progress=False)
    assert calls == [] and "Reusing" in caplog.text and "checksums verified" not in caplog.text


def test_truncated_or_unreadable_cache_is_recomputed(backbone, images, tmp_path, caplog):
    cache = tmp_path / "cache"
    good = np.array(extract_tokens(backbone, images, cache, progress=False).patches)
    (shard,) = _shards(cache)
    (shard / "patches.npy").write_bytes((shard / "patches.npy").read_bytes()[:300])
    with caplog.at_level(logging.WARNING, logger="normdino.features.cache"):
        np.testing.assert_array_equal(extract_tokens(backbone, images, cache, progress=False).patches, good)
    assert "checksum" in caplog.text
    (shard / "index.json").write_text("{not json")
    np.testing.assert_array_equal(extract_tokens(backbone, images, cache, progress=False).patches, good)


def test_not_enough_free_space_is_one_sentence_before_any_work(backbone, images, tmp_path, monkeypatch):
    calls = _count_encoded(monkeypatch, backbone)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 4096, 4096))
    with pytest.raises(InputError, match=r"needs \d+ MB for 5 images but only 0 MB are free.*--cache-dir"):
        extract_tokens(backbone, images, tmp_path / "cache", progress=False)
    assert calls == [] and list((tmp_path / "cache").iterdir()) == []


def test_cache_dir_that_is_a_file_fails_early(backbone, images, tmp_path, monkeypatch):
    target = tmp_path / "file"
    target.write_text("x")
    calls = _count_encoded(monkeypatch, backbone)
    with pytest.raises(InputError, match="is a file, not a folder"):
        check_cache_dir(target)
    with pytest.raises(InputError, match="is a file, not a folder"):
        extract_tokens(backbone, images, target, progress=False)
    assert calls == []
    assert check_cache_dir(tmp_path / "new" / "folder").is_dir()


def _unshare_works() -> bool:
    if sys.platform != "linux" or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-r", "-m", "true"], capture_output=True)
    return probe.returncode == 0


FAKE_BACKBONE = """
import os, signal, sys
from pathlib import Path
from types import SimpleNamespace

import torch

class FakeBackbone:  # the store's view of a backbone, without loading transformers in this subprocess
    identifier, layers, embed_dim = "fake", (0,), 32

    def __init__(self, die_at_batch=0):
        self.die_at_batch = die_at_batch

    def grid_shape(self):
        return 32, 32  # 64 KiB of float16 per image

    def iter_encoded(self, paths, batch_size=8, progress=True, workers=None, dtype=None):
        for number, start in enumerate(range(0, len(paths), batch_size), 1):
            if number == self.die_at_batch:
                os.kill(os.getpid(), signal.SIGKILL)  # kill -9 in the middle of the extraction
            n = len(paths[start : start + batch_size])
            yield start, SimpleNamespace(patch_tokens=torch.ones(n, 1, 32, 32, 32), cls_tokens=torch.ones(n, 1, 32))
"""

FULL_DISK_SCRIPT = FAKE_BACKBONE + """
import json, shutil
from normdino.errors import InputError
from normdino.features.cache import extract_tokens
from normdino.features.cache_folder import check_cache_dir

small, readonly, *images = sys.argv[1:]
results = {}
def attempt(name, call):
    try:
        call()
        results[name] = "ok"
    except InputError as err:
        results[name] = str(err)
attempt("too_small", lambda: extract_tokens(FakeBackbone(), images, Path(small) / "cache", progress=False))
real = shutil.disk_usage
shutil.disk_usage = lambda path: real(path)._replace(free=10**12)  # the check passes: the disk fills while writing
attempt("fills_up", lambda: extract_tokens(FakeBackbone(), images, Path(small) / "cache", progress=False))
results["left"] = sorted(p.name for p in (Path(small) / "cache").iterdir())
attempt("read_only", lambda: check_cache_dir(Path(readonly) / "cache"))
print(json.dumps(results))
"""


@pytest.mark.skipif(not _unshare_works(), reason="needs unprivileged user namespaces (unshare -r -m) to mount a tmpfs")
def test_full_disk_and_read_only_cache_are_clear_errors_not_bus_errors(images, tmp_path):
    small, readonly = tmp_path / "small", tmp_path / "readonly"
    small.mkdir()
    readonly.mkdir()
    script = tmp_path / "full_disk.py"
    script.write_text(FULL_DISK_SCRIPT)
    command = (
        f'mount -t tmpfs -o size=96k none "{small}" && mount -t tmpfs -o ro,size=64k none "{readonly}" && '
        f'exec "{sys.executable}" "{script}" "{small}" "{readonly}" ' + " ".join(f'"{p}"' for p in images)
    )
    done = subprocess.run(["unshare", "-r", "-m", "sh", "-c", command], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]  # the old memory-mapped cache died here with SIGBUS
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert "needs 1 MB for 5 images but only 0 MB are free" in results["too_small"]
    assert "is full (No space left on device)" in results["fills_up"]
    assert results["left"] == []  # no temporaries, no half shard
    assert "is not writable (Read-only file system)" in results["read_only"]


KILL_SCRIPT = FAKE_BACKBONE + """
from normdino.features.cache import extract_tokens

cache, *images = sys.argv[1:]
extract_tokens(FakeBackbone(die_at_batch=2), images, Path(cache), batch_size=2, progress=False)
"""


def test_a_killed_extraction_leaves_no_temporaries_after_next_use(backbone, images, tmp_path):
    cache = tmp_path / "cache"
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    command = [sys.executable, str(script), str(cache), *map(str, images)]
    done = subprocess.run(command, capture_output=True, timeout=300)
    assert done.returncode == -9, done.stderr[-2000:]
    (left,) = [p.name for p in cache.iterdir() if p.name.endswith(".tmp")]
    assert left.startswith(".tokens-")
    tokens = extract_tokens(backbone, images, cache, progress=False)
    assert sorted(p.name for p in cache.iterdir() if p.name.endswith(".tmp")) == []
    np.testing.assert_array_equal(tokens.patches, extract_tokens(backbone, images, progress=False).patches)


def test_only_temporaries_of_gone_writers_or_old_ones_are_removed(tmp_path):
    import socket

    host = "".join(c if c.isalnum() or c == "_" else "_" for c in socket.gethostname())[:64]
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    gone = tmp_path / f".tokens-ab.{host}-{finished.pid}.0a1b2c3d.tmp"
    alive = tmp_path / f".tokens-cd.{host}-{os.getppid()}.0a1b2c3d.tmp"
    other_host = tmp_path / f".tokens-ef.elsewhere-{finished.pid}.0a1b2c3d.tmp"
    ours_but_dead = tmp_path / f".tokens-12.{host}-{os.getpid()}.0a1b2c3d.old.tmp"  # a past process with our pid
    old = tmp_path / ".tokens-old.npy.x1y2.tmp"
    for path in (gone, alive, other_host, ours_but_dead):
        path.mkdir()
    old.write_bytes(b"")
    day_ago = time.time() - 2 * 24 * 3600
    os.utime(old, (day_ago, day_ago))
    removed = sorted(p.name for p in remove_stale_temporaries(tmp_path))
    assert removed == sorted([gone.name, old.name, ours_but_dead.name])
    assert alive.exists() and other_host.exists()


def test_bad_inputs_are_clear_errors_and_write_nothing(backbone, images, tmp_path):
    with pytest.raises(InputError, match="missing.png"):
        extract_tokens(backbone, [tmp_path / "missing.png"], tmp_path / "cache", progress=False)
    with pytest.raises(InputError, match="No images"):
        extract_tokens(backbone, [], progress=False)
    with pytest.raises(InputError, match="batch_size"):
        extract_tokens(backbone, images, progress=False, batch_size=0)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"garbage")
    with pytest.raises(InputError, match="broken.png"):
        extract_tokens(backbone, [images[0], broken], tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []  # nothing half-written


@pytest.mark.shared_data
def test_real_slices_through_the_cache(backbone, lgg_flair, tmp_path):
    paths = sorted((lgg_flair / "train" / "good").glob("*.png"))[:3]
    tokens = extract_tokens(backbone, paths, tmp_path / "cache", progress=False, cls=True)
    assert tokens.patches.shape == (3, 2, 4, 4, 32) and tokens.shapes == [(256, 256)] * 3
    np.testing.assert_allclose(np.linalg.norm(tokens.patches.astype(np.float32), axis=-1), 1.0, atol=2e-3)
    np.testing.assert_allclose(np.linalg.norm(tokens.cls.astype(np.float32), axis=-1), 1.0, atol=2e-3)
