"""``normdino bench``: fit and evaluate several methods on the same tokens (normdino.evaluation.bench)."""

from __future__ import annotations

from normdino.cli.options import (add_common, add_report_options, add_runtime_options, estimator_settings, positive_int,
                                   print_results, report_options, seeds)


def add_parser(sub, estimator_options: bool = False) -> None:
    """Add the ``bench`` command and its options to the subparsers ``sub``."""
    bench = sub.add_parser("bench", help="fit and evaluate several methods on the same tokens; one comparison table and report")
    bench.add_argument("data", help="data set root in BMAD or folder layout")
    bench.add_argument("--layout", default="auto", choices=("auto", "bmad-brain", "bmad-liver", "bmad-resc", "folders"))
    bench.add_argument("--methods", default="dpmm,anomalydino,anomalydino-1shot,patchcore-150",
                       help="comma-separated, of: dpmm, dpmm-euclidean, dpmm-likelihood (the ablation's scores on the same mixture), "
                            "anomalydino, anomalydino-1shot, patchcore-10%%, patchcore-1024, patchcore-150 "
                            "(default dpmm,anomalydino,anomalydino-1shot,patchcore-150)")
    bench.add_argument("--backbone", default=None, help="backbone of every method (default: the first method's, dinov2_vits14 or dinov3_vits16 for himatch; 'random' for timing only)")
    bench.add_argument("--max-train", type=positive_int, default=None, help="use at most this many training images (seeded subset)")
    bench.add_argument("--device", default=None)
    if estimator_options:
        from normdino.config import add_param_options

        add_param_options(bench)
    add_report_options(bench, "normdino-bench", estimator=estimator_options)
    add_runtime_options(bench)
    add_common(bench)


def run(args) -> int:
    from normdino.errors import InputError
    from normdino.evaluation.bench import run_bench

    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not names:
        raise InputError("--methods is empty")
    report = report_options(args)
    report.check_outputs()
    settings, _, _ = estimator_settings(args, method=names[0])
    if args.no_cache:
        settings["cache_dir"] = None
    method_params = {name: estimator_settings(args, method=name)[2] for name in names}  # a preset's settings are its own
    result = run_bench(args.data, names, report, settings, layout=args.layout, max_train=args.max_train,
                       seeds=seeds(args.seeds), runtime=args.runtime or "torch", precision=args.precision,
                       method_params=method_params)
    print_results(result.paths, result.rows, result.random_backbone)
    return 0
