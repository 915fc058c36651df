"""Does fit stream its token store? Peak memory of ``AnomalyDetector.fit`` on N and on 4N images.

    python benchmarks/bench_fit_scale.py                 # N = 128 phantoms, 4N = 512; tiny random backbone, 448 px
    python benchmarks/bench_fit_scale.py --n 64 --image-size 224

Each fit runs in a fresh process with a cold token cache (extraction, store, EM, calibration). The figure is the
peak resident memory of the process (VmHWM), and its growth over the process's memory once torch, the method and
the backbone are loaded; a fit that streams its store keeps the peak of 4N within 1.25x of N's. The store's size
is printed beside it: a fit that held every token in memory would grow by about that much.
Time is not the point here (a tiny backbone), so the shared cores do not matter.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _vm(field: str) -> float:
    """A /proc/self/status memory field in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def child(images: str, backbone: str, image_size: int, cache: str, epochs: int) -> dict:
    import torch  # noqa: F401 - loaded before the baseline is taken

    from normdino.detector import AnomalyDetector
    from normdino.features.backbone import Backbone  # noqa: F401

    paths = sorted(Path(images).glob("*.png"))
    detector = AnomalyDetector(backbone=backbone, image_size=image_size, epochs=epochs, n_components=64,
                               cache_dir=cache, progress=False)
    base = _vm("VmRSS")
    detector.fit(paths[: len(paths) * 9 // 10], paths[len(paths) * 9 // 10:])
    store = sum(f.stat().st_size for f in Path(cache).rglob("*") if f.is_file()) / 2**20
    return {"n": len(paths), "base_mb": base, "peak_mb": _vm("VmHWM"), "store_mb": store,
            "tokens": detector.training_summary_["n_train_tokens"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=128, help="images of the small fit (the large one has 4x)")
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        images, backbone, size, cache, epochs = args.child
        print(json.dumps(child(images, backbone, int(size), cache, int(epochs))))
        return
    sys.path.insert(0, str(ROOT / "src"))
    from normdino.features.loading import save_random_backbone
    from normdino.io.phantoms import write_phantom_dataset

    work = Path(tempfile.mkdtemp(prefix="normdino-bench-fit-scale-"))
    backbone = save_random_backbone(work / "tiny", tiny=True)
    data = write_phantom_dataset(work / "data", n_train=4 * args.n, n_valid=1, n_test_normal=0, n_test_anomalous=0,
                                 size=64)
    all_images = sorted((data / "train" / "good").glob("*.png"))
    results = []
    for n in (args.n, 4 * args.n):
        folder = work / f"images{n}"
        folder.mkdir()
        for p in all_images[:n]:
            (folder / p.name).symlink_to(p)
        out = subprocess.run([sys.executable, __file__, "--child", str(folder), str(backbone), str(args.image_size),
                              str(work / f"cache{n}"), str(args.epochs)], check=True, capture_output=True, text=True,
                             env={"PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"tiny random DINOv2 at {args.image_size} px, {args.epochs} EM epochs, K = 64, cold token cache")
    print("| images | train tokens | token store MB | RSS after load MB | peak RSS MB | peak growth MB |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['n']} | {r['tokens']} | {r['store_mb']:.1f} | {r['base_mb']:.0f} | {r['peak_mb']:.0f} | "
              f"{r['peak_mb'] - r['base_mb']:.0f} |")
    small, large = results
    print(f"\npeak RSS, 4x the images: {large['peak_mb'] / small['peak_mb']:.2f}x; growth over the loaded process: "
          f"{(large['peak_mb'] - large['base_mb']) / max(1e-9, small['peak_mb'] - small['base_mb']):.2f}x "
          f"(store {large['store_mb'] / max(1e-9, small['store_mb']):.1f}x)")


if __name__ == "__main__":
    main()
