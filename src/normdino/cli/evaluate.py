"""``normdino evaluate``: the paper's metrics of a fitted model on a labelled data set
(normdino.evaluation.model_evaluation)."""

from __future__ import annotations

from normdino.cli.options import (add_common, add_report_options, add_runtime_options, add_volume_options, print_results,
                                   report_options, volume_flags)


def add_parser(sub) -> None:
    """Add the ``evaluate`` command and its options to the subparsers ``sub``."""
    evaluate = sub.add_parser("evaluate", help="the paper's metrics of a fitted model on a labelled data set")
    evaluate.add_argument("model", help="model file written by 'normdino fit'")
    evaluate.add_argument("data", help="data set root (BMAD brain/liver/RESC layout, or folders normal/ anomalous/ masks/), or a folder of volumes with <name>_mask volumes")
    evaluate.add_argument("--layout", default="auto", choices=("auto", "bmad-brain", "bmad-liver", "bmad-resc", "folders", "volumes"))
    add_report_options(evaluate, "normdino-evaluation")
    evaluate.add_argument("--backbone", default=None, help="where to load the backbone weights from, if not the name saved in the model")
    evaluate.add_argument("--device", default="cpu", help="cpu, cuda or mps (default cpu); the model may come from any device")
    evaluate.add_argument("--mask-suffix", default="_mask", help="volumes layout: mask of scan.nii.gz is scan<SUFFIX>.nii.gz (default _mask)")
    add_volume_options(evaluate)
    add_runtime_options(evaluate)
    add_common(evaluate)


def run(args) -> int:
    from normdino.evaluation.model_evaluation import evaluate_model

    result = evaluate_model(args.model, args.data, report_options(args), layout=args.layout, sigma=args.sigma,
                            batch_size=args.batch_size, cache_dir=None if args.no_cache else args.cache_dir,
                            mask_suffix=args.mask_suffix, volume_flags=volume_flags(args), backbone=args.backbone,
                            device=args.device, runtime=args.runtime, precision=args.precision)
    if result is not None:  # None on the ranks other than 0 of a torchrun job
        print_results(result.paths, result.rows, result.random_backbone)
    return 0
