"""The ``normdino`` command line: fit, predict, info, evaluate, bench, demo.

Every user error ends in one readable line on stderr and exit code 1; usage errors exit with 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

from normdino import __version__
from normdino.errors import NormdinoError

log = logging.getLogger("normdino")

DEFAULT_CACHE = Path.home() / ".cache" / "normdino" / "tokens"


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


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or log messages, only errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _add_volume_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "volumes (NIfTI / DICOM)",
        "predict and evaluate take the model's axis and intensity settings unless given again")
    group.add_argument("--axis", default=None, help="slicing axis: axial, coronal, sagittal, or an array axis 0/1/2 (default axial)")
    group.add_argument("--slices", default=None, help="slice range along the axis, e.g. 60:100")
    group.add_argument("--min-foreground", type=float, default=0.0, help="skip slices whose foreground fraction is below this (0..1)")
    group.add_argument("--window", default=None, help="CT window in HU as LOW,HIGH, e.g. -200,250 (default: percentile clipping)")
    group.add_argument("--percentiles", default=None, help="MRI intensity clipping percentiles (default 0.5,99.5)")
    group.add_argument("--normalization", choices=("percentile", "window", "dtype", "none"), default=None,
                       help="intensity scaling per volume: percentile (default; MRI), window (CT, with --window), "
                            "dtype (uint8 volumes /255, the same values as 8-bit PNG slices), none")
    group.add_argument("--volume-index", type=int, default=None, help="which volume of a 4D NIfTI to use")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="normdino",
        description="Anomaly detection and segmentation in medical images with a normative model of DINO patch embeddings.")
    parser.add_argument("--version", action="version", version=f"normdino {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fit = sub.add_parser("fit", help="learn a normative model from healthy images or volumes")
    fit.add_argument("normal", nargs="+", help="healthy training images: folders, globs, files, NIfTI/DICOM volumes")
    fit.add_argument("-o", "--output", required=True, help="model file to write (e.g. model.normdino)")
    fit.add_argument("--val", nargs="+", default=None, help="healthy validation images for model selection and thresholds (default: hold out 10%% of the training images)")
    fit.add_argument("--backbone", default="dinov2_vits14", help="hub name, alias (dinov2_vits14, dinov3_vits16, ...), local directory, or 'random' (meaningless quality, for trying things out)")
    fit.add_argument("--image-size", type=int, default=448, help="backbone input side in pixels (default 448)")
    fit.add_argument("--layer", type=int, default=-1, help="transformer layer of the tokens (default -1: last, after the final norm)")
    fit.add_argument("--no-normalize", action="store_true", help="do not L2-normalise the tokens (ablation)")
    fit.add_argument("--epochs", type=int, default=40, help="EM epochs (default 40)")
    fit.add_argument("--components", type=int, default=500, help="truncation level K of the mixture (default 500)")
    fit.add_argument("--covariance", choices=("diag", "spherical", "full"), default="diag", help="covariance type (default diag)")
    fit.add_argument("--score", choices=("cosine", "euclidean", "likelihood"), default="cosine", help="anomaly score (default cosine, the paper's)")
    fit.add_argument("--sigma", type=float, default=0.0, help="Gaussian smoothing of the pixel maps, in pixels (default 0)")
    fit.add_argument("--fpr", type=_fpr, nargs="+", default=[0.01, 0.05, 0.10], help="false-positive rates to calibrate (default 0.01 0.05 0.10)")
    fit.add_argument("--batch-size", type=int, default=8, help="images per backbone forward pass (default 8)")
    fit.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help=f"token cache folder (default {DEFAULT_CACHE})")
    fit.add_argument("--no-cache", action="store_true", help="do not cache tokens on disk")
    fit.add_argument("--device", default="cpu", help="cpu, cuda or mps (default cpu)")
    fit.add_argument("--seed", type=int, default=0)
    _add_volume_options(fit)
    _add_common(fit)

    predict = sub.add_parser("predict", help="anomaly maps, masks, overlays and scores for images or volumes")
    predict.add_argument("model", help="model file written by 'normdino fit'")
    predict.add_argument("inputs", nargs="+", help="images or volumes: folders, globs, files")
    predict.add_argument("-o", "--output", required=True, help="output folder")
    predict.add_argument("--fpr", type=_fpr, default=None, help="false-positive rate of the masks (default: the model's, 0.05)")
    predict.add_argument("--no-overlays", action="store_true", help="skip the overlay PNGs")
    predict.add_argument("--backbone", default=None, help="where to load the backbone weights from, if not the name saved in the model")
    predict.add_argument("--batch-size", type=int, default=8)
    predict.add_argument("--device", default="cpu")
    _add_volume_options(predict)
    _add_common(predict)

    info = sub.add_parser("info", help="describe a model file")
    info.add_argument("model")
    info.add_argument("--json", action="store_true", help="print the full header as JSON")

    demo = sub.add_parser("demo", help="fit and predict on generated phantoms; prints pixel AUROC and where the outputs are")
    demo.add_argument("-o", "--output", default="normdino-demo", help="folder for the phantoms, model and outputs (default ./normdino-demo)")
    demo.add_argument("--backbone", default="dinov2_vits14", help="backbone (default dinov2_vits14; 'random' runs without weights, quality meaningless)")
    demo.add_argument("--image-size", type=int, default=448)
    demo.add_argument("--epochs", type=int, default=10)
    demo.add_argument("--components", type=int, default=200)
    demo.add_argument("--seed", type=int, default=0)
    _add_common(demo)

    evaluate = sub.add_parser("evaluate", help="the paper's metrics of a fitted model on a labelled data set")
    evaluate.add_argument("model", help="model file written by 'normdino fit'")
    evaluate.add_argument("data", help="data set root (BMAD brain/liver/RESC layout, or folders normal/ anomalous/ masks/), or a folder of volumes with <name>_mask volumes")
    evaluate.add_argument("--layout", default="auto", choices=("auto", "bmad-brain", "bmad-liver", "bmad-resc", "folders", "volumes"))
    _add_report_options(evaluate, "normdino-evaluation")
    evaluate.add_argument("--backbone", default=None, help="where to load the backbone weights from, if not the name saved in the model")
    evaluate.add_argument("--mask-suffix", default="_mask", help="volumes layout: mask of scan.nii.gz is scan<SUFFIX>.nii.gz (default _mask)")
    _add_volume_options(evaluate)
    _add_common(evaluate)

    bench = sub.add_parser("bench", help="fit and evaluate several methods on the same tokens; one comparison table and report")
    bench.add_argument("data", help="data set root in BMAD or folder layout")
    bench.add_argument("--layout", default="auto", choices=("auto", "bmad-brain", "bmad-liver", "bmad-resc", "folders"))
    bench.add_argument("--methods", default="dpmm,anomalydino,anomalydino-1shot,patchcore-150",
                       help="comma-separated, of: dpmm, dpmm-euclidean, dpmm-likelihood (the ablation's scores on the same mixture), "
                            "anomalydino, anomalydino-1shot, patchcore-10%%, patchcore-1024, patchcore-150 "
                            "(default dpmm,anomalydino,anomalydino-1shot,patchcore-150)")
    bench.add_argument("--backbone", default="dinov2_vits14", help="backbone of every method (default dinov2_vits14; 'random' for timing only)")
    bench.add_argument("--image-size", type=int, default=448)
    bench.add_argument("--no-normalize", action="store_true", help="do not L2-normalise the tokens (ablation)")
    bench.add_argument("--epochs", type=int, default=40)
    bench.add_argument("--components", type=int, default=500)
    bench.add_argument("--covariance", choices=("diag", "spherical", "full"), default="diag")
    bench.add_argument("--max-train", type=int, default=None, help="use at most this many training images (seeded subset)")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--device", default="cpu")
    _add_report_options(bench, "normdino-bench")
    _add_common(bench)
    _add_serve_parser(sub)
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


def _add_report_options(parser: argparse.ArgumentParser, default_dir: str) -> None:
    parser.add_argument("-o", "--output", default=default_dir, help=f"folder for results.json, results.md and report.html (default ./{default_dir})")
    parser.add_argument("--json", default=None, help="write the JSON results here instead of OUTPUT/results.json")
    parser.add_argument("--sigma", type=float, default=None, help="Gaussian smoothing of the pixel maps (default: the model's / 0)")
    parser.add_argument("--timing-images", type=int, default=10, help="images timed at batch size 1 (default 10)")
    parser.add_argument("--max-eval", type=int, default=None, help="evaluate on a seeded subset of at most this many images (labels kept in proportion)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="token cache folder")
    parser.add_argument("--no-cache", action="store_true")


# ---------------------------------------------------------------------- commands


INTENSITY_SETTINGS = ("axis", "normalization", "window", "percentiles")


def _slice_options(args, model_settings: dict | None = None):
    """Slice options from the command line; unset axis/intensity settings come from the model (field by field,
    see io.volumes.merge_slice_settings), then the defaults."""
    from normdino.io.volumes import SliceOptions, merge_slice_settings

    if model_settings is None and args.command != "fit":  # a model fitted on 2D images only: match their rule
        model_settings = {}
    settings = merge_slice_settings(model_settings, {key: getattr(args, key) for key in INTENSITY_SETTINGS})
    try:
        percentiles = tuple(float(v) for v in str(settings["percentiles"]).split(","))
    except ValueError:
        raise NormdinoError(f"--percentiles takes LOW,HIGH, e.g. 0.5,99.5; got {settings['percentiles']!r}") from None
    axis = int(settings["axis"]) if str(settings["axis"]).isdigit() else settings["axis"]
    window = settings["window"]
    return SliceOptions(axis=axis, slices=args.slices, min_foreground=args.min_foreground,
                        normalization=settings["normalization"], percentiles=percentiles,
                        window=",".join(map(str, window)) if isinstance(window, (list, tuple)) else window,
                        volume_index=args.volume_index, fallback=settings["fallback"])


def _intensity_settings(options) -> dict:
    """What predict needs to scale 2D images and slice and scale volumes as the training data were."""
    from normdino.io.reading import IMAGE_INTENSITY

    if options is None:  # 2D images only
        return {"image_intensity": IMAGE_INTENSITY}
    window = list(options.window) if options.window is not None else None
    return {"axis": options.axis, "normalization": options.normalization, "window": window,
            "percentiles": ",".join(map(str, options.percentiles)), "image_intensity": IMAGE_INTENSITY}


def cmd_fit(args) -> int:
    from normdino.detector import AnomalyDetector
    from normdino.io.inputs import resolve_inputs, training_images

    train = resolve_inputs(args.normal)
    val = resolve_inputs(args.val) if args.val else None
    options = _slice_options(args) if train.volumes or (val and val.volumes) else None
    detector = AnomalyDetector(
        backbone=args.backbone, image_size=args.image_size, layer=args.layer, normalize=not args.no_normalize,
        n_components=args.components, covariance_type=args.covariance, epochs=args.epochs, score=args.score,
        sigma=args.sigma, fprs=sorted(set(args.fpr)), cache_dir=None if args.no_cache else args.cache_dir,
        device=args.device, batch_size=args.batch_size, seed=args.seed, progress=not args.quiet,
        volume_settings=_intensity_settings(options))
    detector.fit(training_images(train, options), training_images(val, options) if val else None)
    detector.save(args.output)
    summary = detector.training_summary_
    log.info("wrote %s: %d prototypes from %d training images (best epoch %d)", args.output,
             summary["n_prototypes"], summary["n_train_images"], summary["best_epoch"])
    return 0


def cmd_predict(args) -> int:
    from normdino.detector import AnomalyDetector
    from normdino.io.inputs import resolve_inputs
    from normdino.io.writing import PredictionWriter

    detector = AnomalyDetector.load(args.model, backbone=args.backbone, device=args.device, progress=not args.quiet)
    detector.batch_size = args.batch_size
    inputs = resolve_inputs(args.inputs)
    options = _slice_options(args, detector.volume_settings) if inputs.volumes else None
    writer = PredictionWriter(detector, Path(args.output), fpr=args.fpr, overlays=not args.no_overlays,
                              progress=not args.quiet)
    writer.write_images(inputs.images)
    for volume in inputs.volumes:
        writer.write_volume(volume, options)
    csv_path = writer.finish()
    log.info("wrote maps for %d inputs and %s", writer.n_written, csv_path)
    return 0


def cmd_info(args) -> int:
    from normdino.detector import read_model_file

    header, tensors = read_model_file(args.model)
    if args.json:
        print(json.dumps(header, indent=2))
        return 0
    backbone, params, training = header["backbone"], header["detector"], header.get("training", {})
    lines = [
        f"normdino model {args.model} (format {header['format_version']}, written by normdino {header['normdino_version']})",
        f"  backbone      {backbone['name']}{'  [RANDOM WEIGHTS: quality meaningless]' if backbone['is_random'] else ''}",
        f"                patch {backbone['patch_size']}, input {backbone['image_size']} px, layers {backbone['layers']}, dim {backbone['embed_dim']}",
        f"  mixture       K={header['mixture'].get('n_components')}, {header['mixture'].get('covariance_type')} covariance, "
        f"{tensors['prototypes'].shape[0]} active prototypes",
        f"  score         {params['score']} (normalised tokens: {params['normalize']}, smoothing sigma {params['sigma']})",
        f"  training      {training.get('n_train_images', '?')} images, {training.get('n_train_tokens', '?')} tokens, "
        f"best epoch {training.get('best_epoch', '?')} of {params['epochs']}",
        f"  calibration   {training.get('n_val_images', '?')} healthy validation images"
        f"{' (held out from the training images)' if training.get('val_held_out') else ''}",
    ]
    from normdino.detector import _threshold_from_table

    fprs = tensors["calibration.fprs"].numpy()
    for fpr in params["fprs"]:
        pixel = _threshold_from_table(fprs, tensors["calibration.pixel_thresholds"].numpy(), fpr)
        image = _threshold_from_table(fprs, tensors["calibration.image_thresholds"].numpy(), fpr)
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


def cmd_evaluate(args) -> int:
    from normdino.detector import AnomalyDetector
    from normdino.evaluation.protocol import detector_scorer, evaluate_methods, evaluation_token_sets, write_outputs

    cache_dir = None if args.no_cache else Path(args.cache_dir)
    detector = AnomalyDetector.load(args.model, backbone=args.backbone, progress=not args.quiet)
    detector.batch_size = args.batch_size
    sigma = detector.sigma if args.sigma is None else args.sigma
    if args.layout == "volumes":
        from normdino.evaluation.volumes import evaluate_volumes

        paths, rows = evaluate_volumes(detector, Path(args.data), _slice_options(args, detector.volume_settings),
                                       Path(args.output),
                                       json_path=Path(args.json) if args.json else None,
                                       mask_suffix=args.mask_suffix, progress=not args.quiet)
        _print_results(paths, rows, detector.backbone_.is_random)
        return 0
    from normdino.evaluation.datasets import load_dataset

    dataset = load_dataset(args.data, args.layout)
    healthy, test = evaluation_token_sets(detector.backbone_, dataset, cache_dir, args.batch_size, not args.quiet,
                                          args.max_eval)
    scorer = detector_scorer(detector, "dpmm" if detector.score == "cosine" else f"dpmm-{detector.score}")
    results = evaluate_methods([scorer], detector.backbone_, healthy, test, sigma, detector.top_fraction,
                               args.timing_images)
    context = {"model": args.model, "data": args.data, "layout": dataset.layout, **dataset.summary(),
               "healthy_used": len(healthy.shapes), "evaluated": len(test.shapes),
               "backbone": detector.backbone_.name, "sigma": sigma}
    paths = write_outputs(results, [scorer], detector.backbone_, Path(args.output), f"normdino evaluate: {dataset.name}",
                          context, Path(args.json) if args.json else None, sigma)
    _print_results(paths, [r.row for r in results], detector.backbone_.is_random)
    return 0


def cmd_bench(args) -> int:
    from normdino.detector import AnomalyDetector
    from normdino.evaluation.datasets import load_dataset
    from normdino.errors import InputError
    from normdino.evaluation.protocol import evaluate_methods, evaluation_token_sets, fit_methods, subset, token_set, write_outputs

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise InputError("--methods is empty")
    dataset = load_dataset(args.data, args.layout)
    if not dataset.train:
        raise InputError(f"{args.data} has no training images (train/good)")
    train_images = subset(dataset.train, args.max_train, args.seed)
    cache_dir = None if args.no_cache else Path(args.cache_dir)
    sigma = args.sigma or 0.0
    backbone = AnomalyDetector(backbone=args.backbone, image_size=args.image_size, normalize=not args.no_normalize,
                               device=args.device, seed=args.seed)._build_backbone()
    progress = not args.quiet
    train = token_set(backbone, train_images, cache_dir, args.batch_size, progress)
    healthy, test = evaluation_token_sets(backbone, dataset, cache_dir, args.batch_size, progress, args.max_eval,
                                          args.seed)
    params = dict(n_components=args.components, covariance_type=args.covariance, epochs=args.epochs, sigma=sigma,
                  image_size=args.image_size, normalize=not args.no_normalize, progress=progress)
    scorers = fit_methods(methods, backbone, train, healthy, params, seed=args.seed)
    results = evaluate_methods(scorers, backbone, healthy, test, sigma, 0.01, args.timing_images)
    context = {"data": args.data, "layout": dataset.layout, **dataset.summary(), "train_used": len(train_images),
               "healthy_used": len(healthy.shapes), "evaluated": len(test.shapes),
               "backbone": backbone.name, "random_weights": backbone.is_random, "image_size": backbone.image_size,
               "normalized_tokens": not args.no_normalize, "epochs": args.epochs, "components": args.components,
               "covariance": args.covariance, "sigma": sigma, "device": args.device}
    paths = write_outputs(results, scorers, backbone, Path(args.output), f"normdino bench: {dataset.name}", context,
                          Path(args.json) if args.json else None, sigma)
    _print_results(paths, [r.row for r in results], backbone.is_random)
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


COMMANDS = {"fit": cmd_fit, "predict": cmd_predict, "info": cmd_info, "demo": cmd_demo,
            "evaluate": cmd_evaluate, "bench": cmd_bench, "serve": cmd_serve}


def _configure_logging(quiet: bool, verbose: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s" if not verbose else "%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("normdino").setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(getattr(args, "quiet", False), getattr(args, "verbose", False))
    handler = COMMANDS[args.command]
    try:
        return handler(args)
    except NormdinoError as err:
        print(f"normdino {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("normdino: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
