"""What several commands share: argument types checked before any work, option groups, and the small
translations from parsed options to the library's settings objects (VolumeFlags, ReportOptions, settings).

Nothing here does the work; the command modules call one library function each.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from normdino.errors import NormdinoError
from normdino.files import default_cache_dir

DEFAULT_CACHE = default_cache_dir()


def fpr(text: str) -> float:
    """An FPR given as 0.05 or 5%."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a false-positive rate: {text!r} (use 0.05 or 5%)") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"a false-positive rate must lie strictly between 0 and 1, got {text}")
    return value


def dicom_out(text: str) -> tuple[str, ...]:
    """--dicom-out: seg, pmap, seg,pmap or none (normdino.io.dicom_results.parse_dicom_out)."""
    from normdino.errors import InputError
    from normdino.io.dicom_results import parse_dicom_out

    try:
        return parse_dicom_out(text)
    except InputError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def batch_size(text: str) -> int | None:
    """A batch size: a whole number >= 1, or ``auto`` (None: the measured best for the device and runtime)."""
    return None if text.strip().lower() == "auto" else positive_int(text)


def positive_int(text: str) -> int:
    """A whole number >= 1 (batch sizes, epochs, counts), checked before any work starts."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (smoothing sigma); NaN and infinity are refused."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (value >= 0.0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (limits such as --max-megapixels)."""
    value = non_negative_float(text)
    if value == 0.0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def fraction(text: str) -> float:
    """A number in [0, 1] (e.g. --min-foreground)."""
    value = non_negative_float(text)
    if value > 1.0:
        raise argparse.ArgumentTypeError(f"must lie between 0 and 1, got {text}")
    return value


def add_common(parser: argparse.ArgumentParser) -> None:
    """-q and -v, on every command."""
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or log messages, only errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def add_runtime_options(parser: argparse.ArgumentParser) -> None:
    """--runtime and --precision of the backbone forward pass (normdino.features.runtimes); None: the default,
    or for predict/evaluate the one recorded in the model file."""
    group = parser.add_argument_group("backbone runtime", "how the DINO forward pass runs; tokens differ slightly")
    group.add_argument("--runtime", choices=("torch", "onnx", "openvino"), default=None,
                       help="torch, onnx (ONNX Runtime, CPU) or openvino (CPU); exported graphs are cached once per weights")
    group.add_argument("--precision", choices=("fp32", "int8", "bf16"), default=None,
                       help="fp32, int8 (CPU: dynamic INT8 Linear layers, mean token cosine >= 0.99 to fp32) or "
                            "bf16 (CUDA or CPUs with bf16 instructions); default bf16 on CUDA, else fp32")


def add_volume_options(parser: argparse.ArgumentParser) -> None:
    """How volumes are sliced and scaled (normdino.io.volume_flags.VolumeFlags)."""
    group = parser.add_argument_group(
        "volumes (NIfTI / DICOM)",
        "predict and evaluate take the model's axis and intensity settings unless given again")
    group.add_argument("--axis", default=None, help="slicing axis: axial, coronal, sagittal, or an array axis 0/1/2 (default axial)")
    group.add_argument("--slices", default=None, help="slice range along the axis, e.g. 60:100")
    group.add_argument("--min-foreground", type=fraction, default=0.0, help="skip slices whose foreground fraction is below this (0..1)")
    group.add_argument("--window", default=None, help="CT window in HU as LOW,HIGH, e.g. -200,250 (default: percentile clipping)")
    group.add_argument("--percentiles", default=None, help="MRI intensity clipping percentiles (default 0.5,99.5)")
    group.add_argument("--normalization", choices=("percentile", "window", "dtype", "none"), default=None,
                       help="intensity scaling per volume: percentile (default; MRI), window (CT, with --window), "
                            "dtype (uint8 volumes /255, the same values as 8-bit PNG slices), none")
    group.add_argument("--volume-index", type=int, default=None, help="which volume of a 4D NIfTI to use")
    group.add_argument("--series", default=None, metavar="PATTERN",
                       help="DICOM folders and PACS exports: only series whose SeriesDescription matches (case-insensitive "
                            "text, or a regular expression), e.g. FLAIR")
    group.add_argument("--modality", default=None, help="DICOM folders and PACS exports: only series of this Modality, e.g. MR or CT")


def add_statistics_options(parser: argparse.ArgumentParser, seeds_default: str = "0") -> None:
    """Bootstrap intervals, paired tests, few-shot seeds and the foreground rule of evaluate, bench, reproduce."""
    group = parser.add_argument_group("statistics")
    group.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of images for 95%% intervals (0: none; default 1000)")
    group.add_argument("--compare", action="append", default=[], metavar="A,B", help="paired permutation test of method A against B on image-wise pixel AUROC/AUPR (repeatable)")
    group.add_argument("--permutations", type=positive_int, default=10000, help="permutations of each paired test (default 10000)")
    group.add_argument("--seeds", default=seeds_default, help=f"seeds of the few-shot methods, reported as max/mean/min (default {seeds_default})")
    group.add_argument("--foreground", default="auto", help="auto (intensity rule), none, or a folder of foreground masks: metrics and thresholds also inside the body/brain (default auto)")


def add_report_options(parser: argparse.ArgumentParser, default_dir: str, estimator: bool = False) -> None:
    """Output and evaluation options; ``estimator``: --sigma and --batch-size come from the estimator settings."""
    parser.add_argument("-o", "--output", default=default_dir, help=f"folder for results.json, results.md and report.html (default ./{default_dir})")
    parser.add_argument("--json", default=None, help="write the JSON results here instead of OUTPUT/results.json")
    if not estimator:
        parser.add_argument("--sigma", type=non_negative_float, default=None, help="Gaussian smoothing of the pixel maps (default: the model's / 0)")
    parser.add_argument("--timing-images", type=int, default=10, help="images timed at batch size 1 (default 10)")
    parser.add_argument("--max-eval", type=positive_int, default=None, help="evaluate on a seeded subset of at most this many images (labels kept in proportion)")
    if not estimator:
        parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="token cache folder")
    parser.add_argument("--no-cache", action="store_true")
    add_statistics_options(parser)


def volume_flags(args):
    """The volume options of the command line (normdino.io.volume_flags.VolumeFlags)."""
    from normdino.io.volume_flags import VolumeFlags

    return VolumeFlags(axis=args.axis, slices=args.slices, min_foreground=args.min_foreground, window=args.window,
                       percentiles=args.percentiles, normalization=args.normalization, volume_index=args.volume_index,
                       series=args.series, modality=args.modality)


FIT_DEFAULTS = {"method": "dpmm", "backbone": None, "device": "cpu", "cache_dir": str(DEFAULT_CACHE)}  # backbone: the method's


def estimator_settings(args, method: str | None = None) -> tuple[dict, dict, dict]:
    """(all settings, detector kwargs, method hyper-parameters) from defaults, --config and the command line.

    An option given for a method that does not take it is an error, not silently ignored.
    """
    from normdino.config import declared_params, resolve_settings, split_settings

    settings = resolve_settings(args, FIT_DEFAULTS, method)
    method = settings["method"]
    detector_kwargs, method_params = split_settings(settings, method)
    params = declared_params()
    for name, (param, users) in params.items():
        if getattr(args, name, None) is not None and "detector" not in users and name not in method_params \
                and name != "seed" and args.command == "fit":
            raise NormdinoError(f"{param.cli_flag} is a setting of {', '.join(users)}, not of method {method}")
    for name, (param, _) in params.items():  # every value (command line or --config) against its declaration, before any work
        if settings.get(name) is not None:
            param.check(settings[name], param.cli_flag)
    return settings, detector_kwargs, method_params


RANDOM_HINT = ("Without weights, 'normdino {command} --backbone random' runs the same pipeline with random weights "
               "(timing only, quality meaningless).")


def report_options(args):
    """The report and statistics options of evaluate and bench (normdino.evaluation.report_options)."""
    from normdino.evaluation.report_options import ReportOptions

    return ReportOptions(output=Path(args.output), json_path=Path(args.json) if args.json else None,
                         timing_images=args.timing_images, max_eval=args.max_eval, foreground=args.foreground,
                         n_bootstrap=args.bootstrap, compare=pairs(args.compare), n_permutations=args.permutations,
                         progress=not args.quiet)


def pairs(values: list[str]) -> tuple[tuple[str, str], ...]:
    """--compare A,B values as pairs; a usage error names a malformed one."""
    pairs = []
    for value in values:
        parts = [p.strip() for p in value.split(",")]
        if len(parts) != 2 or not all(parts):
            raise NormdinoError(f"--compare takes two method names as A,B; got {value!r}")
        pairs.append((parts[0], parts[1]))
    return tuple(pairs)


def seeds(text: str) -> tuple[int, ...]:
    """--seeds 0,1,2 as integers; a usage error names a malformed value."""
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise NormdinoError(f"--seeds takes integers as 0,1,2; got {text!r}") from None
    if not seeds:
        raise NormdinoError("--seeds is empty")
    return seeds


def print_results(paths: dict, rows: list[dict], random_backbone: bool) -> None:
    """The results table, a warning for random weights, and where the report files are."""
    from normdino.evaluation.protocol import RANDOM_WARNING, markdown_table

    print(markdown_table(rows))
    if random_backbone:
        print(f"WARNING: {RANDOM_WARNING}")
    print(f"results: {paths['json']}  {paths['markdown']}  report: {paths['html']}")
