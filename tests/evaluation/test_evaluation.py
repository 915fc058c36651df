"""normdino evaluate / bench end to end on phantoms in the BMAD brain layout, with a tiny random backbone."""

import json

import numpy as np
import pytest
import torch

from normdino.cli import main
from normdino.evaluation.protocol import PeakMemory, Scorer, TokenSet, evaluate_scorer, markdown_table
from normdino.evaluation.datasets import Sample
from normdino.io.phantoms import write_phantom_dataset

REQUIRED_KEYS = {"method", "pixel_auroc", "pixel_aupr", "dice_fpr10", "dice_fpr5", "dice_fpr1", "image_auroc",
                 "ms_per_sample", "peak_memory_mb", "n_prototypes"}


@pytest.fixture(scope="module")
def bmad(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("bmad"), n_train=10, n_valid=6, n_test_normal=3,
                                 n_test_anomalous=4, size=48, seed=3)


def test_bench_writes_one_comparison_table(bmad, tiny_dinov2_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(["bench", str(bmad), "--methods", "dpmm,dpmm-euclidean,anomalydino,anomalydino-1shot,patchcore-150",
                 "--backbone", str(tiny_dinov2_dir), "--image-size", "56", "--epochs", "2", "--components", "8",
                 "--timing-images", "2", "--no-cache", "-o", str(out), "--json", str(tmp_path / "r.json"), "--quiet"])
    assert code == 0
    payload = json.loads((tmp_path / "r.json").read_text())
    rows = payload["rows"]
    assert [r["method"] for r in rows] == ["dpmm", "dpmm-euclidean", "anomalydino", "anomalydino-1shot", "patchcore-150"]
    for row in rows:
        assert REQUIRED_KEYS <= set(row)
        assert 0.0 <= row["pixel_auroc"] <= 1.0 and row["ms_per_sample"] > 0 and row["peak_memory_mb"] > 0
    by_method = {r["method"]: r for r in rows}
    assert by_method["anomalydino"]["n_prototypes"] == 10 * 16  # every training token: 10 images x 4x4 grid
    assert by_method["anomalydino-1shot"]["n_prototypes"] == 16
    assert by_method["patchcore-150"]["n_prototypes"] == 150
    assert by_method["dpmm"]["n_prototypes"] == by_method["dpmm-euclidean"]["n_prototypes"] <= 8
    assert payload["random_backbone"] is True
    html = (out / "report.html").read_text()
    assert "RANDOM weights" in html and "<svg" in html and "Best and worst cases" in html
    assert "| dpmm |" in (out / "results.md").read_text()
    assert "RANDOM weights" in capsys.readouterr().out


def test_evaluate_a_fitted_model(bmad, tiny_dinov2_dir, tmp_path):
    model = tmp_path / "m.normdino"
    assert main(["fit", str(bmad / "train" / "good"), "-o", str(model), "--val", str(bmad / "valid" / "good" / "img"),
                 "--backbone", str(tiny_dinov2_dir), "--image-size", "56", "--epochs", "1", "--components", "8",
                 "--no-cache", "--quiet"]) == 0
    assert main(["evaluate", str(model), str(bmad), "--layout", "bmad-brain", "-o", str(tmp_path / "ev"),
                 "--timing-images", "2", "--no-cache", "--quiet"]) == 0
    rows = json.loads((tmp_path / "ev" / "results.json").read_text())["rows"]
    assert len(rows) == 1 and REQUIRED_KEYS <= set(rows[0])


def test_evaluate_scorer_metrics_match_a_direct_computation(tmp_path):
    """An oracle scorer (patch map = mask + small noise): AUROC 1, Dice and FPR as computed by hand."""
    from PIL import Image
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    truth = [np.zeros((4, 4), bool) for _ in range(3)]
    truth[1][1:3, 1:3] = True
    truth[2][0, :] = True

    def tokens_of(masks):
        t = np.zeros((len(masks), 4, 4, 2), np.float32)
        for i, m in enumerate(masks):
            t[i, ..., 0] = m
            t[i, ..., 1] = rng.random((4, 4))
        return t

    samples = []
    for i, m in enumerate(truth):
        path = tmp_path / f"mask{i}.png"
        Image.fromarray(m.astype(np.uint8) * 255).save(path)
        samples.append(Sample(image=tmp_path / f"img{i}.png", mask=path if m.any() else None, label=int(m.any())))
    healthy = TokenSet(tokens_of([np.zeros((4, 4), bool)] * 50), [(4, 4)] * 50)
    test = TokenSet(tokens_of(truth), [(4, 4)] * 3, samples)
    scorer = Scorer("oracle", lambda t: t[..., 0] + 0.01 * t[..., 1], 1)
    row = evaluate_scorer(scorer, healthy, test).row

    scores = (test.tokens[..., 0] + 0.01 * test.tokens[..., 1]).ravel()
    labels = np.stack(truth).ravel()
    assert row["pixel_auroc"] == pytest.approx(roc_auc_score(labels, scores)) == pytest.approx(1.0)
    healthy_scores = (0.01 * healthy.tokens[..., 1]).ravel()
    for fpr in (10, 5, 1):
        threshold = row[f"threshold_fpr{fpr}"]
        assert (healthy_scores > threshold).mean() <= fpr / 100 + 1e-9
        predicted = scores > threshold
        tp, fp, fn = (predicted & labels).sum(), (predicted & ~labels).sum(), (~predicted & labels).sum()
        assert row[f"dice_fpr{fpr}"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert row["image_auroc"] == pytest.approx(1.0)


def test_peak_memory_sees_an_allocation():
    with PeakMemory() as memory:
        block = np.ones(50 * 2**20 // 8)  # 50 MB
        block += 1
    baseline = PeakMemory.rss_bytes()
    del block
    assert memory.peak_bytes >= 40 * 2**20 and memory.peak_bytes >= baseline - 60 * 2**20


def test_markdown_table_has_the_paper_columns():
    table = markdown_table([{"method": "dpmm", "pixel_auroc": 0.9, "dice_fpr5": 0.5, "n_prototypes": 150}])
    assert table.splitlines()[0].startswith("| method | AUROC | AUPR | Dice@10% | Dice@5% | Dice@1%")
    assert "| dpmm | 0.9000 |" in table
