"""normdino reproduce end to end on a tiny BMAD-shaped root holding all three sets (tiny random backbone)."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from normdino.cli import main
from normdino.io.report import json_safe
from normdino.evaluation.paper_tables import PAPER_FIGURES
from normdino.io.phantoms import make_phantom


def _write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _phantoms(rng, folder: Path, label_folder: Path | None, names: list[str]) -> None:
    for name in names:
        image, mask = make_phantom(rng, size=32, lesions=2 if label_folder else 0)
        _write(folder / name, (image * 255).astype(np.uint8))
        if label_folder is not None:
            _write(label_folder / name, mask * np.uint8(255))


@pytest.fixture(scope="module")
def bmad_root(tmp_path_factory) -> Path:
    """BraTS (valid only, patient-named slices, as lgg-flair), Liver (hist_DIY variant) and RESC, a few images each."""
    root = tmp_path_factory.mktemp("bmad_root")
    rng = np.random.default_rng(0)
    brats = root / "BraTS2021_slice"
    _phantoms(rng, brats / "train/good", None, [f"T{p}_2000_{s}.png" for p in range(3) for s in range(2)])
    _phantoms(rng, brats / "valid/good/img", None, [f"V{p}_2001_{s}.png" for p in range(3) for s in range(2)])
    _phantoms(rng, brats / "valid/Ungood/img", brats / "valid/Ungood/label", [f"V{p}_2001_{s}.png" for p in range(3) for s in range(5, 6)])
    liver = root / "Liver" / "hist_DIY"
    _phantoms(rng, liver / "train/good", None, [f"l{i}.png" for i in range(5)])
    for split in ("valid", "test"):
        _phantoms(rng, liver / f"{split}/img/good", None, [f"{split}{i}.png" for i in range(3)])
        _phantoms(rng, liver / f"{split}/img/Ungood", liver / f"{split}/label/Ungood", [f"{split}u{i}.png" for i in range(2)])
    resc = root / "RESC"
    _phantoms(rng, resc / "Train/train/good", None, [f"r{i}.png" for i in range(5)])
    for upper, lower in (("Val", "val"), ("Test", "test")):
        _phantoms(rng, resc / f"{upper}/{lower}/good", None, [f"{lower}{i}.png" for i in range(3)])
        _phantoms(rng, resc / f"{upper}/{lower}/Ungood", resc / f"{upper}/{lower}_label/Ungood", [f"{lower}u{i}.png" for i in range(2)])
    return root


def test_reproduce_writes_the_three_tables_for_all_three_sets(bmad_root, tiny_dinov2_dir, tmp_path, capsys):
    out = tmp_path / "repro"
    code = main(["reproduce", str(bmad_root), "--backbone", str(tiny_dinov2_dir), "--image-size", "28",
                 "--epochs", "1", "--components", "4", "--seeds", "0,1", "--bootstrap", "20", "--permutations", "50",
                 "--timing-images", "0", "--no-cache", "-o", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    text = (out / "tables.json").read_text()
    tables = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert tables["random_backbone"] is True
    for name in ("table1", "table2", "table3", "table1_foreground"):
        table = tables["tables"][name]
        assert "RANDOM weights" in table["warning"]
        assert {c["dataset"] for c in table["cells"]} == {"brats", "liver", "resc"}
        with_paper = [c for c in table["cells"] if c["paper"] is not None]
        assert bool(with_paper) == (name != "table1_foreground")  # the paper reports whole-image figures only
        assert all(c["difference"] == pytest.approx(c["ours"] - c["paper"]) for c in with_paper if c["ours"] is not None)
    t1 = [c for c in tables["tables"]["table1"]["cells"] if c["dataset"] == "liver"]
    assert {c["method"] for c in t1} == set(PAPER_FIGURES["table1"])
    shot = next(c for c in t1 if c["method"] == "anomalydino-1shot" and c["metric"] == "pixel_auroc")
    assert shot["seeds"]["min"] <= shot["ours"] <= shot["seeds"]["max"]
    dpmm = next(c for c in t1 if c["method"] == "dpmm" and c["metric"] == "pixel_auroc")
    assert dpmm["ci"][0] <= dpmm["ci"][1]
    assert next(c for c in t1 if c["method"] == "dpmm" and c["metric"] == "ms_per_sample")["ours"] is None  # untimed

    results = json.loads((out / "results.json").read_text())
    brats = next(d for d in results["datasets"] if d["dataset"] == "brats")
    assert brats["calibration"].startswith("out-of-sample by patient: 2 folds")  # valid only: cross-fitted
    liver = next(d for d in results["datasets"] if d["dataset"] == "liver")
    assert liver["folder"].endswith("hist_DIY") and liver["calibration"].startswith("out-of-sample: healthy")
    methods = [r["method"] for r in liver["rows"]]
    assert methods[:6] == ["dpmm", "dpmm-euclidean", "dpmm-likelihood", "dpmm-raw", "dpmm-euclidean-raw",
                           "dpmm-likelihood-raw"]
    assert {"anomalydino-1shot@0", "anomalydino-1shot@1", "patchcore-150"} <= set(methods)
    assert {(c["a"], c["b"]) for c in liver["comparisons"]} >= {("dpmm", "patchcore-150")}
    markdown = (out / "tables.md").read_text()
    assert markdown.count("RANDOM weights") >= 7 and "AUROC % paper" in markdown and "Schulthess" in markdown
    html = (out / "report.html").read_text()
    assert "RANDOM weights" in html and "Table 3" in html


def test_json_safe_writes_null_for_undefined_metrics():
    text = json.dumps(json_safe({"a": float("nan"), "b": [np.float32(1.5), float("inf")], "c": np.int64(3)}),
                      allow_nan=False)
    assert json.loads(text) == {"a": None, "b": [1.5, None], "c": 3}


def test_reproduce_times_every_method_in_one_loop_and_compares_the_sum(bmad_root, tiny_dinov2_dir, tmp_path,
                                                                       monkeypatch, capsys):
    """A root with the liver set only: one interleaved timing loop over all 11 methods and seeds; ms = backbone +
    scoring beside the paper's 35 ms; BraTS and RESC are reported as not found, with no rows."""
    import shutil

    from normdino.evaluation import timing

    root = tmp_path / "root"
    shutil.copytree(bmad_root / "Liver", root / "Liver")
    calls, real = [], timing.time_methods

    def recording(backbone, scorers, images, *args, **kwargs):
        calls.append(([s.name for s in scorers], len(images)))
        return real(backbone, scorers, images, *args, **kwargs)

    monkeypatch.setattr(timing, "time_methods", recording)
    out = tmp_path / "repro"
    code = main(["reproduce", str(root), "--datasets", "liver", "--backbone", str(tiny_dinov2_dir),
                 "--image-size", "28", "--epochs", "1", "--components", "4", "--seeds", "0,1", "--bootstrap", "0", "--permutations", "20",
                 "--timing-images", "2", "--no-cache", "-o", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert calls == [(["dpmm", "dpmm-euclidean", "dpmm-likelihood", "dpmm-raw", "dpmm-euclidean-raw",
                       "dpmm-likelihood-raw", "anomalydino", "patchcore-10%", "patchcore-1024", "patchcore-150",
                       "anomalydino-1shot@0", "anomalydino-1shot@1"], 2)]
    tables = json.loads((out / "tables.json").read_text())
    assert tables["not_found"] == ["BraTS2021", "RESC"]
    cells = {(c["method"], c["metric"]): c for c in tables["tables"]["table1"]["cells"]}
    assert {c["dataset"] for c in cells.values()} == {"liver"}
    backbone, scoring, total = (cells[("dpmm", m)]["ours"] for m in ("backbone_ms", "scoring_ms", "ms_per_sample"))
    assert backbone > 0 and scoring > 0 and total == pytest.approx(backbone + scoring, abs=2e-3)
    assert cells[("dpmm", "ms_per_sample")]["paper"] == 35
    assert cells[("dpmm", "ms_per_sample")]["difference"] == pytest.approx(total - 35)
    assert cells[("dpmm", "backbone_ms")]["paper"] is None and cells[("dpmm", "scoring_state_mb")]["ours"] > 0
    markdown = (out / "tables.md").read_text()
    assert "Not found under the root (no rows, no comparison): BraTS2021, RESC." in markdown
    assert "### BraTS2021" not in markdown and "image by image" in markdown
