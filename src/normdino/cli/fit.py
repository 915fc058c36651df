"""``normdino fit``: learn a normative model from healthy images or volumes (normdino.workflows.fit)."""

from __future__ import annotations

from normdino.cli.options import (DEFAULT_CACHE, RANDOM_HINT, add_common, add_runtime_options, add_volume_options,
                                   estimator_settings, positive_float, volume_flags)


def add_parser(sub, estimator_options: bool = False) -> None:
    """Add the ``fit`` command and its options to the subparsers ``sub``."""
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
    fit.add_argument("--max-megapixels", type=positive_float, default=None,
                     help="refuse images and volume slices larger than this (default 64, as predict)")
    if estimator_options:
        from normdino.config import add_param_options

        add_param_options(fit)
    add_volume_options(fit)
    add_runtime_options(fit)
    add_common(fit)


def run(args) -> int:
    settings, detector_kwargs, method_params = estimator_settings(args)
    if args.print_config:
        from normdino.config import to_yaml

        print(to_yaml(settings), end="")
        return 0
    from normdino.errors import WeightsNotFoundError
    from normdino.workflows.fit import fit_to_file

    try:
        fit_to_file(args.normal, args.output, val=args.val, volume_flags=volume_flags(args),
                    max_megapixels=getattr(args, "max_megapixels", None),
                    method=settings["method"], backbone=settings["backbone"], device=settings["device"],
                    runtime=args.runtime or "torch", precision=args.precision,
                    cache_dir=None if args.no_cache else settings["cache_dir"], progress=not args.quiet,
                    **detector_kwargs, **method_params)
    except WeightsNotFoundError as err:
        raise WeightsNotFoundError(f"{err} {RANDOM_HINT.format(command='fit')}") from None
    return 0
