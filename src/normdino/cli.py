"""The ``normdino`` command line: fit, predict, info, evaluate, bench, demo.

Every user error ends in one readable line on stderr and exit code 1; usage errors exit with 2.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

from normdino import __version__
from normdino.errors import NormdinoError
from normdino.files import default_cache_dir
from normdino.torchrun import in_process_group, is_main_rank, join_job

log = logging.getLogger("normdino")

DEFAULT_CACHE = default_cache_dir()


# ---------------------------------------------------------------------- argument parsing


def _fpr(text: str) -> float:
    """An FPR given as 0.05 or 5%."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a false-positive rate: {text!r} (use 0.05 or 5%)") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"a false-positive rate must lie strictly between 0 and 1, got {text}")
    return value


def _positive_int(text: str) -> int:
    """A whole number >= 1 (batch sizes, epochs, counts), checked before any work starts."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    """A finite number >= 0 (smoothing sigma); NaN and infinity are refused."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (value >= 0.0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    """A finite number > 0 (limits such as --max-megapixels)."""
    value = _non_negative_float(text)
    if value == 0.0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def _fraction(text: str) -> float:
    """A number in [0, 1] (e.g. --min-foreground)."""
    value = _non_negative_float(text)
    if value > 1.0:
        raise argparse.ArgumentTypeError(f"must lie between 0 and 1, got {text}")
    return value


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or log messages, only errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _add_runtime_options(parser: argparse.ArgumentParser) -> None:
    """--runtime and --precision of the backbone forward pass (normdino.features.runtimes); None: the default,
    or for predict/evaluate the one recorded in the model file."""
    group = parser.add_argument_group("backbone runtime", "how the DINO forward pass runs; tokens differ slightly")
    group.add_argument("--runtime", choices=("torch", "onnx", "openvino"), default=None,
                       help="torch, onnx (ONNX Runtime, CPU) or openvino (CPU); exported graphs are cached once per weights")
    group.add_argument("--precision", choices=("fp32", "int8", "bf16"), default=None,
                       help="fp32, int8 (CPU: dynamic INT8 Linear layers, mean token cosine >= 0.99 to fp32) or "
                            "bf16 (CUDA or CPUs with bf16 instructions); default bf16 on CUDA, else fp32")


def _add_volume_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "volumes (NIfTI / DICOM)",
        "predict and evaluate take the model's axis and intensity settings unless given again")
    group.add_argument("--axis", default=None, help="slicing axis: axial, coronal, sagittal, or an array axis 0/1/2 (default axial)")
    group.add_argument("--slices", default=None, help="slice range along the axis, e.g. 60:100")
    group.add_argument("--min-foreground", type=_fraction, default=0.0, help="skip slices whose foreground fraction is below this (0..1)")
    group.add_argument("--window", default=None, help="CT window in HU as LOW,HIGH, e.g. -200,250 (default: percentile clipping)")
    group.add_argument("--percentiles", default=None, help="MRI intensity clipping percentiles (default 0.5,99.5)")
    group.add_argument("--normalization", choices=("percentile", "window", "dtype", "none"), default=None,
                       help="intensity scaling per volume: percentile (default; MRI), window (CT, with --window), "
                            "dtype (uint8 volumes /255, the same values as 8-bit PNG slices), none")
    group.add_argument("--volume-index", type=int, default=None, help="which volume of a 4D NIfTI to use")


def build_parser(estimator_options: bool = False) -> argparse.ArgumentParser:
    """The parser; ``estimator_options`` adds every method's hyper-parameters to fit and bench (imports torch)."""
    parser = argparse.ArgumentParser(
        prog="normdino",
        description="Anomaly detection and segmentation in medical images with a normative model of DINO patch embeddings.")
    parser.add_argument("--version", action="version", version=f"normdino {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fit = sub.add_parser("fit", help="learn a normative model from healthy images or volumes")
    fit.add_argument("normal", nargs="+", help="healthy training images: folders, globs, files, NIfTI/DICOM volumes")
    fit.add_argument("-o", "--output", required=True, help="model file to write (e.g. model.normdino)")
    fit.add_argument("--val", nargs="+", default=None, help="healthy validation images for model selection and thresholds (default: hold out 10%% of the training images)")
    fit.add_argument("--method", default=None, help="normative method: dpmm (default, the paper's), dpmm-euclidean, "
                     "dpmm-likelihood, anomalydino, anomalydino-1shot / -Nshot, patchcore-10%%, patchcore-1024, "
                     "patchcore-150, himatch, ... ('normdino fit --help' lists each method's settings)")
    fit.add_argument("--backbone", default=None, help="hub name, alias (dinov2_vits14, dinov3_vits16, ...), local directory, or 'random' (meaningless quality, for trying things out); default dinov2_vits14")
    fit.add_argument("--cache-dir", default=None, help=f"token cache folder (default {DEFAULT_CACHE})")
    fit.add_argument("--no-cache", action="store_true", help="do not cache tokens on disk")
    fit.add_argument("--device", default=None, help="cpu, cuda or mps (default cpu)")
    fit.add_argument("--max-megapixels", type=_positive_float, default=None,
                     help="refuse images and volume slices larger than this (default 64, as predict)")
    if estimator_options:
        from normdino.config import add_param_options

        add_param_options(fit)
    _add_volume_options(fit)
    _add_runtime_options(fit)
    _add_common(fit)

    predict = sub.add_parser("predict", help="anomaly maps, masks, overlays and scores for images or volumes")
    predict.add_argument("model", help="model file written by 'normdino fit'")
    predict.add_argument("inputs", nargs="+", help="images or volumes: folders, globs, files")
    predict.add_argument("-o", "--output", required=True, help="output folder")
    predict.add_argument("--fpr", type=_fpr, default=None, help="false-positive rate of the masks (default: the model's, 0.05)")
    predict.add_argument("--no-overlays", action="store_true", help="skip the overlay PNGs")
    predict.add_argument("--backbone", default=None, help="where to load the backbone weights from, if not the name saved in the model")
    predict.add_argument("--batch-size", type=_positive_int, default=8, help="images per backbone forward pass (default 8)")
    predict.add_argument("--overwrite", action="store_true",
                         help="replace the results of an earlier predict in OUTPUT (without it, a folder that already "
                              "holds files is refused, so no earlier result is ever lost)")
    predict.add_argument("--strict", action="store_true",
                         help="stop at the first input that cannot be read (default: skip it with a warning and a "
                              "'skipped' row in scores.csv saying why)")
    predict.add_argument("--max-megapixels", type=_positive_float, default=None,
                         help="refuse images and volume slices larger than this (default 64: predict needs about 40 "
                              "bytes per pixel)")
    predict.add_argument("--device", default="cpu")
    _add_volume_options(predict)
    _add_runtime_options(predict)
    _add_common(predict)

    info = sub.add_parser("info", help="describe a model file")
    info.add_argument("model")
    info.add_argument("--json", action="store_true", help="print the full header as JSON")

    demo = sub.add_parser("demo", help="fit and predict on generated phantoms; prints pixel AUROC and where the outputs are")
    demo.add_argument("-o", "--output", default="normdino-demo", help="folder for the phantoms, model and outputs (default ./normdino-demo)")
    demo.add_argument("--backbone", default="dinov2_vits14", help="backbone (default dinov2_vits14; 'random' runs without weights, quality meaningless)")
    demo.add_argument("--image-size", type=_positive_int, default=448)
    demo.add_argument("--epochs", type=_positive_int, default=10)
    demo.add_argument("--components", type=_positive_int, default=200)
    demo.add_argument("--seed", type=int, default=0)
    _add_common(demo)

    evaluate = sub.add_parser("evaluate", help="the paper's metrics of a fitted model on a labelled data set")
    evaluate.add_argument("model", help="model file written by 'normdino fit'")
    evaluate.add_argument("data", help="data set root (BMAD brain/liver/RESC layout, or folders normal/ anomalous/ masks/), or a folder of volumes with <name>_mask volumes")
    evaluate.add_argument("--layout", default="auto", choices=("auto", "bmad-brain", "bmad-liver", "bmad-resc", "folders", "volumes"))
    _add_report_options(evaluate, "normdino-evaluation")
    evaluate.add_argument("--backbone", default=None, help="where to load the backbone weights from, if not the name saved in the model")
    evaluate.add_argument("--device", default="cpu", help="cpu, cuda or mps (default cpu); the model may come from any device")
    evaluate.add_argument("--mask-suffix", default="_mask", help="volumes layout: mask of scan.nii.gz is scan<SUFFIX>.nii.gz (default _mask)")
    _add_volume_options(evaluate)
    _add_runtime_options(evaluate)
    _add_common(evaluate)

    bench = sub.add_parser("bench", help="fit and evaluate several methods on the same tokens; one comparison table and report")
    bench.add_argument("data", help="data set root in BMAD or folder layout")
    bench.add_argument("--layout", default="auto", choices=("auto", "bmad-brain", "bmad-liver", "bmad-resc", "folders"))
    bench.add_argument("--methods", default="dpmm,anomalydino,anomalydino-1shot,patchcore-150",
                       help="comma-separated, of: dpmm, dpmm-euclidean, dpmm-likelihood (the ablation's scores on the same mixture), "
                            "anomalydino, anomalydino-1shot, patchcore-10%%, patchcore-1024, patchcore-150 "
                            "(default dpmm,anomalydino,anomalydino-1shot,patchcore-150)")
    bench.add_argument("--backbone", default=None, help="backbone of every method (default: the first method's, dinov2_vits14 or dinov3_vits16 for himatch; 'random' for timing only)")
    bench.add_argument("--max-train", type=_positive_int, default=None, help="use at most this many training images (seeded subset)")
    bench.add_argument("--device", default=None)
    if estimator_options:
        from normdino.config import add_param_options

        add_param_options(bench)
    _add_report_options(bench, "normdino-bench", estimator=estimator_options)
    _add_runtime_options(bench)
    _add_common(bench)
    _add_serve_parser(sub)
    _add_reproduce_parser(sub)
    return parser


def _add_serve_parser(sub) -> None:
    serve = sub.add_parser("serve", help="REST API and web viewer for fitted models (needs normdino[serve])")
    serve.add_argument("models", nargs="+", metavar="MODEL", help="model files, each as PATH or NAME=PATH")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--token", default=None, help="require 'Authorization: Bearer TOKEN' on every API call "
                       "(default: the NORMDINO_TOKEN environment variable, which keeps it out of the process list)")
    serve.add_argument("--max-upload-mb", type=float, default=256, help="largest upload in MB (default 256)")
    serve.add_argument("--concurrency", type=int, default=1, help="inferences at once per model (default 1)")
    serve.add_argument("--max-queue", type=int, default=16, help="requests waiting per model before 503 (default 16)")
    serve.add_argument("--result-ttl", type=float, default=600, help="seconds results stay downloadable (default 600)")
    serve.add_argument("--device", default="cpu")
    _add_common(serve)


def _add_reproduce_parser(sub) -> None:
    rep = sub.add_parser("reproduce", help="the DPMM paper's Tables 1-3 on the BMAD sets, each cell beside the published figure")
    rep.add_argument("root", help="folder holding BraTS2021_slice/, Liver/ (or its hist_DIY/ variant) and RESC/")
    rep.add_argument("-o", "--output", default="repro", help="folder for tables.md, tables.json, results.json, report.html (default ./repro)")
    rep.add_argument("--datasets", default="brats,liver,resc", help="comma-separated BMAD sets (default brats,liver,resc)")
    rep.add_argument("--backbone", default="dinov2_vits14", help="backbone of every method (default dinov2_vits14; 'random' for timing only)")
    rep.add_argument("--image-size", type=_positive_int, default=448)
    rep.add_argument("--epochs", type=_positive_int, default=40)
    rep.add_argument("--components", type=_positive_int, default=500)
    rep.add_argument("--covariance", choices=("diag", "spherical", "full"), default="diag")
    rep.add_argument("--sigma", type=_non_negative_float, default=0.0, help="Gaussian smoothing of the pixel maps (default 0)")
    rep.add_argument("--max-train", type=_positive_int, default=None, help="use at most this many training images per set (seeded subset)")
    rep.add_argument("--max-eval", type=_positive_int, default=None, help="evaluate on a seeded subset of at most this many images per set")
    rep.add_argument("--timing-images", type=int, default=10, help="images timed at batch size 1 (default 10; 0: no timing)")
    rep.add_argument("--batch-size", type=_positive_int, default=8)
    rep.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="token cache folder")
    rep.add_argument("--no-cache", action="store_true")
    rep.add_argument("--device", default="cpu")
    rep.add_argument("--seed", type=int, default=0)
    _add_statistics_options(rep, seeds_default="0,1,2,3,4")
    _add_common(rep)


def _add_statistics_options(parser: argparse.ArgumentParser, seeds_default: str = "0") -> None:
    group = parser.add_argument_group("statistics")
    group.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of images for 95%% intervals (0: none; default 1000)")
    group.add_argument("--compare", action="append", default=[], metavar="A,B", help="paired permutation test of method A against B on image-wise pixel AUROC/AUPR (repeatable)")
    group.add_argument("--permutations", type=_positive_int, default=10000, help="permutations of each paired test (default 10000)")
    group.add_argument("--seeds", default=seeds_default, help=f"seeds of the few-shot methods, reported as max/mean/min (default {seeds_default})")
    group.add_argument("--foreground", default="auto", help="auto (intensity rule), none, or a folder of foreground masks: metrics and thresholds also inside the body/brain (default auto)")


def _add_report_options(parser: argparse.ArgumentParser, default_dir: str, estimator: bool = False) -> None:
    """Output and evaluation options; ``estimator``: --sigma and --batch-size come from the estimator settings."""
    parser.add_argument("-o", "--output", default=default_dir, help=f"folder for results.json, results.md and report.html (default ./{default_dir})")
    parser.add_argument("--json", default=None, help="write the JSON results here instead of OUTPUT/results.json")
    if not estimator:
        parser.add_argument("--sigma", type=_non_negative_float, default=None, help="Gaussian smoothing of the pixel maps (default: the model's / 0)")
    parser.add_argument("--timing-images", type=int, default=10, help="images timed at batch size 1 (default 10)")
    parser.add_argument("--max-eval", type=_positive_int, default=None, help="evaluate on a seeded subset of at most this many images (labels kept in proportion)")
    if not estimator:
        parser.add_argument("--batch-size", type=_positive_int, default=8)
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="token cache folder")
    parser.add_argument("--no-cache", action="store_true")
    _add_statistics_options(parser)


# ---------------------------------------------------------------------- commands


def _volume_flags(args):
    """The volume options of the command line (normdino.io.volume_flags.VolumeFlags)."""
    from normdino.io.volume_flags import VolumeFlags

    return VolumeFlags(axis=args.axis, slices=args.slices, min_foreground=args.min_foreground, window=args.window,
                       percentiles=args.percentiles, normalization=args.normalization, volume_index=args.volume_index)


FIT_DEFAULTS = {"method": "dpmm", "backbone": None, "device": "cpu", "cache_dir": str(DEFAULT_CACHE)}  # backbone: the method's


def _estimator_settings(args, method: str | None = None) -> tuple[dict, dict, dict]:
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


# ---------------------------------------------------------------------- torchrun (normdino.torchrun)


def _join_torchrun_job(args) -> bool:
    """Under torchrun: join the job (normdino.torchrun.join_job); ranks other than 0 stay quiet."""
    joined, args.device = join_job(args.command, getattr(args, "device", None))
    if not is_main_rank():
        args.quiet = True  # progress bars and logs on rank 0 only; errors are agreed and printed there
    return joined


def cmd_fit(args) -> int:
    settings, detector_kwargs, method_params = _estimator_settings(args)
    if args.print_config:
        from normdino.config import to_yaml

        print(to_yaml(settings), end="")
        return 0
    from normdino.errors import WeightsNotFoundError
    from normdino.workflows.fit import fit_to_file

    try:
        fit_to_file(args.normal, args.output, val=args.val, volume_flags=_volume_flags(args),
                    max_megapixels=getattr(args, "max_megapixels", None),
                    method=settings["method"], backbone=settings["backbone"], device=settings["device"],
                    runtime=args.runtime or "torch", precision=args.precision,
                    cache_dir=None if args.no_cache else settings["cache_dir"], progress=not args.quiet,
                    **detector_kwargs, **method_params)
    except WeightsNotFoundError as err:
        raise WeightsNotFoundError(f"{err} {RANDOM_HINT.format(command='fit')}") from None
    return 0


def cmd_predict(args) -> int:
    from normdino.workflows.predict import predict_to_folder

    predict_to_folder(args.model, args.inputs, args.output, volume_flags=_volume_flags(args), fpr=args.fpr,
                      overlays=not args.no_overlays, overwrite=args.overwrite, strict=args.strict,
                      max_megapixels=args.max_megapixels, progress=not args.quiet, backbone=args.backbone,
                      device=args.device, runtime=args.runtime, precision=args.precision, batch_size=args.batch_size)
    return 0


def cmd_info(args) -> int:
    """Describe a model after checking it in full, exactly as predict does (a file info calls healthy loads)."""
    import numpy as np

    from normdino.detector import read_checked_model

    header, method, tensors = read_checked_model(args.model)
    if args.json:
        print(json.dumps(header, indent=2))
        return 0
    tables = {key: tensors[key].double().numpy() for key in ("calibration.fprs", "calibration.pixel_thresholds",
                                                                  "calibration.image_thresholds")}
    backbone, params, training = header["backbone"], header["detector"], header.get("training", {})
    meta = header["method"]
    settings = ", ".join(f"{k}={v}" for k, v in meta["params"].items())
    lines = [
        f"normdino model {args.model} (format {header['format_version']}, written by normdino {header['normdino_version']})",
        f"  method        {meta['name']}  ({settings})",
        f"  backbone      {backbone['name']}{'  [RANDOM WEIGHTS: quality meaningless]' if backbone['is_random'] else ''}",
        f"                patch {backbone['patch_size']}, input {backbone['image_size']} px, layers {backbone['layers']}, "
        f"dim {backbone['embed_dim']}, {backbone.get('precision', 'fp32')} on {backbone.get('runtime', 'torch')}",
        f"  state         {method.n_prototypes} prototypes; smoothing sigma {params.get('sigma', 0)}",
        f"  training      {training.get('n_train_images', '?')} images, {training.get('n_train_tokens', '?')} tokens"
        + (f", best epoch {training['best_epoch']}" if training.get("best_epoch") else ""),
        f"  calibration   {training.get('n_val_images', '?')} healthy validation images"
        f"{' (held out from the training images)' if training.get('val_held_out') else ''}",
    ]
    log_fprs = np.log(tables["calibration.fprs"])  # thresholds interpolated in log-FPR, as the detector does
    for fpr in params.get("fprs", []):
        pixel = float(np.interp(np.log(fpr), log_fprs, tables["calibration.pixel_thresholds"]))
        image = float(np.interp(np.log(fpr), log_fprs, tables["calibration.image_thresholds"]))
        lines.append(f"    FPR {fpr:>5.1%}   pixel threshold {pixel:.4f}   image threshold {image:.4f}")
    print("\n".join(lines))
    return 0


def cmd_demo(args) -> int:
    from normdino.demo import run_demo

    from normdino.errors import WeightsNotFoundError

    try:
        result = run_demo(Path(args.output), backbone=args.backbone, image_size=args.image_size, epochs=args.epochs,
                          n_components=args.components, seed=args.seed, progress=not args.quiet)
    except WeightsNotFoundError as err:
        raise WeightsNotFoundError(f"{err} Without weights, 'normdino demo --backbone random' runs the same pipeline "
                                   "with random weights (timing only, quality meaningless).") from None
    print(f"pixel AUROC on the test phantoms: {result.pixel_auroc:.3f}   Dice at {result.fpr:.0%} FPR: {result.dice_at_fpr:.3f}")
    if result.random_backbone:
        print("WARNING: random backbone weights - these numbers say nothing about DINOv2's quality.")
    print(f"model:    {result.model}")
    print(f"overlays: {result.predictions}/*_overlay.png   scores: {result.predictions}/scores.csv")
    return 0


def _print_results(paths: dict, rows: list[dict], random_backbone: bool) -> None:
    from normdino.evaluation.protocol import RANDOM_WARNING, markdown_table

    print(markdown_table(rows))
    if random_backbone:
        print(f"WARNING: {RANDOM_WARNING}")
    print(f"results: {paths['json']}  {paths['markdown']}  report: {paths['html']}")


def _report_options(args):
    """The report and statistics options of evaluate and bench (normdino.evaluation.report_options)."""
    from normdino.evaluation.report_options import ReportOptions

    return ReportOptions(output=Path(args.output), json_path=Path(args.json) if args.json else None,
                         timing_images=args.timing_images, max_eval=args.max_eval, foreground=args.foreground,
                         n_bootstrap=args.bootstrap, compare=_pairs(args.compare), n_permutations=args.permutations,
                         progress=not args.quiet)


def cmd_evaluate(args) -> int:
    from normdino.evaluation.model_evaluation import evaluate_model

    run = evaluate_model(args.model, args.data, _report_options(args), layout=args.layout, sigma=args.sigma,
                         batch_size=args.batch_size, cache_dir=None if args.no_cache else args.cache_dir,
                         mask_suffix=args.mask_suffix, volume_flags=_volume_flags(args), backbone=args.backbone,
                         device=args.device, runtime=args.runtime, precision=args.precision)
    if run is not None:  # None on the ranks other than 0 of a torchrun job
        _print_results(run.paths, run.rows, run.random_backbone)
    return 0


def cmd_bench(args) -> int:
    from normdino.errors import InputError
    from normdino.evaluation.bench import run_bench

    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not names:
        raise InputError("--methods is empty")
    report = _report_options(args)
    report.check_outputs()
    settings, _, _ = _estimator_settings(args, method=names[0])
    if args.no_cache:
        settings["cache_dir"] = None
    method_params = {name: _estimator_settings(args, method=name)[2] for name in names}  # a preset's settings are its own
    run = run_bench(args.data, names, report, settings, layout=args.layout, max_train=args.max_train,
                    seeds=_seeds(args.seeds), runtime=args.runtime or "torch", precision=args.precision,
                    method_params=method_params)
    _print_results(run.paths, run.rows, run.random_backbone)
    return 0


def cmd_serve(args) -> int:
    import os

    try:
        from normdino.serving.app import serve
        from normdino.serving.settings import MB, ServeSettings
    except ImportError as err:
        raise NormdinoError(f'normdino serve needs FastAPI and uvicorn: pip install "normdino[serve]" ({err})') from None
    settings = ServeSettings(max_upload_bytes=int(args.max_upload_mb * MB), concurrency=args.concurrency,
                             max_queue=args.max_queue, result_ttl_s=args.result_ttl,
                             token=args.token or os.environ.get("NORMDINO_TOKEN") or None)
    serve(args.models, host=args.host, port=args.port, settings=settings, device=args.device,
          log_level="warning" if args.quiet else "debug" if args.verbose else "info")
    return 0


def _pairs(values: list[str]) -> tuple[tuple[str, str], ...]:
    """--compare A,B values as pairs; a usage error names a malformed one."""
    pairs = []
    for value in values:
        parts = [p.strip() for p in value.split(",")]
        if len(parts) != 2 or not all(parts):
            raise NormdinoError(f"--compare takes two method names as A,B; got {value!r}")
        pairs.append((parts[0], parts[1]))
    return tuple(pairs)


def _seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise NormdinoError(f"--seeds takes integers as 0,1,2; got {text!r}") from None
    if not seeds:
        raise NormdinoError("--seeds is empty")
    return seeds


def cmd_reproduce(args) -> int:
    from normdino.evaluation.protocol import RANDOM_WARNING
    from normdino.evaluation.reproduce import Settings, reproduce

    settings = Settings(
        datasets=tuple(d.strip().lower() for d in args.datasets.split(",") if d.strip()), backbone=args.backbone,
        image_size=args.image_size, epochs=args.epochs, components=args.components, covariance=args.covariance,
        seeds=_seeds(args.seeds), seed=args.seed, n_bootstrap=args.bootstrap, n_permutations=args.permutations,
        compare=_pairs(args.compare), foreground=args.foreground, max_train=args.max_train, max_eval=args.max_eval,
        timing_images=args.timing_images, batch_size=args.batch_size,
        cache_dir=None if args.no_cache else Path(args.cache_dir), device=args.device, sigma=args.sigma,
        progress=not args.quiet)
    paths = reproduce(args.root, Path(args.output), settings)
    print((Path(paths["markdown"])).read_text())
    if args.backbone == "random" or args.backbone.startswith("random:"):
        print(f"WARNING: {RANDOM_WARNING}")
    print(f"tables: {paths['markdown']}  {paths['json']}  results: {paths['results']}  report: {paths['html']}")
    return 0


ESTIMATOR_COMMANDS = ("fit", "bench")
COMMANDS = {"fit": cmd_fit, "predict": cmd_predict, "info": cmd_info, "demo": cmd_demo,
            "evaluate": cmd_evaluate, "bench": cmd_bench, "serve": cmd_serve,
            "reproduce": cmd_reproduce}


class _ProgressAwareHandler(logging.StreamHandler):
    """Prints log lines through ``tqdm.write``, which lifts any progress bar off the line first."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def _configure_logging(quiet: bool, verbose: bool) -> None:
    """INFO to stderr; ``-q``: errors only (no warnings, no progress bars of the libraries); ``-v``: debug."""
    import os
    import warnings

    level = logging.ERROR if quiet else logging.DEBUG if verbose else logging.INFO
    handler = _ProgressAwareHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s" if not verbose else "%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.ERROR if quiet else logging.WARNING)
    logging.getLogger("normdino").setLevel(level)
    if quiet:
        warnings.filterwarnings("ignore")
        for library in ("transformers", "huggingface_hub", "torch"):
            logging.getLogger(library).setLevel(logging.ERROR)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        if "transformers" in sys.modules:  # already imported (a caller of main): switch its bars off directly
            sys.modules["transformers"].utils.logging.disable_progress_bar()


def _end_progress_bars() -> None:
    """Close every open progress bar, so that a message printed next starts on a line of its own and no bar is
    redrawn after it."""
    std = sys.modules.get("tqdm.std")
    for bar in list(getattr(getattr(std, "tqdm", None), "_instances", ())):
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - a bar that cannot close must not hide the error being reported
            pass


#: errno values that mean "this output cannot be written" (full disk, quota, read-only, permissions).
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO}


def _error(command: str, message: str) -> int:
    _end_progress_bars()
    print(f"normdino {command}: error: {message}", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(estimator_options=bool(argv) and argv[0] in ESTIMATOR_COMMANDS)
    args = parser.parse_args(argv)
    try:
        joined = _join_torchrun_job(args)
    except NormdinoError as err:
        return _error(args.command, str(err))
    _configure_logging(getattr(args, "quiet", False), getattr(args, "verbose", False))
    handler = COMMANDS[args.command]
    try:
        if in_process_group():  # an error on any rank ends every rank with the same message
            with sys.modules["normdino.distributed"].failing_together(args.command):
                code = handler(args)
        else:
            code = handler(args)
        sys.stdout.flush()  # a closed pipe (| head) shows up here, not in an interpreter-exit traceback
        return code
    except NormdinoError as err:
        if not is_main_rank() and type(err).__name__ in ("DistributedError", "PeerFailedError"):
            return 1  # every rank has this message; rank 0 prints it
        return _error(args.command, str(err))
    except BrokenPipeError:  # the reader went away (| head): stop quietly, as a SIGPIPE would
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except MemoryError:
        return _error(args.command, "ran out of memory; use smaller inputs, a smaller --batch-size or a machine "
                                    "with more memory")
    except OSError as err:
        if err.errno not in _WRITE_ERRNOS:
            raise
        verb = "write" if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG) else "access"
        return _error(args.command, f"cannot {verb} {err.filename or 'a file'}: {err.strerror}")
    except KeyboardInterrupt:
        _end_progress_bars()
        print("normdino: interrupted", file=sys.stderr)
        return 130
    finally:
        if joined:
            sys.modules["normdino.distributed"].shutdown()


if __name__ == "__main__":
    sys.exit(main())
