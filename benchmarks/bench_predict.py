"""Throughput of ``normdino predict`` against the backbone's best forward pass, interleaved in one run.

    python benchmarks/bench_predict.py                      # 42 lgg-flair slices, 2 rounds, 155-slice volume
    python benchmarks/bench_predict.py --n 16 --reps 1 --volume-slices 0     # a quick look
    python benchmarks/bench_predict.py --n 8 --batches 1 2 --reps 2 --volume-slices 155 --only-volume

Every figure is a ratio to the backbone alone: the model's forward on already preprocessed images at its best
batch size (and thread count) for the runtime in use (torch fp32 on a CPU), measured in the same run, between
the other measurements, on the same images. ``normdino predict`` is timed as a whole process (start-up,
model load, reading, scoring, every output, report), as a user runs it, with its default settings: byte-compiled
code (as pip installs it, even where PYTHONDONTWRITEBYTECODE is set) and a fresh output folder each time.

Rows:
  backbone best           forward only, best of --batches x --threads (per-batch figures are printed too)
  predict (all outputs)   ``python -m normdino predict MODEL IMAGES -o OUT``
  predict --no-overlays   the same without overlay PNGs
  API predict             ``AnomalyDetector.predict(paths)`` in a loaded process (load not timed)
  onnx int8 predict       ``--runtime onnx --precision int8`` (the exported graph is cached beforehand),
                          as a speed-up over the default command, with the correlation of its maps to fp32
  volume vs PNG slices    a NIfTI volume of S slices against the same S slices as PNG files, per slice, each
                          with every output; the two in alternating order round by round, and whether the
                          volume's maps equal the PNG files' .npy maps bit for bit

Beside wall seconds, each ``normdino predict`` process's CPU seconds (user + system, from the kernel): on
shared cores they move less with the other jobs than wall time does.

Random ViT-S/14 weights at 448 px (honest for time, meaningless for quality), saved once and loaded from
that folder by every process as real weights are (``--random-init``: drawn again by each process instead). The cores may be shared:
rounds interleave every measurement, the table gives the best and the median round, and the load average
is printed. Images: lgg-flair validation slices from ../shared/data, or generated phantoms when absent.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "lgg-flair"


# ---------------------------------------------------------------------- children (fresh processes)


def child_backbone(model: str, paths: list[str], batches: list[int], threads: int) -> dict:
    """Seconds per image of the forward pass alone at each batch size (preprocessed input, after a warm-up)."""
    import torch

    from normdino.detector import AnomalyDetector
    from normdino.io.reading import read_image

    torch.set_num_threads(threads)
    detector = AnomalyDetector.load(model, progress=False, cache_dir=None)
    backbone = detector.backbone_
    pixels = [backbone.preprocess(read_image(p)) for p in paths]
    out = {}
    for batch in batches:
        chunks = [torch.stack(pixels[i:i + batch]) for i in range(0, len(pixels), batch)]
        backbone(chunks[0])  # warm-up
        started = time.perf_counter()
        for chunk in chunks:
            backbone(chunk)
        out[str(batch)] = (time.perf_counter() - started) / len(pixels)
    return out


def child_api(model: str, paths: list[str]) -> dict:
    """Seconds of ``AnomalyDetector.predict`` over the paths (load and a one-image warm-up not timed)."""
    from normdino.detector import AnomalyDetector

    detector = AnomalyDetector.load(model, progress=False, cache_dir=None)
    detector.predict(paths[:1])
    started = time.perf_counter()
    predictions = detector.predict(paths)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "n": len(predictions), "batch_size": detector.batch_size}


def _run_child(*args: str, src: Path | None = None) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], check=True, capture_output=True, text=True,
                         env=_env(src))
    return json.loads(out.stdout.strip().splitlines()[-1])


def _env(src: Path | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(src or ROOT / "src")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


#: CPU seconds (user + system) of each ``run_predict`` process, in call order: less swayed than wall time
#: by another job on shared cores (though thread contention still inflates it).
CPU_SECONDS: list[float] = []


def run_predict(model: Path, inputs: list[str], out: Path, *extra: str, src: Path | None = None) -> float:
    """Wall seconds of one ``normdino predict`` process (start-up included), of this tree's code or of ``src``."""
    import resource

    command = [sys.executable, "-m", "normdino", "predict", str(model), *inputs, "-o", str(out), "--overwrite",
               "-q", *extra]
    shutil.rmtree(out, ignore_errors=True)  # a fresh folder, as a user's first run (not timed)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(command, check=True, env=_env(src), stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU_SECONDS.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return wall


# ---------------------------------------------------------------------- set-up


def bench_images(n: int, work: Path, data: Path = DATA) -> list[Path]:
    """n lgg-flair validation slices (anomalous first, then healthy), or n generated phantoms."""
    found = sorted((data / "valid" / "Ungood" / "img").glob("*.png")) + sorted((data / "valid" / "good" / "img").glob("*.png"))
    if len(found) >= n:
        return found[:n]
    from normdino.io.phantoms import write_phantom_dataset

    root = write_phantom_dataset(work / "phantoms", n_train=n, n_valid=1, n_test_normal=0, n_test_anomalous=0, size=256)
    return sorted((Path(root) / "train" / "good").glob("*.png"))[:n]


def save_weights(work: Path, random_init: bool = False) -> str:
    """Random ViT-S/14 weights saved to a folder and loaded from it (``from_pretrained``), as real weights are;
    with ``random_init`` the model says ``random`` and every process draws the weights again (seconds of start-up)."""
    from normdino.features.loading import save_random_backbone

    return "random" if random_init else str(save_random_backbone(work / "vits14-random"))


def fit_model(folder: Path, images: list[Path], backbone: str) -> Path:
    """A small dpmm model at 448 px in ``folder`` (its prototypes do not change the timing)."""
    from normdino.detector import AnomalyDetector

    detector = AnomalyDetector(backbone=backbone, image_size=448, epochs=2, n_components=32, cache_dir=None,
                               progress=False)
    detector.fit(images[:8], images[8:12])
    folder.mkdir(parents=True, exist_ok=True)
    return detector.save(folder / "model.normdino")


def write_volume(paths: list[Path], target: Path) -> None:
    """The slices stacked along the third (axial) axis of an RAS uint8 NIfTI: slice k is image k's pixels."""
    import nibabel as nib
    from PIL import Image

    planes = [np.asarray(Image.open(p).convert("L")) for p in paths]
    shape = planes[0].shape
    volume = np.stack([p for p in planes if p.shape == shape], axis=2)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), target)


def volume_maps_equal(volume_out: Path, png_out: Path) -> tuple[int, int]:
    """(slices of the volume's NIfTI map equal to the .npy map of the same slice predicted as a PNG file, slices)."""
    import csv

    import nibabel as nib

    maps = np.asarray(nib.load(next(volume_out.glob("*_anomaly.nii.gz"))).dataobj)
    with open(png_out / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))  # in input order, slice k = PNG k
    return sum(np.array_equal(maps[:, :, k], np.load(png_out / row["anomaly_npy"])) for k, row in enumerate(rows)), len(rows)


def correlation(folder_a: Path, folder_b: Path) -> tuple[float, float]:
    """(Pearson r over all pixels of every map, lowest per-image r) between the .npy maps of two runs."""
    a_files = sorted(folder_a.glob("*_anomaly.npy"))
    per_image, a_all, b_all = [], [], []
    for fa in a_files:
        a, b = np.load(fa).ravel(), np.load(folder_b / fa.name).ravel()
        per_image.append(float(np.corrcoef(a, b)[0, 1]))
        a_all.append(a)
        b_all.append(b)
    return float(np.corrcoef(np.concatenate(a_all), np.concatenate(b_all))[0, 1]), min(per_image)


# ---------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=42, help="images (default 42)")
    parser.add_argument("--reps", type=int, default=2, help="interleaved rounds (default 2)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8], help="backbone batch sizes tried")
    parser.add_argument("--threads", type=int, nargs="+", default=[os.cpu_count() or 1], help="torch threads tried")
    parser.add_argument("--volume-slices", type=int, default=155, help="slices of the NIfTI vs PNG comparison (0: skip)")
    parser.add_argument("--no-onnx", action="store_true", help="skip the onnx int8 rows")
    parser.add_argument("--only-all", action="store_true", help="only the 'predict (all outputs)' rows (a quick before/after)")
    parser.add_argument("--only-volume", action="store_true",
                        help="only the backbone and the 'volume vs PNG slices' rows (needs --volume-slices > 0)")
    parser.add_argument("--extra", default="", help="extra options for every predict command, e.g. '--batch-size 1'")
    parser.add_argument("--data", type=Path, default=DATA, help="lgg-flair root (default ../shared/data/lgg-flair)")
    parser.add_argument("--random-init", action="store_true",
                        help="the model names the backbone 'random': each process draws the weights (slow start-up)")
    parser.add_argument("--compare-src", type=Path, default=None,
                        help="another tree's src folder (e.g. of the code before a change: git archive COMMIT src | "
                             "tar -x -C DIR): every predict row is also run with it, interleaved, marked [before]")
    parser.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: a temp folder)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, model, *rest = args.child
        if kind == "backbone":
            batches, threads, paths = rest[0], int(rest[1]), rest[2:]
            print(json.dumps(child_backbone(model, paths, [int(b) for b in batches.split(",")], threads)))
        elif kind == "fit":
            weights, paths = rest[0], [Path(p) for p in rest[1:]]
            print(json.dumps(str(fit_model(Path(model), paths, weights))))
        else:
            print(json.dumps(child_api(model, rest)))
        return

    sys.path.insert(0, str(ROOT / "src"))
    import logging

    logging.basicConfig(level=logging.ERROR)
    work = args.keep or Path(tempfile.mkdtemp(prefix="normdino-bench-predict-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("NORMDINO_RUNTIME_CACHE", str(work / "runtimes"))
    # Every process runs byte-compiled code, as an installed package does (pip compiles it), even where
    # PYTHONDONTWRITEBYTECODE is set: compiling normdino's sources costs every process ~0.1 s.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = sys.pycache_prefix = str(work / "pycache")
    images = bench_images(max(args.n, 12, args.volume_slices), work, args.data)
    paths = [str(p) for p in images[: args.n]]
    weights = save_weights(work, args.random_init)
    model = fit_model(work, images, weights)
    extra = args.extra.split()
    args.no_onnx = args.no_onnx or args.only_all or args.only_volume
    if args.only_volume and not args.volume_slices:
        parser.error("--only-volume needs --volume-slices > 0")
    if not args.no_onnx:  # export and quantise once, outside the timings (the graph is cached per weights)
        run_predict(model, paths[:1], work / "warm-onnx", "--runtime", "onnx", "--precision", "int8")
    volume = None
    if args.volume_slices:
        volume_pngs = [str(p) for p in images[: args.volume_slices]]
        volume = work / f"volume{args.volume_slices}.nii.gz"
        write_volume([Path(p) for p in volume_pngs], volume)
    print(f"{len(paths)} images ({'lgg-flair' if args.data.is_dir() else 'phantoms'}), cpus {os.cpu_count()}, "
          f"load average at start {os.getloadavg()}, work folder {work}", flush=True)

    results: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    backbone: dict[str, list[float]] = {}

    def record(name: str, value: float) -> None:
        results.setdefault(name, []).append(value)
        line = f"  {name:<34}{value:9.2f} s"
        if name != "API predict" and not name.startswith("API predict "):
            cpu.setdefault(name, []).append(CPU_SECONDS[-1])
            line += f"  (CPU {CPU_SECONDS[-1]:.2f} s)"
        print(line, flush=True)

    trees = [(None, "")] + ([(args.compare_src.resolve(), " [before]")] if args.compare_src else [])
    for src, _ in trees:
        compileall.compile_dir(src or ROOT / "src", quiet=1)
    models = {None: model}
    for src, mark in trees[1:]:  # each tree fits its own model: another version may name the weights otherwise
        models[src] = Path(_run_child("fit", str(work / "model-before"), weights, *map(str, images[:12]), src=src))
        if not args.no_onnx:
            run_predict(models[src], paths[:1], work / "warm-onnx", "--runtime", "onnx", "--precision", "int8", src=src)
    for rep in range(args.reps):
        print(f"round {rep + 1}/{args.reps}, load average {os.getloadavg()}", flush=True)
        for threads in args.threads:
            per_image = _run_child("backbone", str(models[None]), ",".join(map(str, args.batches)), str(threads), *paths)
            for batch, seconds in per_image.items():
                backbone.setdefault(f"{threads} threads, batch {batch}", []).append(seconds)
                print(f"  backbone {threads} threads batch {batch:<4}{1000 * seconds:14.0f} ms/image", flush=True)
        for src, mark in (trees if rep % 2 == 0 else trees[::-1]):  # either tree first, round by round
            model = models[src]
            if not args.only_volume:
                record("predict (all outputs)" + mark, run_predict(model, paths, work / f"out-all{mark}", *extra, src=src))
            if args.only_all:
                continue
            if not args.only_volume:
                record("API predict" + mark, _run_child("api", str(model), *paths, src=src)["seconds"])
                record("predict --no-overlays" + mark, run_predict(model, paths, work / f"out-no-overlays{mark}",
                                                                   "--no-overlays", *extra, src=src))
            if not args.no_onnx:
                record("predict onnx int8" + mark, run_predict(model, paths, work / f"out-onnx{mark}", "--runtime",
                                                               "onnx", "--precision", "int8", *extra, src=src))
            if volume is not None:  # the two in alternating order, round by round (the load drifts)
                pair = [lambda: record(f"predict {args.volume_slices} PNG slices{mark}",
                                       run_predict(model, volume_pngs, work / f"out-pngs{mark}", *extra, src=src)),
                        lambda: record(f"predict NIfTI of {args.volume_slices} slices{mark}",
                                       run_predict(model, [str(volume)], work / f"out-volume{mark}", "--normalization",
                                                   "dtype", *extra, src=src))]
                for measure in (pair if rep % 2 == 0 else pair[::-1]):
                    measure()

    best_config = min(backbone, key=lambda k: min(backbone[k]))
    base = min(backbone[best_config])  # seconds per image
    n = len(paths)

    def images_in(row: str) -> int:
        return args.volume_slices if " slices" in row else n
    print(f"\nload average at the end {os.getloadavg()}")
    print(f"\nbackbone alone (ms/image; best / median of {args.reps} rounds)")
    for key, values in backbone.items():
        print(f"  {key:<26}{1000 * min(values):8.0f}{1000 * statistics.median(values):8.0f}")
    print(f"\n| figure | best s | median s | ms/image | ratio to backbone best ({best_config}, {1000 * base:.0f} ms/image) "
          "| best CPU s |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| backbone best forward x {n} | {n * base:.2f} | | {1000 * base:.0f} | 1.00 | |")
    for name, values in results.items():
        count = images_in(name)
        cpu_text = f"{min(cpu[name]):.2f}" if name in cpu else ""
        print(f"| {name} | {min(values):.2f} | {statistics.median(values):.2f} | {1000 * min(values) / count:.0f} | "
              f"{min(values) / (count * base):.2f} | {cpu_text} |")
    # The cores' speed drifts over a run: each round's figure against the backbone's best of the same round too.
    round_base = [min(values[r] for values in backbone.values()) for r in range(args.reps)]
    print("\nper round, against the backbone's best of that round (the drift of the cores cancels):")
    for name, values in results.items():
        count = images_in(name)
        ratios = [v / (count * b) for v, b in zip(values, round_base)]
        print(f"  {name:<34} {' '.join(f'{r:.3f}' for r in ratios)}   median {statistics.median(ratios):.3f}")
    for _, mark in trees:
        print(f"\n{mark.strip() or '[this tree]'}")
        if not args.no_onnx:
            default, onnx = min(results["predict (all outputs)" + mark]), min(results["predict onnx int8" + mark])
            r_all, r_min = correlation(work / f"out-all{mark}", work / f"out-onnx{mark}")
            print(f"  onnx int8 vs default command, end to end: {default / onnx:.2f}x faster; maps vs fp32: "
                  f"Pearson r {r_all:.4f} over all pixels, lowest per image {r_min:.4f}")
        if volume is not None:
            png_name, nii_name = f"predict {args.volume_slices} PNG slices{mark}", f"predict NIfTI of {args.volume_slices} slices{mark}"
            png, nii = min(results[png_name]), min(results[nii_name])
            ratios = [v / p for v, p in zip(results[nii_name], results[png_name])]
            cpu_ratios = [v / p for v, p in zip(cpu[nii_name], cpu[png_name])]
            print(f"  NIfTI volume per-slice time / PNG slice time: {nii / png:.2f} (best vs best); per round "
                  f"{', '.join(f'{r:.2f}' for r in ratios)}; CPU time per round {', '.join(f'{r:.2f}' for r in cpu_ratios)}")
            equal, total = volume_maps_equal(work / f"out-volume{mark}", work / f"out-pngs{mark}")
            print(f"  the volume's map equals the PNG files' .npy maps bit for bit on {equal} of {total} slices")


if __name__ == "__main__":
    main()
