"""The paper's published figures in ``reproduce``: the package's own copy, and the paper / difference columns."""

import json
import math
from importlib import resources

import pytest

from normdino.evaluation import paper_tables, reproduce
from normdino.evaluation.assess import seed_summary

QUALITY = ("pixel_auroc", "pixel_aupr", "dice_fpr10", "dice_fpr5", "dice_fpr1")


def _row(method: str, value: float, **extra) -> dict:
    return {"method": method, **{m: value for m in QUALITY}, "backbone_ms": 8.0, "scoring_ms": 12.0,
            "ms_per_sample": 20.0, "peak_memory_gb": 0.5, **extra}


def _dataset(name: str) -> dict:
    """One data set's results as reproduce_dataset returns them: every method, three 1-shot seeds."""
    methods = list(reproduce.DPMM_SCORES) + [f"{m}-raw" for m in reproduce.DPMM_SCORES] + list(reproduce.BANKS)
    rows = [_row(m, 0.90 + 0.001 * i) for i, m in enumerate(methods)]
    shots = [_row(f"anomalydino-1shot@{s}", v, seed=s) for s, v in ((0, 0.80), (1, 0.95), (2, 0.86))]
    return {"dataset": name, "rows": rows + shots, "few_shot": [seed_summary("anomalydino-1shot", shots)],
            "comparisons": []}


def _cell(cells, table, dataset, method, metric):
    [cell] = [c for c in cells if (c["table"], c["dataset"], c["method"], c["metric"]) == (table, dataset, method, metric)]
    return cell


def test_the_package_carries_its_own_copy_of_the_tables_with_the_source_named():
    data = json.loads(resources.files("normdino.evaluation").joinpath("paper_tables.json").read_text("utf-8"))
    assert "Schulthess" in data["source"]["paper"] and data["source"]["arxiv"] == "2509.19997"
    assert "Tables 1" in paper_tables.PAPER_SOURCE and "PatchCore few-shot 150 prototypes" in data["reading_notes"]
    # figures as printed in the paper (percent), one per table, read from the packaged file
    assert data["table1"]["DPMM (paper)"]["brats"]["pixel_auroc"] == 96.21
    assert data["table2_dice"]["AnomalyDINO (one-shot)"]["resc"]["dice_fpr1"] == 33.88
    assert data["table3_ablation"][0] == {"score": "likelihood", "normalized": False,
                                          "brats": {"pixel_auroc": 92.85, "pixel_aupr": 23.56},
                                          "liver": {"pixel_auroc": 94.62, "pixel_aupr": 5.9},
                                          "resc": {"pixel_auroc": 85.92, "pixel_aupr": 29.04}}


def test_paper_figures_in_our_units_for_every_row_with_a_published_counterpart():
    figures = paper_tables.PAPER_FIGURES
    assert figures["table1"]["dpmm"]["pixel_auroc"] == (0.9621, 0.9546, 0.902)
    assert figures["table1"]["dpmm"]["ms_per_sample"] == (39, 35, 58)
    assert figures["table1"]["anomalydino"]["peak_memory_gb"] == (33.1, 6.9, 38.1)
    assert figures["table1"]["anomalydino-1shot-max"]["pixel_auroc"] == (0.9657, 0.9817, 0.9224)
    assert figures["table1"]["anomalydino-1shot"]["pixel_aupr"] == (0.3121, 0.0598, 0.3698)
    assert figures["table1"]["anomalydino-1shot-min"]["pixel_aupr"] == (0.0872, 0.0293, 0.2651)
    assert figures["table1"]["anomalydino-1shot-min"]["ms_per_sample"] == (None, None, None)  # reported on the mean row
    assert figures["table1"]["patchcore-10%"]["pixel_aupr"] == (0.6737, 0.0566, 0.7047)
    assert figures["table1"]["patchcore-1024"]["pixel_auroc"] == (0.9538, 0.457, 0.9328)
    assert figures["table1"]["patchcore-150"]["ms_per_sample"] == (158, 139, 136)
    assert figures["table2"]["dpmm"]["dice_fpr10"] == (0.3164, 0.0619, 0.38)
    assert figures["table3"]["dpmm-euclidean-raw"]["pixel_aupr"] == (0.2904, 0.0754, 0.3547)
    assert figures["table3"]["dpmm-likelihood"]["pixel_auroc"] == (0.9549, 0.9566, 0.8927)
    assert set(figures["table3"]) == {"dpmm", "dpmm-euclidean", "dpmm-likelihood", "dpmm-raw", "dpmm-euclidean-raw",
                                      "dpmm-likelihood-raw"}
    assert "patchcore-150" not in figures["table2"]  # Table 2 has no PatchCore rows


def test_cells_carry_the_paper_figure_and_ours_minus_paper():
    cells = paper_tables.table_cells([_dataset("brats"), _dataset("resc")])
    dpmm = _cell(cells, "table1", "brats", "dpmm", "pixel_auroc")
    assert dpmm["paper"] == 0.9621 and dpmm["difference"] == pytest.approx(0.90 - 0.9621)
    assert dpmm["paper_row"] == "DPMM (paper)" and dpmm["paper_significant"] is True  # † on BraTS and RESC
    assert _cell(cells, "table1", "brats", "dpmm", "ms_per_sample")["paper_significant"] is False
    assert _cell(cells, "table1", "brats", "patchcore-150", "pixel_auroc")["paper_significant"] is False
    # the one-shot rows: ours is the max / mean / min over the three seeds, each against its own published line
    for method, ours, paper in (("anomalydino-1shot-max", 0.95, 0.9224), ("anomalydino-1shot", (0.80 + 0.95 + 0.86) / 3, 0.8952),
                                ("anomalydino-1shot-min", 0.80, 0.851)):
        cell = _cell(cells, "table1", "resc", method, "pixel_auroc")
        assert cell["ours"] == pytest.approx(ours) and cell["paper"] == paper
        assert cell["difference"] == pytest.approx(ours - paper)
    mean_ms = _cell(cells, "table1", "resc", "anomalydino-1shot", "ms_per_sample")
    assert mean_ms["paper"] == 49 and mean_ms["difference"] == pytest.approx(20.0 - 49)
    assert _cell(cells, "table1", "resc", "anomalydino-1shot-max", "ms_per_sample")["paper"] is None
    # a Table 3 cell: DPMM, likelihood score on raw tokens, BraTS AUPR 23.56 %
    raw = _cell(cells, "table3", "brats", "dpmm-likelihood-raw", "pixel_aupr")
    assert raw["paper"] == 0.2356 and raw["difference"] == pytest.approx(0.905 - 0.2356)
    assert raw["paper_row"] == "score likelihood, normalised no"
    assert _cell(cells, "table3", "brats", "dpmm", "dice_fpr5")["paper"] is None  # not in the paper's Table 3
    dice = _cell(cells, "table2", "brats", "anomalydino", "dice_fpr1")
    assert dice["paper"] == 0.5424 and dice["difference"] == pytest.approx(0.906 - 0.5424)
    assert _cell(cells, "table2", "brats", "patchcore-150", "dice_fpr5")["paper"] is None
    assert all(c["paper"] is None for c in paper_tables.table_cells([_dataset("brats")], foreground=True))


def test_an_undefined_metric_has_a_paper_figure_but_no_difference():
    data = _dataset("liver")
    data["rows"][0]["pixel_aupr"] = float("nan")  # dpmm: no anomalous pixel
    cell = _cell(paper_tables.table_cells([data]), "table1", "liver", "dpmm", "pixel_aupr")
    assert cell["paper"] == 0.0902 and cell["difference"] is None and math.isnan(cell["ours"])


def test_a_data_set_absent_from_the_root_gives_no_rows_and_no_difference(tmp_path):
    paths = paper_tables.write_tables([_dataset("brats")], tmp_path)
    tables = json.loads(paths["json"].read_text())
    assert tables["not_found"] == ["Liver (BTCV + LiTS)", "RESC"]
    assert all(c["dataset"] == "brats" for t in tables["tables"].values() for c in t["cells"])
    markdown = paths["markdown"].read_text()
    assert "### BraTS2021" in markdown and "### RESC" not in markdown and "### Liver" not in markdown
    assert "Not found under the root (no rows, no comparison): Liver (BTCV + LiTS), RESC." in markdown
    html = paths["html"].read_text()
    assert ": BraTS2021" in html and ": RESC" not in html


def test_markdown_json_and_html_show_paper_and_difference(tmp_path):
    paths = paper_tables.write_tables([_dataset("brats"), _dataset("liver"), _dataset("resc")], tmp_path)
    markdown = paths["markdown"].read_text()
    table1 = markdown.split("## Table 1")[1].split("## Table 2")[0]
    header = next(line for line in table1.splitlines() if line.startswith("| method"))
    assert header == ("| method | AUROC % | AUROC % paper | AUROC % Δ | AUPR % | AUPR % paper | AUPR % Δ | backbone ms | "
                      "scoring ms | ms (sum) | ms (sum) paper | ms (sum) Δ | GB | GB paper | GB Δ | scoring state MB | "
                      "saved state MB |")
    brats = table1.split("### BraTS2021")[1].split("###")[0]
    assert "| AnomalyDINO 1-shot, max over seeds | 95.00 | 96.57 | -1.57 | 95.00 | 44.74 | +50.26 | — | — | — | — | — |" in brats
    assert "| AnomalyDINO 1-shot, min over seeds | 80.00 | 84.97 | -4.97 |" in brats
    assert ("| DPMM (cosine, normalised) | 90.00 | 96.21 † | -6.21 | 90.00 | 43.43 † | +46.57 | 8.0 | 12.0 | 20.0 | 39.0 | "
            "-19.0 |") in brats
    table3 = markdown.split("## Table 3")[1].split("## Table 1")[0]
    assert "| method | AUROC % | AUROC % paper | AUROC % Δ | AUPR % | AUPR % paper | AUPR % Δ | Dice@5% |" in table3
    assert "| DPMM likelihood, raw | 90.50 | 92.85 | -2.35 | 90.50 | 23.56 | +66.94 |" in table3.split("### BraTS2021")[1]
    assert "Schulthess" in markdown and "TO BE FILLED" not in markdown and "to be filled" not in markdown
    cells = json.loads(paths["json"].read_text())["tables"]["table2"]["cells"]
    cell = next(c for c in cells if (c["dataset"], c["method"], c["metric"]) == ("liver", "anomalydino-1shot", "dice_fpr10"))
    assert cell["paper"] == 0.0617 and cell["difference"] == pytest.approx((0.80 + 0.95 + 0.86) / 3 - 0.0617)
    html = paths["html"].read_text()
    assert "AUROC % paper" in html and "AUROC % Δ" in html and "84.97" in html and "-4.97" in html


def test_the_wheel_ships_the_data_file():
    """pyproject's package-data covers paper_tables.json (a wheel without it would fail at import)."""
    import fnmatch
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert any(fnmatch.fnmatch("paper_tables.json", p) for p in patterns["normdino.evaluation"])
    assert (root / "src/normdino/evaluation/paper_tables.json").is_file()
