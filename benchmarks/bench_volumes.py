"""Peak memory and time to read a large CT slice by slice and write maps back (normdino.io.volumes).

Builds a synthetic 512x512x600 int16 CT (.nii and .nii.gz, in a temp folder, written plane by
plane), then runs each scenario in a fresh Python process and reports wall time and peak RSS
(ru_maxrss) above the process's RSS after imports.  The float32 input volume alone is 600 MB.

    python benchmarks/bench_volumes.py [--shape 512 512 600] [--keep DIR]
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SCENARIOS = {
    "iterate axial, percentile": "iterate",
    "iterate axial, window + foreground 10 %": "foreground",
    "iterate axial + write float32 map and uint8 mask": "write",
    "iterate sagittal + write float32 map": "sagittal",
}


def make_ct(folder: Path, shape: tuple[int, int, int]) -> tuple[Path, Path]:
    """Write a synthetic CT (air, a soft-tissue ellipse with noise, a bone ring) as .nii and .nii.gz."""
    import nibabel as nib

    nx, ny, nz = shape
    affine = np.diag([0.7, 0.7, 1.0, 1.0])
    affine[:3, 3] = [-180.0, -180.0, -300.0]
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    header["vox_offset"] = 352
    nii = folder / "ct.nii"
    x, y = np.meshgrid(np.linspace(-1, 1, nx), np.linspace(-1, 1, ny), indexing="ij")
    r = np.sqrt((x / 0.8) ** 2 + (y / 0.6) ** 2)
    rng = np.random.default_rng(0)
    with open(nii, "wb") as f:
        header.write_to(f)
        for k in range(nz):
            body = 1.0 if 0.1 * nz < k < 0.9 * nz else 0.0
            plane = np.where(r < body, 40.0, -1000.0) + np.where((r > 0.85 * body) & (r < body), 700.0, 0.0)
            plane = plane + rng.normal(0, 20, size=plane.shape)
            f.write(plane.astype(np.int16).tobytes(order="F"))
    gz = folder / "ct.nii.gz"
    with open(nii, "rb") as src, gzip.GzipFile(gz, "wb", compresslevel=1) as dst:
        shutil.copyfileobj(src, dst, 16 * 2**20)
    return nii, gz


def run_scenario(mode: str, path: str, out_dir: str) -> dict:
    """Body of one measurement, run in a fresh process."""
    import resource

    import nibabel  # noqa: F401  (imported lazily by normdino.io.volumes; count it in the baseline)

    import normdino.io.nifti as nifti
    import normdino.io.slicing as slicing
    import normdino.io.volumes as volumes

    def rss_mb() -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    base = rss_mb()
    start = time.perf_counter()
    suffix = ".nii.gz" if path.endswith(".gz") else ".nii"
    n = 0
    with volumes.Volume.open(path) as volume:
        if mode == "iterate":
            for _, s in volume.iter_slices(slicing.SliceOptions()):
                n += 1
        elif mode == "foreground":
            options = slicing.SliceOptions(window=(-200, 250), min_foreground=0.1)
            for _, s in volume.iter_slices(options):
                n += 1
        elif mode == "write":
            options = slicing.SliceOptions(window=(-200, 250))
            with nifti.VolumeWriter(volume, Path(out_dir) / f"map{suffix}", options.axis) as maps, \
                    nifti.VolumeWriter(volume, Path(out_dir) / f"mask{suffix}", options.axis, np.uint8) as masks:
                for k, s in volume.iter_slices(options):
                    maps.write(k, s)
                    masks.write(k, s > 0.5)
                    n += 1
        elif mode == "sagittal":
            options = slicing.SliceOptions(axis="sagittal", window=(-200, 250))
            nifti.write_volume_like(volume, volume.iter_slices(options), options, Path(out_dir) / f"sag{suffix}")
            n = volume.shape[0]
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"slices": n, "seconds": seconds, "base_mb": base, "peak_mb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=(512, 512, 600))
    parser.add_argument("--keep", type=Path, help="folder to build the CT in and keep it (default: a temp folder)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_scenario(*args.child)))
        return
    folder = args.keep or Path(tempfile.mkdtemp(prefix="bench-volumes-"))
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    nii, gz = make_ct(folder, tuple(args.shape))
    print(f"synthetic CT {tuple(args.shape)} int16: .nii {nii.stat().st_size / 2**20:.0f} MB, "
          f".nii.gz {gz.stat().st_size / 2**20:.0f} MB (built in {time.perf_counter() - start:.1f} s)")
    print(f"{'file':8} {'scenario':50} {'slices':>6} {'time s':>7} {'base MB':>8} {'peak MB':>8} {'+MB':>6}")
    try:
        for path in (nii, gz):
            for name, mode in SCENARIOS.items():
                out = folder / "out"
                out.mkdir(exist_ok=True)
                result = subprocess.run([sys.executable, __file__, "--child", mode, str(path), str(out)],
                                        check=True, capture_output=True, text=True)
                r = json.loads(result.stdout.strip().splitlines()[-1])
                print(f"{path.name[3:]:8} {name:50} {r['slices']:6d} {r['seconds']:7.1f} {r['base_mb']:8.0f} "
                      f"{r['peak_mb']:8.0f} {r['peak_mb'] - r['base_mb']:6.0f}", flush=True)
                shutil.rmtree(out)
    finally:
        if args.keep is None:
            shutil.rmtree(folder)


if __name__ == "__main__":
    main()
