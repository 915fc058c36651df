"""CPU cost of one image's prediction outputs (``io.writing.write_image_files``), part by part, old vs new tree.

    python benchmarks/bench_outputs.py --results RESULTS             # the maps of an earlier ``normdino predict``
    python benchmarks/bench_outputs.py --results RESULTS --compare-src /tmp/main/src   # ratios against a tree
    python benchmarks/bench_outputs.py --results RESULTS --compare-src /tmp/main/src --also-zlib
    python benchmarks/bench_outputs.py                               # synthetic maps over lgg-flair slices
    python benchmarks/bench_outputs.py --side 1500 --n 4 --compare-src /tmp/main/src     # other image sizes

On 2 cores busy with the model's forward, every millisecond of CPU spent on an image's files shows up in the
wall time of ``normdino predict``; this prints those milliseconds per image and per output:

  anomaly png16    ``rendering.save_map_png16``: the 16-bit map PNG
  anomaly npy      ``writing.save_npy``
  mask png         ``rendering.save_png`` of the 0/255 mask
  overlay draw     shrinking (``writing._thumbnail``) and drawing (``rendering.overlay_image``) the overlay
  overlay png      ``rendering.save_png`` of the overlay
  all outputs      ``writing.write_image_files`` with the image (what predict runs per image)
  no overlays      the same without the image (``--no-overlays``)

Each tree runs in its own process (``PYTHONPATH=<src>``), the trees alternating round after round; a figure is
the CPU time of the writing thread (``time.thread_time``: it moves less with other jobs on shared cores than
wall time does), best and median over the rounds, ms per image. With ``--compare-src`` the trees' files are
compared afterwards: decoded PNG pixels and PNG text chunks equal, .npy files byte-identical, and the bytes per
image of each kind of file. ``--also-zlib``: this tree once more with ISA-L hidden (``isal`` not importable),
i.e. as installed where ``isal`` has no wheel, where PNGs are deflated by zlib.

``--results``: a folder written by ``normdino predict`` (its scores.csv names each input, .npy map and mask;
its summary.json the colour and map ranges). Without it: lgg-flair validation slices (random 8-bit images where
absent; ``--side N``: resized to N x N and kept 8-bit) with smooth synthetic maps and thresholded masks.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "lgg-flair" / "valid" / "Ungood" / "img"
PARTS = ("anomaly png16", "anomaly npy", "mask png", "overlay draw", "overlay png", "all outputs", "no overlays")


# ---------------------------------------------------------------------- inputs


def load_inputs(results: Path | None, n: int, side: int | None = None) -> list[dict]:
    """(image, map, mask, ranges) of ``n`` images: from a predict results folder, or synthetic maps."""
    from PIL import Image

    from normdino.io.reading import read_image

    if results is not None:
        summary = json.loads((results / "summary.json").read_text())
        rows = [r for r in csv.DictReader(open(results / "scores.csv")) if r["status"] == "ok"][:n]
        return [{"name": Path(r["input"]).stem, "image": read_image(r["input"]),
                 "map": np.load(results / r["anomaly_npy"]),
                 "mask": np.asarray(Image.open(results / r["mask"])) > 0,
                 "map_range": tuple(summary["png_map_range"]), "color_range": tuple(summary["overlay_color_range"])}
                for r in rows]
    rng = np.random.default_rng(0)
    paths = sorted(DATA.glob("*.png"))[:n]
    items = []
    for i in range(n):
        if i < len(paths):
            image = read_image(paths[i])
        else:  # 8-bit levels, as read_image gives them
            image = rng.integers(0, 256, (side or 256,) * 2).astype(np.float32) / np.float32(255.0)
        if side and image.shape[:2] != (side, side):  # the slice resized, as if read from an 8-bit file that size
            plane = Image.fromarray(image, mode="F").resize((side, side), Image.Resampling.BICUBIC)
            image = np.rint(np.clip(np.asarray(plane), 0, 1) * 255).astype(np.float32) / np.float32(255.0)
        h, w = image.shape[:2]
        coarse = rng.random((h // 14 + 1, w // 14 + 1)).astype(np.float32)
        smooth = np.asarray(Image.fromarray(coarse, mode="F").resize((w, h), Image.Resampling.BILINEAR))
        pixel_map = (0.2 * smooth * smooth).astype(np.float32)
        items.append({"name": f"img{i:03d}", "image": image, "map": pixel_map, "mask": pixel_map > 0.12,
                      "map_range": (0.0, 1.0), "color_range": (0.002, 0.235)})
    return items


# ---------------------------------------------------------------------- one tree (a child process)


def child(results: Path | None, n: int, out: Path, hide_isal: bool = False, side: int | None = None) -> dict:
    """ms of thread CPU time per image for each part (one pass), and one set of files written into ``out``."""
    if hide_isal:
        sys.modules["isal"] = None  # type: ignore[assignment]  # import isal now fails, as without the extra
    from normdino.io import rendering, writing

    items = load_inputs(results, n, side)
    scratch = Path(tempfile.mkdtemp(prefix="bench_outputs_"))
    out.mkdir(parents=True, exist_ok=True)

    def job(item, image=True, folder=scratch):
        return writing.ImageJob(folder, item["name"], item["image"] if image else None, item["map"], item["mask"],
                                item["map_range"], item["color_range"])

    def draw(item):
        small = writing._thumbnail(item["image"], item["map"], item["mask"], writing.OVERLAY_MAX_SIDE)
        return rendering.overlay_image(*small, *item["color_range"])

    overlays = [draw(item) for item in items]  # warm-up (fonts, colour table) and the arrays "overlay png" saves
    for item in items:
        writing.write_image_files(job(item, folder=out), [])
    parts = {
        "anomaly png16": lambda i, it: rendering.save_map_png16(scratch / "a.png", it["map"], *it["map_range"]),
        "anomaly npy": lambda i, it: writing.save_npy(scratch / "a.npy", it["map"].astype(np.float32, copy=False)),
        "mask png": lambda i, it: rendering.save_png(scratch / "m.png", it["mask"].astype(np.uint8) * np.uint8(255)),
        "overlay draw": lambda i, it: draw(it),
        "overlay png": lambda i, it: rendering.save_png(scratch / "o.png", overlays[i]),
        "all outputs": lambda i, it: writing.write_image_files(job(it), []),
        "no overlays": lambda i, it: writing.write_image_files(job(it, image=False), []),
    }
    ms = {}
    for part in PARTS:
        start = time.thread_time()
        for i, item in enumerate(items):
            parts[part](i, item)
        ms[part] = (time.thread_time() - start) / len(items) * 1e3
    deflate = getattr(sys.modules.get("normdino.io.png"), "DEFLATE", "pillow")
    return {"ms": ms, "n": len(items), "shape": list(items[0]["image"].shape), "overlay": list(overlays[0].shape),
            "deflate": deflate}


# ---------------------------------------------------------------------- comparing two trees' files


def compare_files(new: Path, old: Path) -> dict:
    """Whether every file of ``new`` decodes to the same pixels (and PNG text) as in ``old``; bytes per kind."""
    from PIL import Image

    kinds = {"_anomaly.png": "anomaly png16", "_anomaly.npy": "anomaly npy", "_mask.png": "mask png",
             "_overlay.png": "overlay png"}
    same, sizes = True, {k: [0, 0] for k in kinds.values()}
    names = sorted(p.name for p in new.iterdir())
    if names != sorted(p.name for p in old.iterdir()):
        return {"same": False, "sizes": sizes, "why": "different file names"}
    for name in names:
        kind = next(k for suffix, k in kinds.items() if name.endswith(suffix))
        sizes[kind][0] += (new / name).stat().st_size
        sizes[kind][1] += (old / name).stat().st_size
        if name.endswith(".npy"):
            same &= (new / name).read_bytes() == (old / name).read_bytes()
            continue
        with Image.open(new / name) as a, Image.open(old / name) as b:
            same &= a.mode == b.mode and np.array_equal(np.asarray(a), np.asarray(b)) and a.text == b.text
    return {"same": bool(same), "sizes": sizes}


# ---------------------------------------------------------------------- parent


def run_child(src: Path, args, out: Path, hide_isal: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, __file__, "--child", "--n", str(args.n), "--child-out", str(out)]
    if hide_isal:
        cmd.append("--hide-isal")
    if args.side:
        cmd += ["--side", str(args.side)]
    if args.results is not None:
        cmd += ["--results", str(args.results)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=None, help="a normdino predict results folder (real maps)")
    parser.add_argument("--n", type=int, default=42, help="images")
    parser.add_argument("--side", type=int, default=None, help="the slices resized to N x N (8-bit levels)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (each tree once per round, alternating)")
    parser.add_argument("--compare-src", type=Path, default=None, help="another tree's src folder (the baseline)")
    parser.add_argument("--also-zlib", action="store_true", help="this tree again without ISA-L (zlib deflate)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--hide-isal", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.results, args.n, args.child_out, args.hide_isal, args.side)))
        return

    trees = {"new": (ROOT / "src", False)}
    if args.also_zlib:
        trees["new-zlib"] = (ROOT / "src", True)
    if args.compare_src is not None:
        trees["old"] = (args.compare_src.resolve(), False)
    folder = Path(tempfile.mkdtemp(prefix="bench_outputs_files_"))
    print(f"load before: {os.getloadavg()[0]:.2f}  trees: " + ", ".join(f"{k}={v[0]}" for k, v in trees.items()))
    runs: dict[str, list[dict]] = {k: [] for k in trees}
    for r in range(args.rounds):
        order = list(trees) if r % 2 == 0 else list(reversed(trees))
        for key in order:
            runs[key].append(run_child(trees[key][0], args, folder / key, trees[key][1]))
    first = runs["new"][0]
    print(f"{first['n']} images of shape {tuple(first['shape'])}, overlay {tuple(first['overlay'])}, "
          f"{args.rounds} rounds; deflate: " + ", ".join(f"{k} {runs[k][0]['deflate']}" for k in trees))
    print("ms of CPU per image, best / median over the rounds" + ("; old/x: the old tree's best over x's best"
                                                                  if "old" in trees else ""))
    others = [k for k in trees if k != "old"]
    header = f"{'output':<15}" + "".join(f"{k + ' best':>15}{k + ' med':>14}" for k in trees)
    print(header + "".join(f"{'old/' + k:>14}" for k in others if "old" in trees))
    for part in PARTS:
        line = f"{part:<15}"
        best = {}
        for key in trees:
            values = [run["ms"][part] for run in runs[key]]
            best[key] = min(values)
            line += f"{best[key]:>15.2f}{statistics.median(values):>14.2f}"
        if "old" in trees:
            line += "".join(f"{best['old'] / best[k]:>13.2f}x" for k in others)
        print(line)
    if "old" in trees:
        n = first["n"]
        for key in others:
            check = compare_files(folder / key, folder / "old")
            print(f"{key}: decoded pixels, PNG text and .npy bytes identical to the old tree's: {check['same']}"
                  + (f" ({check['why']})" if "why" in check else ""))
            for kind, (new_bytes, old_bytes) in check["sizes"].items():
                print(f"  {kind:<15} bytes/image {key} {new_bytes / n:>9.0f}  old {old_bytes / n:>9.0f}  "
                      f"{key}/old {new_bytes / max(1, old_bytes):.3f}")
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
