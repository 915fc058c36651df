"""``normdino weights``: import backbone weights for a machine without internet, and list them
(normdino.features.weights)."""

from __future__ import annotations


def add_parser(sub) -> None:
    """Add the ``weights import`` and ``weights list`` commands to the subparsers ``sub``."""
    weights = sub.add_parser("weights", help="import DINOv2/DINOv3 weights for offline use, list them")
    actions = weights.add_subparsers(dest="action", required=True)
    imports = actions.add_parser(
        "import", help="import an official checkpoint (.pth) or a Hugging Face model folder",
        description="Convert an official DINOv2/DINOv3 checkpoint (e.g. dinov2_vits14_pretrain.pth, "
                    "dinov3_vits16_pretrain_lvd1689m-08c60483.pth) or copy a Hugging Face folder (config.json + "
                    "model.safetensors) into the offline store, where --backbone ALIAS finds it without internet.")
    imports.add_argument("source", help="the .pth file or the Hugging Face model folder")
    imports.add_argument("--arch", default=None, help="the alias to import as, e.g. dinov2_vits14 (default: "
                                                      "recognised from the tensors or config.json)")
    imports.add_argument("--store", default=None, help="the store folder (default $NORMDINO_WEIGHTS_DIR or "
                                                       "~/.cache/normdino/weights)")
    imports.add_argument("--overwrite", action="store_true", help="replace weights already imported for this alias")
    listing = actions.add_parser("list", help="the imported weights, with their checksums")
    listing.add_argument("--store", default=None, help="the store folder (default as for import)")


def run(args) -> int:
    from normdino.features.weights import default_weights_dir, import_weights, list_weights

    if args.action == "import":
        entry = import_weights(args.source, store=args.store, arch=args.arch, overwrite=args.overwrite)
        print(f"imported {args.source} as {entry.alias} into {entry.folder} (sha256 {entry.record['sha256']}); "
              f"use it with --backbone {entry.alias}")
        return 0
    entries = list_weights(args.store)
    if not entries:
        print(f"no weights imported in {args.store or default_weights_dir()}")
        return 0
    for entry in entries:
        record = entry.record
        print(f"{entry.alias:<22} {record.get('format', '?'):<20} sha256 {str(record.get('sha256', '?'))[:16]}  "
              f"from {record.get('source', '?')} ({record.get('imported', '?')})  {entry.folder}")
    return 0
