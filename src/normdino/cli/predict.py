"""``normdino predict``: maps, masks, overlays and scores into a results folder (normdino.workflows.predict)."""

from __future__ import annotations

from normdino.cli.options import (add_common, add_runtime_options, add_volume_options, batch_size, dicom_out, fpr,
                                  positive_float, volume_flags)


def add_parser(sub) -> None:
    """Add the ``predict`` command and its options to the subparsers ``sub``."""
    predict = sub.add_parser("predict", help="anomaly maps, masks, overlays and scores for images or volumes")
    predict.add_argument("model", help="model file written by 'normdino fit'")
    predict.add_argument("inputs", nargs="+", help="images or volumes: folders, globs, files")
    predict.add_argument("-o", "--output", required=True, help="output folder")
    predict.add_argument("--fpr", type=fpr, default=None, help="false-positive rate of the masks (default: the model's, 0.05)")
    predict.add_argument("--no-overlays", action="store_true", help="skip the overlay PNGs")
    predict.add_argument("--backbone", default=None, help="where to load the backbone weights from, if not the name saved in the model")
    predict.add_argument("--batch-size", type=batch_size, default=None,
                         help="images per backbone forward pass (default auto: the measured best for the device and "
                              "runtime: one image per core for torch on a CPU, 8 for onnx, 64 on a GPU)")
    predict.add_argument("--overwrite", action="store_true",
                         help="replace the results of an earlier predict in OUTPUT (without it, a folder that already "
                              "holds files is refused, so no earlier result is ever lost)")
    predict.add_argument("--strict", action="store_true",
                         help="stop at the first input that cannot be read (default: skip it with a warning and a "
                              "'skipped' row in scores.csv saying why)")
    predict.add_argument("--max-megapixels", type=positive_float, default=None,
                         help="refuse images and volume slices larger than this (default 64: predict needs about 40 "
                              "bytes per pixel)")
    predict.add_argument("--device", default="cpu")
    predict.add_argument("--dicom-out", type=dicom_out, default=None, metavar="seg,pmap|none",
                         help="for DICOM series inputs, also write a DICOM Segmentation (seg) and a Parametric Map "
                              "(pmap) that viewers lay over the scan (default: both)")
    predict.add_argument("--anonymize", action="store_true",
                         help="DICOM outputs get empty patient and study identifiers, and export results are "
                              "filed under numbered patient/study folders instead of IDs and dates")
    add_volume_options(predict)
    add_runtime_options(predict)
    add_common(predict)


def run(args) -> int:
    from normdino.workflows.predict import predict_to_folder

    predict_to_folder(args.model, args.inputs, args.output, volume_flags=volume_flags(args), fpr=args.fpr,
                      overlays=not args.no_overlays, overwrite=args.overwrite, strict=args.strict,
                      max_megapixels=args.max_megapixels, progress=not args.quiet, dicom_out=args.dicom_out,
                      anonymize=args.anonymize, backbone=args.backbone,
                      device=args.device, runtime=args.runtime, precision=args.precision, batch_size=args.batch_size)
    return 0
