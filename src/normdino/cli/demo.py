"""``normdino demo``: fit and predict on generated phantoms (normdino.demo.run_demo)."""

from __future__ import annotations

from pathlib import Path

from normdino.cli.options import add_common, positive_int


def add_parser(sub) -> None:
    """Add the ``demo`` command and its options to the subparsers ``sub``."""
    demo = sub.add_parser("demo", help="fit and predict on generated phantoms; prints pixel AUROC and where the outputs are")
    demo.add_argument("-o", "--output", default="normdino-demo", help="folder for the phantoms, model and outputs (default ./normdino-demo)")
    demo.add_argument("--backbone", default="dinov2_vits14", help="backbone (default dinov2_vits14; 'random' runs without weights, quality meaningless)")
    demo.add_argument("--image-size", type=positive_int, default=448)
    demo.add_argument("--epochs", type=positive_int, default=10)
    demo.add_argument("--components", type=positive_int, default=200)
    demo.add_argument("--seed", type=int, default=0)
    add_common(demo)


def run(args) -> int:
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
