"""``normdino info``: describe a model file, after checking it in full as predict does."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    """Add the ``info`` command and its options to the subparsers ``sub``."""
    info = sub.add_parser("info", help="describe a model file")
    info.add_argument("model")
    info.add_argument("--json", action="store_true", help="print the full header as JSON")


def run(args) -> int:
    """Describe a model after checking it in full, exactly as predict does (a file info calls healthy loads)."""
    import numpy as np

    from normdino.model_checks import read_checked_model

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
