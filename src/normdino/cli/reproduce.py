"""``normdino reproduce``: the DPMM paper's Tables 1-3 on the BMAD sets (normdino.evaluation.reproduce)."""

from __future__ import annotations

from pathlib import Path

from normdino.cli.options import (DEFAULT_CACHE, add_common, add_statistics_options, non_negative_float, pairs,
                                   positive_int, seeds)


def add_parser(sub) -> None:
    """Add the ``reproduce`` command and its options to the subparsers ``sub``."""
    rep = sub.add_parser("reproduce", help="the DPMM paper's Tables 1-3 on the BMAD sets, each cell beside the published figure")
    rep.add_argument("root", help="folder holding BraTS2021_slice/, Liver/ (or its hist_DIY/ variant) and RESC/")
    rep.add_argument("-o", "--output", default="repro", help="folder for tables.md, tables.json, results.json, report.html (default ./repro)")
    rep.add_argument("--datasets", default="brats,liver,resc", help="comma-separated BMAD sets (default brats,liver,resc)")
    rep.add_argument("--backbone", default="dinov2_vits14", help="backbone of every method (default dinov2_vits14; 'random' for timing only)")
    rep.add_argument("--image-size", type=positive_int, default=448)
    rep.add_argument("--epochs", type=positive_int, default=40)
    rep.add_argument("--components", type=positive_int, default=500)
    rep.add_argument("--covariance", choices=("diag", "spherical", "full"), default="diag")
    rep.add_argument("--sigma", type=non_negative_float, default=0.0, help="Gaussian smoothing of the pixel maps (default 0)")
    rep.add_argument("--max-train", type=positive_int, default=None, help="use at most this many training images per set (seeded subset)")
    rep.add_argument("--max-eval", type=positive_int, default=None, help="evaluate on a seeded subset of at most this many images per set")
    rep.add_argument("--timing-images", type=int, default=10, help="images timed at batch size 1 (default 10; 0: no timing)")
    rep.add_argument("--batch-size", type=positive_int, default=8)
    rep.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="token cache folder")
    rep.add_argument("--no-cache", action="store_true")
    rep.add_argument("--device", default="cpu")
    rep.add_argument("--seed", type=int, default=0)
    add_statistics_options(rep, seeds_default="0,1,2,3,4")
    add_common(rep)


def run(args) -> int:
    from normdino.evaluation.protocol import RANDOM_WARNING
    from normdino.evaluation.reproduce import Settings, reproduce

    settings = Settings(
        datasets=tuple(d.strip().lower() for d in args.datasets.split(",") if d.strip()), backbone=args.backbone,
        image_size=args.image_size, epochs=args.epochs, components=args.components, covariance=args.covariance,
        seeds=seeds(args.seeds), seed=args.seed, n_bootstrap=args.bootstrap, n_permutations=args.permutations,
        compare=pairs(args.compare), foreground=args.foreground, max_train=args.max_train, max_eval=args.max_eval,
        timing_images=args.timing_images, batch_size=args.batch_size,
        cache_dir=None if args.no_cache else Path(args.cache_dir), device=args.device, sigma=args.sigma,
        progress=not args.quiet)
    paths = reproduce(args.root, Path(args.output), settings)
    print((Path(paths["markdown"])).read_text())
    if args.backbone == "random" or args.backbone.startswith("random:"):
        print(f"WARNING: {RANDOM_WARNING}")
    print(f"tables: {paths['markdown']}  {paths['json']}  results: {paths['results']}  report: {paths['html']}")
    return 0
