"""Peak memory of ``normdino predict`` on one NIfTI volume against its number of slices (the maps stream).

    python benchmarks/bench_volume_memory.py                         # 40 and 155 slices of 512 x 512, 2 rounds
    python benchmarks/bench_volume_memory.py --slices 40 155 310 --size 256

Each volume (uint8, smooth random texture, .nii.gz) is predicted by a fresh ``python -m normdino predict``
process with every output, on a tiny random DINOv2 at 224 px (the model's size does not change what is held
per slice: the maps are upsampled to the slice's own size). The table gives each process's peak resident
memory and, beside it, what holding every slice would weigh: per slice a float32 input slice, a float32 map
and a uint8 mask at the slice's size. The peak is /proc's VmHWM of the process at exit (not ``wait4``'s
``ru_maxrss``, which starts from the parent's size at fork). If the maps streamed through a bounded window,
the peak stays flat as slices are added; if the run kept them, it grows by that much.
Memory does not depend on the load of shared cores, so one or two rounds suffice.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def fit_tiny_model(work: Path) -> Path:
    """A dpmm model on a tiny random DINOv2 (224 px), fitted on 12 random textures."""
    from normdino.detector import AnomalyDetector
    from normdino.features.loading import save_random_backbone

    backbone = save_random_backbone(work / "tiny-dinov2", arch="dinov2_vits14", seed=0, tiny=True)
    rng = np.random.default_rng(0)
    images = [texture(rng, 224) for _ in range(12)]
    detector = AnomalyDetector(backbone=str(backbone), image_size=224, epochs=1, n_components=8, cache_dir=None,
                               progress=False)
    detector.fit(images[:8], images[8:])
    return detector.save(work / "tiny.normdino")


def texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random grayscale image in [0, 1] (float32)."""
    coarse = rng.random((size // 16 + 1, size // 16 + 1))
    image = np.kron(coarse, np.ones((16, 16)))[:size, :size] + 0.1 * rng.random((size, size))
    return (image / image.max()).astype(np.float32)


def write_volume(path: Path, n_slices: int, size: int) -> int:
    """A uint8 NIfTI of ``n_slices`` axial slices of size x size; returns its bytes uncompressed."""
    import nibabel as nib

    rng = np.random.default_rng(n_slices)
    volume = np.stack([np.round(255 * texture(rng, size)).astype(np.uint8) for _ in range(n_slices)], axis=2)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), path)
    return volume.nbytes


#: Runs ``normdino`` in this (fresh) process and prints its peak resident memory at exit. /proc's VmHWM belongs
#: to the process image since its exec; the ``ru_maxrss`` that ``wait4`` returns would start from the parent's
#: resident size at fork (here: torch and a fitted model), so it would hide everything below that.
PEAK_WRAPPER = """
import runpy, sys
sys.argv = ["normdino", *sys.argv[1:]]
try:
    runpy.run_module("normdino", run_name="__main__")
finally:
    with open("/proc/self/status") as f:
        peak = next(line for line in f if line.startswith("VmHWM:"))
    print("PEAK_KB", int(peak.split()[1]), file=sys.stderr, flush=True)
"""


def peak_rss_mb(arguments: list[str]) -> tuple[float, float]:
    """(peak resident MB, wall seconds) of one ``normdino ARGUMENTS`` process."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PEAK_WRAPPER, *arguments], env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"normdino {' '.join(arguments)} failed with exit code {done.returncode}:\n{done.stderr}")
    peak_kb = int(next(line for line in done.stderr.splitlines() if line.startswith("PEAK_KB")).split()[1])
    return peak_kb / 1024, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, nargs="+", default=[40, 155], help="slice counts (default 40 155)")
    parser.add_argument("--size", type=int, default=512, help="slice side in pixels (default 512)")
    parser.add_argument("--reps", type=int, default=2, help="rounds (default 2)")
    parser.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: a temp folder)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    work = args.keep or Path(tempfile.mkdtemp(prefix="normdino-bench-volume-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    model = fit_tiny_model(work)
    volumes = {n: work / f"volume{n}.nii.gz" for n in args.slices}
    raw_mb = {n: write_volume(path, n, args.size) / 2**20 for n, path in volumes.items()}
    per_slice_mb = args.size * args.size * (4 + 4 + 1) / 2**20
    print(f"load average {os.getloadavg()}, slices of {args.size} x {args.size}, work folder {work}", flush=True)
    peaks: dict[int, list[float]] = {n: [] for n in args.slices}
    walls: dict[int, list[float]] = {n: [] for n in args.slices}
    for rep in range(args.reps):
        for n in args.slices if rep % 2 == 0 else args.slices[::-1]:
            peak, wall = peak_rss_mb(["predict", str(model), str(volumes[n]), "-o", str(work / f"out{n}"),
                                      "--overwrite", "-q", "--normalization", "dtype"])
            peaks[n].append(peak)
            walls[n].append(wall)
            print(f"  round {rep + 1}: {n:4d} slices  peak RSS {peak:7.1f} MB  {wall:6.1f} s", flush=True)
    first = args.slices[0]
    print(f"\n| slices | input volume (uint8) MB | every slice's input + map + mask would be MB | peak RSS MB "
          f"(max of {args.reps}) | growth over {first} slices MB |")
    print("|---:|---:|---:|---:|---:|")
    for n in args.slices:
        print(f"| {n} | {raw_mb[n]:.1f} | {n * per_slice_mb:.0f} | {max(peaks[n]):.1f} | "
              f"{max(peaks[n]) - max(peaks[first]):+.1f} |")


if __name__ == "__main__":
    main()
