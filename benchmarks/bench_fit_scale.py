"""Does fit stream its token store? Peak memory on N and 4N images, the EM's read rate against the disk's, the EM step
against the matrix products it needs.

    python benchmarks/bench_fit_scale.py                  # N = 128 phantoms, 4N = 512; 1-block ViT-S width, 448 px
    python benchmarks/bench_fit_scale.py --n 32 --rounds 1 --layers 1 --image-size 224   # a quick run
    python benchmarks/bench_fit_scale.py --rounds 5 --compare-src DIR/src   # read rows also with DIR's code

One run prints:
1. Peak resident memory (VmHWM) of ``AnomalyDetector.fit`` on N and on 4N images, each in a fresh process with a
   cold token cache (extraction, store, EM, calibration); a fit that streams its store keeps 4N within 1.25x of N.
2. Read rates of the 4N token store (patches.npy), interleaved over ``--rounds`` rounds, each as a ratio to the
   disk's sequential read of the same file right before and right after it (geometric mean: the rate of this
   virtual disk drifts within seconds and jumps between ~1 and ~2.5 GB/s). Cold = the file's pages evicted
   first (fsync + posix_fadvise DONTNEED, no root needed); warm = from the page cache. Rows: the EM's batches of
   whole images (one positional read per image), each read in a fresh process (``--compare-src``: the same rows
   with another tree's code too, interleaved, marked [before]):
   - through the page cache, one epoch from cold (a store that fits in memory, under half of it: what normdino
     does for it; later batches may find pages the kernel read ahead for earlier ones);
   - through the page cache, evicted after each batch except the next batch's blocks (a store much larger than
     memory read through the page cache: its newest pages stay cached, the next batch's among them);
   - through the page cache, evicted before each batch, all pages (a read-ahead that the reader keeps in the
     page cache, as [before] did with posix_fadvise, is lost and may be read twice; this normdino reads the
     next batch ahead into memory, which no eviction touches);
   - direct reads (O_DIRECT into huge-page buffers), evicted before each batch: what normdino does for a store
     over half the available memory;
   (the read-ahead of the next batch runs while the loop evicts, untimed: about 0.1 ms a batch)
   and the single-row batches of earlier versions (one gather through the memory map). Then a whole fit again on
   the cached store with its pages evicted: the time its EM waited for its batches in the first (cold) epoch,
   from the fit's own record (reads overlap the EM's compute, so this rate can pass the disk's), and the same
   fit with direct reads forced (and its peak memory).
3. The EM step (``partial_fit`` on a batch as the fit reads it, float16 -> float32 included) against the floor of
   the four plain matrix products of the same shapes that a diagonal step needs (two K x D by D x N for the
   E-step, two K x N by N x D for the statistics), interleaved, at the fit's shapes.
The tokens come from a random ViT of ViT-S/14's width (D = 384) cut to ``--layers`` blocks, so rows have the
real size (768 bytes) and extraction is fast; the cores are shared, so everything is a ratio within the run and
``uptime`` is printed before and after.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _vm(field: str) -> float:
    """A /proc/self/status memory field in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def evict(path: Path) -> None:
    """Drop a file's pages from the page cache (they must not be mapped by a live memory map to go)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def child(images: str, backbone: str, image_size: int, cache: str, epochs: int, components: int) -> dict:
    import torch  # noqa: F401 - loaded before the baseline is taken

    from normdino.detector import AnomalyDetector
    from normdino.features.backbone import Backbone  # noqa: F401

    if os.environ.get("BENCH_DIRECT_READS") == "1":  # the reader's choice for a store over half the memory
        import normdino.methods.batches

        normdino.methods.batches.wants_direct_reads = lambda store_bytes, available: True
    paths = sorted(Path(images).glob("*.png"))
    detector = AnomalyDetector(backbone=backbone, image_size=image_size, epochs=epochs, n_components=components,
                               cache_dir=cache, progress=False)
    base = _vm("VmRSS")
    detector.fit(paths[: len(paths) * 9 // 10], paths[len(paths) * 9 // 10:])
    store = sum(f.stat().st_size for f in Path(cache).rglob("*") if f.is_file()) / 2**20
    summary = detector.training_summary_
    return {"n": len(paths), "base_mb": base, "peak_mb": _vm("VmHWM"), "store_mb": store,
            "tokens": summary["n_train_tokens"], "em_seconds": summary.get("em_seconds"),
            "em_read_seconds": summary.get("em_read_seconds"), "extraction_seconds": summary.get("extraction_seconds")}


def run_child(folder: Path, backbone: Path, args: argparse.Namespace, cache: Path, direct: bool = False,
              src: Path | None = None) -> dict:
    """``child`` in a fresh process (normdino from ``src``, this tree's by default); direct: its EM reads the store
    directly, as for a store over half the memory."""
    out = subprocess.run([sys.executable, __file__, "--child", str(folder), str(backbone), str(args.image_size),
                          str(cache), str(args.epochs), str(args.components)], check=True, capture_output=True,
                         text=True, env={"PYTHONPATH": str(src or ROOT / "src"), "HF_HUB_OFFLINE": "1",
                                         "PATH": "/usr/bin:/bin", "BENCH_DIRECT_READS": str(int(direct))})
    return json.loads(out.stdout.strip().splitlines()[-1])


def save_backbone(folder: Path, layers: int) -> Path:
    """A random DINOv2 of ViT-S/14's width (384) with ``layers`` blocks, saved as real weights are."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=384, num_attention_heads=6, intermediate_size=1536, num_hidden_layers=layers,
                          patch_size=14, image_size=518)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        Dinov2Model(config).eval().save_pretrained(folder)
    return folder


def sequential_mb_s(path: Path, cold: bool) -> float:
    """The file read start to end in 16 MB reads; cold: its pages evicted first, warm: read once before."""
    evict(path) if cold else sequential_mb_s(path, True)
    buf = bytearray(16 << 20)
    total = 0
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            total += n
    return total / (time.perf_counter() - started) / 1e6


def evict_except(path: Path, keep: list[tuple[int, int]]) -> None:
    """Drop a file's pages from the page cache except those of the byte ranges ``keep`` (offset, length), sorted;
    pages a kept range shares with a dropped one stay (posix_fadvise drops whole pages only)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        start = 0
        for offset, length in keep + [(path.stat().st_size, 0)]:
            if offset > start:
                os.posix_fadvise(fd, start, offset - start, os.POSIX_FADV_DONTNEED)
            start = max(start, offset + length)
    finally:
        os.close(fd)


def epoch_mb_s(path: Path, batch_rows: int, block_rows: int, seed: int, cold: bool, evict_mode: str,
               direct: bool | None = None, max_batches: int | None = None) -> float:
    """MB/s of the token rows one epoch's batches read (time spent reading only), as the EM reads them.

    evict_mode: "none" (pages brought in stay), "all" (every page evicted before each batch, the read-ahead of
    it too), "keep-next" (after each batch every page evicted but the next batch's: a store much larger than
    memory whose page cache keeps the pages asked for last). ``direct`` is passed to iter_batches when set."""
    import numpy as np
    import torch

    from normdino.methods.batches import iter_batches, store_file

    gc.collect()  # no earlier map of the file left alive: mapped pages cannot be evicted
    evict(path) if cold else sequential_mb_s(path, True)  # warm: the whole file read once before
    g = torch.Generator().manual_seed(seed)
    x = np.load(path, mmap_mode="r")
    x = x.reshape(-1, x.shape[-1])
    seconds, nbytes = 0.0, 0
    if block_rows == 1 and evict_mode == "all":  # a map per batch: pages mapped by a live map cannot be evicted
        parts = torch.tensor_split(torch.randperm(len(x), generator=g), -(-len(x) // batch_rows))
        del x
        for part in parts[:max_batches]:
            evict(path)
            m = np.load(path, mmap_mode="r")
            m = m.reshape(-1, m.shape[-1])
            started = time.perf_counter()
            batch = m[torch.sort(part).values.numpy()]
            seconds += time.perf_counter() - started
            nbytes += batch.nbytes
            del m, batch
            gc.collect()
        return nbytes / seconds / 1e6
    blocks: list = []
    if evict_mode == "keep-next":  # the blocks of every batch, drawn as BatchSource draws them
        n_blocks = -(-len(x) // block_rows)
        parts = torch.tensor_split(torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed)),
                                   max(1, min(-(-len(x) // batch_rows), n_blocks)))
        blocks = [torch.sort(part).values.tolist() for part in parts]
        base, row_bytes = store_file(x)[1], x.shape[1] * x.itemsize
    batches = iter_batches(x, batch_rows, g, block_rows=block_rows, **({} if direct is None else {"direct": direct}))
    for i in range(10**9):
        if max_batches is not None and i >= max_batches:
            break
        if evict_mode == "all":  # positional reads map nothing, so the eviction holds
            evict(path)
        started = time.perf_counter()
        batch = next(batches, None)
        seconds += time.perf_counter() - started
        if batch is None:
            break
        if blocks:
            assert len(batch) == sum(min(block_rows, len(x) - k * block_rows) for k in blocks[i])  # the model's batch
            assert np.array_equal(batch[:1], x[blocks[i][0] * block_rows:][:1])
            ahead = blocks[i + 1] if i + 1 < len(blocks) else []
            evict_except(path, [(base + k * block_rows * row_bytes, block_rows * row_bytes) for k in ahead])
        nbytes += batch.nbytes
    return nbytes / seconds / 1e6


def read_child(src: Path | None, *args) -> float:
    """epoch_mb_s in a fresh process importing normdino from ``src`` (this tree's src when None)."""
    out = subprocess.run([sys.executable, __file__, "--read-child", *map(str, args)], capture_output=True, text=True,
                         env={"PYTHONPATH": str(src or ROOT / "src"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    if out.returncode:
        raise RuntimeError(f"read child failed: {out.stderr[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def step_against_floor(path: Path, batch_rows: int, components: int, reps: int, threads: int) -> dict:
    """Median EM step and median floor (the four products of its shapes, K = the components alive), interleaved."""
    import numpy as np
    import torch

    from normdino.methods.mixture import DirichletProcessMixture

    torch.set_num_threads(threads)
    x = np.load(path, mmap_mode="r")
    x = x.reshape(-1, x.shape[-1])
    batch = np.array(x[:batch_rows])  # float16 rows as the fit reads them
    model = DirichletProcessMixture(n_components=components)
    for _ in range(3):
        model.partial_fit(batch)
    alive = int(torch.isfinite(model.log_weights_).sum())  # the E- and M-step products run over these
    n, d = batch.shape
    xs = torch.from_numpy(batch.astype(np.float32))
    a = torch.randn(alive, d)
    r = torch.rand(alive, n)
    step, floor = [], []
    for _ in range(reps):
        started = time.perf_counter()
        model.partial_fit(batch)
        step.append(time.perf_counter() - started)
        started = time.perf_counter()
        torch.mm(a, xs.T)  # E-step: precisions by xc^2 and scaled means by xc (K x D by D x N)
        torch.mm(a, xs.T)
        torch.mm(r, xs)  # statistics: responsibilities by xc and by xc^2 (K x N by N x D)
        torch.mm(r, xs)
        floor.append(time.perf_counter() - started)
    ratios = [s / f for s, f in zip(step, floor)]
    return {"n": n, "d": d, "k": components, "alive": alive, "step_ms": 1e3 * statistics.median(step),
            "floor_ms": 1e3 * statistics.median(floor), "ratio": statistics.median(ratios), "threads": threads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=128, help="images of the small fit (the large one has 4x)")
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--components", type=int, default=500, help="K of the mixture (the paper's 500)")
    parser.add_argument("--layers", type=int, default=1, help="blocks of the random ViT-S-width backbone")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the read-rate measurements")
    parser.add_argument("--step-reps", type=int, default=15)
    parser.add_argument("--keep", action="store_true", help="keep the work folder (images, backbone, ~0.5 GB of token stores)")
    parser.add_argument("--compare-src", type=Path, default=None,
                        help="another tree's src folder (e.g. of the code before a change: git archive COMMIT src | "
                             "tar -x -C DIR): the EM's page-cache read rows are also run with it, interleaved, "
                             "marked [before]")
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    parser.add_argument("--read-child", nargs=8, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.read_child:
        store, batch_rows, block_rows, seed, cold, mode, direct, max_batches = args.read_child
        print(epoch_mb_s(Path(store), int(batch_rows), int(block_rows), int(seed), bool(int(cold)), mode,
                         None if direct == "none" else bool(int(direct)), int(max_batches) or None))
        return
    if args.child:
        images, backbone, size, cache, epochs, components = args.child
        print(json.dumps(child(images, backbone, int(size), cache, int(epochs), int(components))))
        return
    sys.path.insert(0, str(ROOT / "src"))
    from normdino.io.phantoms import write_phantom_dataset

    print(f"start: {uptime()}")
    work = Path(tempfile.mkdtemp(prefix="normdino-bench-fit-scale-"))
    backbone = save_backbone(work / "backbone", args.layers)
    data = write_phantom_dataset(work / "data", n_train=4 * args.n, n_valid=1, n_test_normal=0, n_test_anomalous=0,
                                 size=64)
    all_images = sorted((data / "train" / "good").glob("*.png"))
    trees = [(None, "")] + ([(args.compare_src.resolve(), " [before]")] if args.compare_src else [])
    results = {}
    for n in (args.n, 4 * args.n):
        folder = work / f"images{n}"
        folder.mkdir()
        for p in all_images[:n]:
            (folder / p.name).symlink_to(p)
        for src, mark in trees:  # interleaved; each its own cold token cache
            results[mark, n] = run_child(folder, backbone, args, work / f"cache{n}{mark.strip()}", src=src)
    grid = args.image_size // 14
    batch_rows = 12 * grid * grid
    print(f"\nrandom DINOv2 of ViT-S width (D = 384), {args.layers} block(s), {args.image_size} px ({grid * grid} tokens "
          f"per image), {args.epochs} EM epochs, K = {args.components}, batches of 12 images, cold token cache")
    print("| images | train tokens | token store MB | RSS after load MB | peak RSS MB | peak growth MB |")
    print("|---:|---:|---:|---:|---:|---:|")
    for (mark, _), r in sorted(results.items(), key=lambda item: (item[0][1], item[0][0])):
        print(f"| {r['n']}{mark} | {r['tokens']} | {r['store_mb']:.1f} | {r['base_mb']:.0f} | {r['peak_mb']:.0f} | "
              f"{r['peak_mb'] - r['base_mb']:.0f} |")
    for _, mark in trees:
        small, large = results[mark, args.n], results[mark, 4 * args.n]
        print(f"\npeak RSS{mark}, 4x the images: {large['peak_mb'] / small['peak_mb']:.2f}x; growth over the loaded "
              f"process: {(large['peak_mb'] - large['base_mb']) / max(1e-9, small['peak_mb'] - small['base_mb']):.2f}x "
              f"(store {large['store_mb'] / max(1e-9, small['store_mb']):.1f}x)")

    cache = work / f"cache{4 * args.n}"
    store = max(cache.glob("tokens-*/patches.npy"), key=lambda p: p.stat().st_size)  # the training shard
    mb = store.stat().st_size / 1e6
    block = grid * grid

    def em(seed: int, cold: bool, mode: str, direct: bool | None, block_rows: int = block, max_batches: int = 0):
        return lambda src: read_child(src, store, batch_rows, block_rows, seed, int(cold), mode,
                                      "none" if direct is None or src is not None else int(direct),  # [before]: its own
                                      max_batches)

    # (name, case(src) -> MB/s, run with the --compare-src tree too)
    cases = [
        ("disk, sequential 16 MB reads, cold", lambda src: sequential_mb_s(store, True), False),
        ("EM, image blocks, page cache, one epoch from cold (a store that fits in memory)",
         em(1, True, "none", False), True),
        ("EM, image blocks, page cache, evicted before each batch but the next one's blocks (a store much larger "
         "than memory, its newest pages kept)", em(2, True, "keep-next", False), True),
        ("EM, image blocks, page cache, evicted before each batch (all pages: a read-ahead kept there is lost)",
         em(2, True, "all", False), True),
        ("EM, image blocks, direct reads, evicted before each batch (a store over half the memory)",
         em(2, True, "all", True), False),
        ("earlier EM, single rows, one epoch from cold", em(1, True, "none", None, 1), False),
        ("earlier EM, single rows, evicted before each batch (8 batches)", em(2, True, "all", None, 1, 8), False),
        ("disk, sequential, warm (page cache)", lambda src: sequential_mb_s(store, False), False),
        ("EM, image blocks, warm (page cache)", em(3, False, "none", None), True),
    ]
    rows = [(name + mark, case, src) for name, case, compare in cases for src, mark in trees if compare or src is None]
    rates: dict[str, list[float]] = {name: [] for name, _, _ in rows}
    ratios: dict[str, list[float]] = {name: [] for name, _, _ in rows}
    for _ in range(args.rounds):
        # the disk's own rate drifts within seconds (other jobs' I/O, the host): each read's baseline is the
        # geometric mean of the cold sequential reads right before and right after it
        previous = sequential_mb_s(store, True)
        for name, case, src in rows:
            value = case(src)
            following = sequential_mb_s(store, True)
            rates[name].append(value)
            ratios[name].append(value / math.sqrt(previous * following))
            previous = following
    # a whole fit on the cached store, its pages evicted: the EM's own read time in its first (cold) epoch
    before = sequential_mb_s(store, True)
    for f in cache.rglob("*.npy"):
        evict(f)
    refit = run_child(work / f"images{4 * args.n}", backbone, args, cache)
    after = sequential_mb_s(store, True)
    read = refit["em_read_seconds"]
    fit_rates = [mb / read[0], mb / read[-1]]
    fit_ratios = [fit_rates[0] / math.sqrt(before * after)]
    for f in cache.rglob("*.npy"):  # the same with direct reads (every epoch from the disk)
        evict(f)
    direct_fit = run_child(work / f"images{4 * args.n}", backbone, args, cache, direct=True)
    direct_after = sequential_mb_s(store, True)
    direct_read = direct_fit["em_read_seconds"]

    print(f"\nread rates of the 4N training store ({mb:.0f} MB, rows of 768 bytes), median of {args.rounds} "
          f"interleaved round(s); ratio = to the cold sequential reads right before and after it")
    print("| read | MB/s | ratio to the disk's sequential (cold) | lowest - highest ratio of a round |")
    print("|---|---:|---:|---:|")
    for name in rates:
        print(f"| {name} | {statistics.median(rates[name]):.0f} | {statistics.median(ratios[name]):.2f} | "
              f"{min(ratios[name]):.2f} - {max(ratios[name]):.2f} |")
    print(f"| `fit` on the cached store, EM epoch 1 (cold; bytes / time waiting for batches; disk before/after "
          f"{before:.0f}/{after:.0f} MB/s) | {fit_rates[0]:.0f} | {fit_ratios[0]:.2f} | |")
    print(f"| `fit` on the cached store, EM epoch {len(read)} (warm) | {fit_rates[1]:.0f} | | |")
    print(f"| `fit` on the cached store, direct reads, EM epoch 1 (disk after {direct_after:.0f} MB/s) | "
          f"{mb / direct_read[0]:.0f} | {mb / direct_read[0] / math.sqrt(after * direct_after):.2f} | |")
    print(f"refit: EM {refit['em_seconds']:.1f} s, of which waiting for batches {sum(read):.2f} s (per epoch {read}); "
          f"peak RSS {refit['peak_mb']:.0f} MB; with direct reads: EM {direct_fit['em_seconds']:.1f} s, waiting "
          f"{sum(direct_read):.2f} s (per epoch {direct_read}), peak RSS {direct_fit['peak_mb']:.0f} MB")

    import torch

    threads = torch.get_num_threads()
    print(f"\nEM step at the fit's shapes, median of {args.step_reps} interleaved with the floor of its 4 matrix products")
    print("| torch threads | N | D | K (alive) | step ms | floor ms | step / floor |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n_threads in sorted({1, threads}):
        step = step_against_floor(store, batch_rows, args.components, args.step_reps, n_threads)
        print(f"| {n_threads} | {step['n']} | {step['d']} | {step['k']} ({step['alive']}) | {step['step_ms']:.0f} | "
              f"{step['floor_ms']:.0f} | {step['ratio']:.2f} |")
    print(f"end: {uptime()}")
    if args.keep:
        print(f"work folder kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
