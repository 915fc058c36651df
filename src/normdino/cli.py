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
from normdino.torchrun import in_process_group, is_main_rank, join_job, my_share, world_size

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


def _check_fit_output(output: Path, train, val) -> None:
    """Before any work: the model file can be written, and it is not one of the inputs (it would replace it)."""
    from normdino.errors import OutputError
    from normdino.files import check_writable_file
    from normdino.io.reading import IMAGE_SUFFIXES

    check_writable_file(output, "model file")
    target = output.resolve()
    inputs = [*train.images, *train.volumes, *((val.images + val.volumes) if val else [])]
    if any(Path(p).resolve() == target for p in inputs):
        raise OutputError(f"-o {output} is one of the training or validation inputs; writing the model there would "
                          "destroy it: give another file name, e.g. model.normdino")
    if output.exists() and output.name.lower().endswith((*IMAGE_SUFFIXES, ".nii", ".nii.gz", ".dcm")):
        raise OutputError(f"-o {output} is an existing image or volume; a model would replace it: give another file "
                          "name, e.g. model.normdino")


def _warn_if_validation_overlaps(train, val) -> None:
    """Validation images that are also training images make the calibrated false-positive rates optimistic."""
    if val is None:
        return
    training = {Path(p).resolve() for p in [*train.images, *train.volumes]}
    validation = [*val.images, *val.volumes]
    shared = sum(Path(p).resolve() in training for p in validation)
    if shared:
        log.warning("%d of the %d validation inputs are also training inputs: thresholds calibrated on them give "
                    "optimistic (too low) false-positive rates; use healthy images the model is not fitted on",
                    shared, len(validation))


def _save_model(detector, output: str) -> None:
    """Save the model; a full disk or a vanished folder is one sentence, not a serializer traceback."""
    from normdino.errors import OutputError

    try:
        detector.save(output)
    except OSError as err:
        raise OutputError(f"cannot write the model file {output}: {err.strerror or err}") from None
    except Exception as err:  # safetensors reports I/O failures as its own SafetensorError
        if type(err).__name__ != "SafetensorError":
            raise
        raise OutputError(f"cannot write the model file {output}: {err}") from None


# ---------------------------------------------------------------------- torchrun (normdino.torchrun)


def _join_torchrun_job(args) -> bool:
    """Under torchrun: join the job (normdino.torchrun.join_job); ranks other than 0 stay quiet."""
    joined, args.device = join_job(args.command, getattr(args, "device", None))
    if not is_main_rank():
        args.quiet = True  # progress bars and logs on rank 0 only; errors are agreed and printed there
    return joined


def _warn_if_trained_on_volumes(settings: dict | None, images: list) -> None:
    """2D files are read by the fixed dtype rule; a model whose volumes were scaled per volume saw other values."""
    rule = (settings or {}).get("normalization")
    if images and rule not in (None, "dtype", "none"):
        log.warning("WARNING: this model was fitted on volumes scaled by the %r rule, but %d input(s) are 2D image "
                    "files, read by their data type's range: their intensities may not match the training volumes; "
                    "predict on the volumes themselves, or refit on 2D images", rule, len(images))


def _check_cache(cache_dir) -> None:
    """A token-cache folder that is a file or not writable is one sentence before any work."""
    if cache_dir is not None:
        from normdino.features.cache import check_cache_dir

        check_cache_dir(cache_dir)


def cmd_fit(args) -> int:
    from normdino.detector import AnomalyDetector
    from normdino.io.inputs import resolve_inputs, training_images, warn_unusable
    from normdino.io.reading import MAX_MEGAPIXELS, image_shape
    from normdino.io.slicing import recorded_settings

    settings, detector_kwargs, method_params = _estimator_settings(args)
    if args.print_config:
        from normdino.config import to_yaml

        print(to_yaml(settings), end="")
        return 0
    train = resolve_inputs(args.normal)
    val = resolve_inputs(args.val) if args.val else None
    _check_fit_output(Path(args.output), train, val)
    for inputs in (train, val):
        if inputs is not None:
            warn_unusable(inputs)
    max_megapixels = getattr(args, "max_megapixels", None) or MAX_MEGAPIXELS
    for path in [*train.images, *(val.images if val else [])]:  # one limit for fit and predict, before any work
        image_shape(path, max_megapixels)
    _warn_if_validation_overlaps(train, val)
    _check_cache(None if args.no_cache else settings["cache_dir"])
    options = _volume_flags(args).slice_options() if train.volumes or (val and val.volumes) else None
    detector = AnomalyDetector(
        method=settings["method"], backbone=settings["backbone"], device=settings["device"],
        runtime=args.runtime or "torch", precision=args.precision,
        cache_dir=None if args.no_cache else settings["cache_dir"], progress=not args.quiet,
        volume_settings=recorded_settings(options), **detector_kwargs, **method_params)
    from normdino.errors import WeightsNotFoundError

    try:  # under torchrun each rank embeds its contiguous share of the inputs (_my_share: all of them otherwise)
        detector.fit(training_images(my_share(train), options, max_megapixels=max_megapixels),
                     training_images(my_share(val), options, max_megapixels=max_megapixels) if val else None)
    except WeightsNotFoundError as err:
        raise WeightsNotFoundError(f"{err} {RANDOM_HINT.format(command='fit')}") from None
    if is_main_rank():  # one model file, written by rank 0 after the last collective
        _save_model(detector, args.output)
    summary = detector.training_summary_
    log.info("wrote %s: %s with %d prototypes from %d training images", args.output, detector.method_name,
             summary["n_prototypes"], summary["n_train_images"])
    return 0


def _predict_shares(args, inputs, detector, options, max_megapixels: float) -> int:
    """predict under torchrun: each rank writes the maps of its share; rank 0 writes the one scores.csv (input order),
    summary.json and index.html from every rank's rows."""
    from normdino import distributed as dist
    from normdino.io.writing import PredictionWriter

    def writer(main: bool) -> PredictionWriter:
        return PredictionWriter(detector, Path(args.output), fpr=args.fpr, overlays=not args.no_overlays,
                                progress=not args.quiet, overwrite=args.overwrite, strict=args.strict,
                                max_megapixels=max_megapixels, context={"model": str(args.model)}, prepare=main,
                                csv_name="scores.csv" if main else f".scores.rank{dist.rank()}.csv")

    with dist.failing_together("preparing the results folder"):  # rank 0 cleans it before anyone writes
        mine = writer(True) if dist.is_main() else None
    mine = mine or writer(False)
    everything = [*inputs.images, *inputs.volumes]
    mine.assign_names(everything)  # the same unique names on every rank
    share = my_share(inputs, allow_empty=True)
    with dist.failing_together("predict"):
        if dist.is_main():
            mine.skip_unusable(inputs.unusable)
        mine.write_images(share.images)
        for volume in share.volumes:
            mine.write_volume(volume, options)
    position = {str(p): i for i, p in enumerate(everything)}
    rows = sorted(dist.gather_list(mine.rows), key=lambda row: position.get(row["input"], len(position)))
    mine.adopt_rows(rows, write=dist.is_main())
    if dist.is_main():
        csv_path = mine.finish()
    else:
        mine.csv_path.unlink(missing_ok=True)
        return 0
    if mine.n_written == 0:
        raise NormdinoError(f"none of the {mine.n_skipped} inputs could be read; {csv_path} says why for each")
    if mine.n_skipped:
        log.warning("%d of %d inputs were skipped; %s says why", mine.n_skipped, len(mine.rows), csv_path)
    log.info("wrote maps for %d inputs on %d processes, %s and %s", mine.n_written, dist.world_size(), csv_path,
             csv_path.parent / "index.html")
    return 0


def cmd_predict(args) -> int:
    from normdino.detector import AnomalyDetector
    from normdino.io.inputs import resolve_inputs
    from normdino.io.writing import PredictionWriter

    from normdino.io.writing import DEFAULT_MAX_MEGAPIXELS, check_image_sizes, prepare_results_folder

    # Everything that can be checked is checked before the model and its backbone load.
    inputs = resolve_inputs(args.inputs)
    if is_main_rank():  # under torchrun rank 0 may already be writing there when another rank gets here
        prepare_results_folder(Path(args.output), args.overwrite, check_only=True)
    max_megapixels = args.max_megapixels or DEFAULT_MAX_MEGAPIXELS
    if args.strict and inputs.unusable:
        path, why = inputs.unusable[0]
        raise NormdinoError(f"{path} {why} (stopped by --strict before any work; without it such inputs are skipped)")
    check_image_sizes(inputs.images, max_megapixels, strict=args.strict)
    detector = AnomalyDetector.load(args.model, backbone=args.backbone, device=args.device, progress=not args.quiet,
                                    runtime=args.runtime, precision=args.precision)
    detector.batch_size = args.batch_size
    options = _volume_flags(args).slice_options(detector.volume_settings or {}) if inputs.volumes else None
    _warn_if_trained_on_volumes(detector.volume_settings, inputs.images)
    if in_process_group():
        return _predict_shares(args, inputs, detector, options, max_megapixels)
    writer = PredictionWriter(detector, Path(args.output), fpr=args.fpr, overlays=not args.no_overlays,
                              progress=not args.quiet, overwrite=args.overwrite, strict=args.strict,
                              max_megapixels=max_megapixels, context={"model": str(args.model)})
    writer.assign_names([*inputs.images, *inputs.volumes])
    finished = False
    try:
        writer.skip_unusable(inputs.unusable)
        writer.write_images(inputs.images)
        for volume in inputs.volumes:
            writer.write_volume(volume, options)
        csv_path = writer.finish()
        finished = True
    finally:
        if not finished:  # an interrupted run still gets a report of what it finished (scores.csv is complete)
            try:
                writer.finish()
            except Exception:  # noqa: BLE001 - the original error is the one to report
                pass
    if writer.n_written == 0:
        first = next(row["message"] for row in writer.rows if row["status"] != "ok")
        if writer.n_skipped == 1:
            raise NormdinoError(first)
        raise NormdinoError(f"none of the {writer.n_skipped} inputs could be used (the first: {first}); "
                            f"{csv_path} says why for each")
    if writer.n_skipped:
        log.warning("%d of %d inputs were skipped; %s says why", writer.n_skipped, len(writer.rows), csv_path)
    log.info("wrote maps for %d inputs, %s and %s", writer.n_written, csv_path, csv_path.parent / "index.html")
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


def _check_report_outputs(args) -> None:
    """Before any work: the report folder and the --json file can be written (one sentence if not)."""
    from normdino.files import check_writable_file, check_writable_folder

    check_writable_folder(args.output, "report folder")
    if args.json:
        check_writable_file(args.json, "JSON results file")


def cmd_evaluate(args) -> int:
    from normdino.detector import AnomalyDetector
    from normdino.evaluation.protocol import detector_scorer, evaluate_methods, evaluation_token_sets, write_outputs

    _check_report_outputs(args)
    if args.layout == "volumes" and in_process_group():
        raise NormdinoError("normdino evaluate --layout volumes does not run under torchrun yet; run it as one "
                            "process: python -m normdino evaluate ... --layout volumes")
    cache_dir = None if args.no_cache else Path(args.cache_dir)
    _check_cache(cache_dir)
    detector = AnomalyDetector.load(args.model, backbone=args.backbone, device=args.device, progress=not args.quiet,
                                    runtime=args.runtime, precision=args.precision)
    detector.batch_size = args.batch_size
    sigma = detector.sigma if args.sigma is None else args.sigma
    if args.layout == "volumes":
        from normdino.evaluation.volumes import evaluate_volumes

        paths, rows = evaluate_volumes(detector, Path(args.data), _volume_flags(args).slice_options(detector.volume_settings or {}),
                                       Path(args.output),
                                       json_path=Path(args.json) if args.json else None,
                                       mask_suffix=args.mask_suffix, progress=not args.quiet)
        _print_results(paths, rows, detector.backbone_.is_random)
        return 0
    from normdino.evaluation.datasets import load_dataset

    dataset = load_dataset(args.data, args.layout)
    healthy, test = evaluation_token_sets(detector.backbone_, dataset, cache_dir, args.batch_size, not args.quiet,
                                          args.max_eval, cls=detector.method_.feature_request().cls)
    scorer = detector_scorer(detector)
    results = evaluate_methods([scorer], detector.backbone_, healthy, test, sigma, detector.top_fraction,
                               args.timing_images, **_statistics(args, 0))
    if not is_main_rank():  # under torchrun every rank holds the gathered metrics; rank 0 alone writes them
        return 0
    context = {"model": args.model, "data": args.data, "layout": dataset.layout, **dataset.summary(),
               "healthy_used": len(healthy.every_sample), "evaluated": len(test.every_sample),
               "backbone": detector.backbone_.name, "sigma": sigma}
    if in_process_group():
        context["processes"] = world_size()
    paths = write_outputs(results, [scorer], detector.backbone_, Path(args.output), f"normdino evaluate: {dataset.name}",
                          context, Path(args.json) if args.json else None, sigma,
                          comparisons=_comparisons(results, args, 0))
    _print_results(paths, [r.row for r in results], detector.backbone_.is_random)
    return 0


def cmd_bench(args) -> int:
    from normdino.detector import AnomalyDetector
    from normdino.errors import InputError
    from normdino.evaluation.datasets import load_dataset
    from normdino.evaluation.protocol import (create_methods, evaluate_methods, evaluation_token_sets, feature_union,
                                              fit_methods, subset, token_set, write_outputs)
    from normdino.features.tokens import FeatureRequest

    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not names:
        raise InputError("--methods is empty")
    _check_report_outputs(args)
    settings, detector_kwargs, _ = _estimator_settings(args, method=names[0])
    seed = settings["seed"]
    methods = []
    seeds = _seeds(args.seeds)
    for name in names:
        _, _, method_params = _estimator_settings(args, method=name)  # a preset's settings are its own
        for run_seed in seeds if "shot" in name else (seed,):  # few-shot methods: one fit per seed
            created = create_methods([name], **{**method_params, "seed": run_seed})
            if "shot" in name and len(seeds) > 1:
                created[0].name = f"{name}@{run_seed}"
            methods.extend(created)
    dataset = load_dataset(args.data, args.layout)
    if not dataset.train:
        raise InputError(f"{args.data} has no training images (train/good)")
    train_images = subset(dataset.train, args.max_train, seed)
    from normdino.evaluation.splits import without_training_patients

    dataset = without_training_patients(dataset, train_images)  # calibration never on a training patient's slices
    cache_dir = None if args.no_cache else Path(settings["cache_dir"])
    _check_cache(cache_dir)
    sigma = settings["sigma"]
    layers, cls = feature_union(methods)
    maker = AnomalyDetector(backbone=settings["backbone"], device=settings["device"], runtime=args.runtime or "torch",
                            precision=args.precision, **detector_kwargs)
    backbone = maker.build_backbone(FeatureRequest(layers=layers, cls=cls))
    depth = backbone.num_layers
    layers, _ = feature_union(methods, depth)  # -1 and the last block's number are one layer, extracted once
    if tuple(layers) != tuple(backbone.layers):
        maker.backbone = backbone
        backbone = maker.build_backbone(FeatureRequest(layers=layers, cls=cls))
    progress = not args.quiet
    batch = settings["batch_size"]
    train = token_set(backbone, train_images, cache_dir, batch, progress, cls=cls)
    healthy, test = evaluation_token_sets(backbone, dataset, cache_dir, batch, progress, args.max_eval, seed, cls=cls)
    scorers = fit_methods(methods, layers, train, healthy.tokens, device=backbone.device, progress=progress,
                          depth=depth)
    results = evaluate_methods(scorers, backbone, healthy, test, sigma, settings["top_fraction"], args.timing_images,
                               **_statistics(args, seed))
    context = {"data": args.data, "layout": dataset.layout, **dataset.summary(), "train_used": len(train_images),
               "healthy_used": len(healthy.shapes), "evaluated": len(test.shapes),
               "backbone": backbone.name, "random_weights": backbone.is_random, "image_size": backbone.image_size,
               "normalized_tokens": backbone.normalize, "layers": list(backbone.layers), "sigma": sigma,
               "device": str(backbone.device), "methods": {m.name: m.get_params() for m in methods}}
    summaries = _seed_summaries(results, names, seeds)
    paths = write_outputs(results, scorers, backbone, Path(args.output), f"normdino bench: {dataset.name}", context,
                          Path(args.json) if args.json else None, sigma, comparisons=_comparisons(results, args, seed),
                          summary_rows=summaries)
    _print_results(paths, [r.row for r in results] + summaries, backbone.is_random)
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


def _statistics(args, seed: int) -> dict:
    """evaluate_methods' statistics options from --foreground, --bootstrap."""
    from normdino.evaluation.foreground import foreground_from_option

    return {"foreground": foreground_from_option(args.foreground), "n_bootstrap": args.bootstrap, "seed": seed,
            "progress": not args.quiet}


def _comparisons(results, args, seed: int) -> list[dict] | None:
    """Paired permutation tests asked for with --compare (None when none)."""
    if not args.compare:
        return None
    from normdino.evaluation.assess import compare_methods

    return compare_methods(results, _pairs(args.compare), args.permutations, seed)


def _seed_summaries(results, names: list[str], seeds: tuple[int, ...]) -> list[dict]:
    """One max/mean/min row per few-shot method run over several seeds."""
    from normdino.evaluation.assess import seed_summary

    if len(seeds) < 2:
        return []
    return [seed_summary(name, [r.row for r in results if r.row["method"].startswith(f"{name}@")])
            for name in names if "shot" in name]


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
