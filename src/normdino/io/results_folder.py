"""The results folder of ``normdino predict``: unique, traceable output names, the rule that a folder holding
files is never merged into (``overwrite`` first removes only what an earlier run listed), and the image-size
check made from file headers before any work.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

from normdino.errors import InputError, OutputError
from normdino.files import check_writable_folder
from normdino.io.reading import MAX_MEGAPIXELS

FILE_COLUMNS = ("anomaly_map", "anomaly_npy", "mask", "overlay", "top_slices", "dicom_seg", "dicom_pmap")
"""The columns of ``scores.csv`` that name files an input's prediction wrote (removed by ``overwrite``)."""
REPORT_FILES = ("scores.csv", "summary.json", "index.html")

#: Images larger than this are refused before any work (``--max-megapixels``), in fit as in predict.
DEFAULT_MAX_MEGAPIXELS = MAX_MEGAPIXELS
#: Peak memory of predict per pixel of the largest batch, an upper bound: measured +14 B/px of peak RSS from a
#: 2000x2000 to a 5000x5000 8-bit PNG (tiny backbone); 16-bit images add ~20 B/px while they are read.
BYTES_PER_PIXEL = 40


def _stem_and_extension(path: Path) -> tuple[str, str]:
    """(stem, extension) of an input: ``scan.nii.gz`` -> (scan, nii_gz), a DICOM folder -> (name, "")."""
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)], suffix[1:].replace(".", "_").lower()
    if path.suffix and not path.is_dir():
        return path.stem, path.suffix[1:].lower()
    return name, ""


def output_names(paths: Sequence[Path], taken: Iterable[str] = ()) -> list[str]:
    """A unique output name per input (case-insensitively, and unlike every name in ``taken``).

    The stem where it is unique; colliding stems in one folder get their extension; remaining collisions
    get parent folder names, nearest first, joined with ``__``; a number is the last resort.
    """
    paths = [Path(p) for p in paths]
    taken_keys = {t.casefold() for t in taken}
    split = [_stem_and_extension(p) for p in paths]
    parents = [Path(os.path.abspath(p)).parent for p in paths]
    same_folder = Counter((str(parent), stem.casefold()) for parent, (stem, _) in zip(parents, split))
    bases = [f"{stem}_{ext}" if same_folder[(str(parent), stem.casefold())] > 1 and ext else stem
             for parent, (stem, ext) in zip(parents, split)]
    folders = [parent.parts[1:] for parent in parents]
    depth = [0] * len(paths)
    names = list(bases)
    while True:
        counts = Counter(n.casefold() for n in names)
        clashing = [i for i, n in enumerate(names) if counts[n.casefold()] > 1 or n.casefold() in taken_keys]
        grown = [i for i in clashing if depth[i] < len(folders[i])]
        if not grown:
            break
        for i in grown:
            depth[i] += 1
            names[i] = "__".join((*folders[i][-depth[i]:], bases[i]))
    unique, used = [], set(taken_keys)
    for name in names:
        candidate, k = name, 2
        while candidate.casefold() in used:
            candidate, k = f"{name}_{k}", k + 1
        used.add(candidate.casefold())
        unique.append(candidate)
    return unique


def unique_stems(paths: Sequence[Path]) -> list[str]:
    """Output stems of inputs (kept for callers of the old name; see :func:`output_names`)."""
    return output_names(paths)




def _listed_outputs(csv_path: Path) -> list[str]:
    """File names an earlier run's scores.csv lists (empty if there is none or it is not ours)."""
    try:
        with csv_path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError):
        return []
    return [row[c] for row in rows for c in FILE_COLUMNS if row.get(c)]


def prepare_results_folder(out_dir: str | os.PathLike, overwrite: bool = False, check_only: bool = False) -> None:
    """Refuse a results folder that already holds files unless ``overwrite``; then remove the earlier run's outputs.

    Only files an earlier normdino run wrote (listed in its scores.csv, plus the report files) are removed,
    and nothing at all with ``check_only`` (to check before any work). Checks that the folder can be written,
    without creating it.
    """
    out_dir = Path(out_dir)
    check_writable_folder(out_dir, "results folder")
    if not out_dir.is_dir():
        return
    entries = [e for e in out_dir.iterdir() if not e.name.startswith(".normdino-probe.")]
    if not entries:
        return
    if not overwrite:
        earlier = " from an earlier predict" if (out_dir / "scores.csv").exists() else ""
        raise OutputError(f"the results folder {out_dir} already holds {len(entries)} files{earlier}; choose a new "
                          "folder, or pass --overwrite to replace the earlier normdino results in it")
    if check_only:
        return
    for name in [*_listed_outputs(out_dir / "scores.csv"), *REPORT_FILES]:
        target = out_dir / Path(name).name  # never outside the folder, whatever the CSV says
        if target.is_file():
            target.unlink()


def check_image_sizes(paths: Sequence[Path], max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
                      strict: bool = False) -> dict[Path, tuple[int, int] | str]:
    """(H, W) of each image from its header, or why it will be skipped; under ``strict`` the first problem raises.

    Reads headers only, so it is cheap enough to run before the model loads.
    """
    from normdino.io.reading import image_shape

    found: dict[Path, tuple[int, int] | str] = {}
    for path in paths:
        try:
            shape = image_shape(path, max_megapixels, BYTES_PER_PIXEL)
            found[path] = shape
        except InputError as err:
            if strict:
                raise InputError(f"{err} (stopped by --strict before any work; without it such inputs are "
                                 "skipped)") from None
            found[path] = str(err)
    return found
