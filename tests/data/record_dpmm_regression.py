"""Records the DPMM regression numbers (tests/data/dpmm_regression.json); the test reads the JSON.

First recorded with the detector before the method interface (commit 23db06e + layout move); recorded again when
the DPMM's EM batches became whole images read in one piece from the token store (issue 22): the old numbers
still matched that code with the row batches (block_rows=1), so the new ones differ by the batches alone.
    python tests/data/record_dpmm_regression.py /tmp/rec tests/data/dpmm_regression.json
"""
import json, sys, numpy as np, torch
from pathlib import Path
from normdino import AnomalyDetector
from normdino.io.phantoms import write_phantom_dataset
from normdino.features.loading import save_random_backbone
torch.set_num_threads(1)
tmp = Path(sys.argv[1]); tmp.mkdir(parents=True, exist_ok=True)
bb = save_random_backbone(tmp / "bb", arch="dinov2_vits14", seed=0, tiny=True)
ph = write_phantom_dataset(tmp / "ph", n_train=12, n_valid=10, n_test_normal=3, n_test_anomalous=3, size=64, seed=0)
pngs = lambda f: sorted(f.glob("*.png"))
d = AnomalyDetector(backbone=str(bb), image_size=112, n_components=16, epochs=3, batch_images=4, progress=False, seed=0)
d.fit(pngs(ph/"train"/"good"), pngs(ph/"valid"/"good"/"img"))
preds = d.predict(pngs(ph/"test"/"Ungood"/"img"), fpr=0.05)
out = {"pixel_thresholds": d.pixel_thresholds_.tolist(), "image_thresholds": d.image_thresholds_.tolist(),
       "calibration_fprs": d.calibration_fprs_.tolist(),
       "patch_maps": [p.patch_map.tolist() for p in preds], "scores": [p.score for p in preds],
       "best_epoch": d.training_summary_["best_epoch"] - 1, "n_prototypes": int(d.method_.n_prototypes)}
json.dump(out, open(sys.argv[2], "w"))
print(out["best_epoch"], out["n_prototypes"], out["scores"])
