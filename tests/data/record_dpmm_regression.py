"""Recorded the DPMM regression numbers (tests/data/dpmm_regression.json) with the detector before the method interface (commit 23db06e + layout move). Kept to show how the numbers were made; the test reads the JSON."""
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
       "best_epoch": d.best_epoch_, "n_prototypes": int(d.prototypes_.shape[0])}
json.dump(out, open(sys.argv[2], "w"))
print(out["best_epoch"], out["n_prototypes"], out["scores"])
