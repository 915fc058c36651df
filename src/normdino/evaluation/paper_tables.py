"""The DPMM paper's Tables 1-3 with our cells beside the published figures: the paper's figures (read once from
the package's data file ``paper_tables.json``), the cells of each table (ours, paper, ours − paper), and the
Markdown, JSON and HTML renderings that ``normdino reproduce`` writes (:func:`write_tables`).
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Sequence

from normdino.evaluation.timing import TIMING_NOTE
from normdino.io.report import json_safe


BMAD_NAMES = {"brats": "BraTS2021", "liver": "Liver (BTCV + LiTS)", "resc": "RESC"}

# ---------------------------------------------------------------------- the paper's published figures
#
# Schulthess & Konukoglu, MICCAI 2025 (arXiv 2509.19997), Tables 1-3, as the package's own data file
# paper_tables.json (its "source" and "reading_notes" say where each row comes from). The figures are read once,
# at import, from the installed package; nothing outside the package is read.

PAPER_DATASETS = ("brats", "liver", "resc")
PAPER_PERCENT_METRICS = ("pixel_auroc", "pixel_aupr", "dice_fpr10", "dice_fpr5", "dice_fpr1")

# our row -> the paper's row (Table 1 and 2: the row's name; Table 3: (score, normalised))
PAPER_ROWS: dict[str, dict[str, object]] = {
    "table1": {
        "dpmm": "DPMM (paper)",
        "anomalydino": "AnomalyDINO (full-shot)",
        "anomalydino-1shot-max": "AnomalyDINO one-shot (1024 prototypes) max over seeds",
        "anomalydino-1shot": "AnomalyDINO one-shot (1024 prototypes) mean over seeds",
        "anomalydino-1shot-min": "AnomalyDINO one-shot (1024 prototypes) min over seeds",
        "patchcore-10%": "PatchCore (10% coreset)",
        "patchcore-1024": "PatchCore few-shot 1024 prototypes",
        "patchcore-150": "PatchCore few-shot 150 prototypes",
    },
    "table2": {
        "dpmm": "DPMM (paper)",
        "anomalydino": "AnomalyDINO (full-shot)",
        "anomalydino-1shot": "AnomalyDINO (one-shot)",
    },
    "table3": {
        "dpmm": ("cosine", True), "dpmm-euclidean": ("euclidean", True), "dpmm-likelihood": ("likelihood", True),
        "dpmm-raw": ("cosine", False), "dpmm-euclidean-raw": ("euclidean", False),
        "dpmm-likelihood-raw": ("likelihood", False),
    },
}
_PAPER_KEYS = {"memory_gb": "peak_memory_gb"}  # the data file's metric names -> ours


def load_paper_tables() -> dict:
    """The data file of the paper's Tables 1-3 shipped inside the package (percent, ms, GB; null = not reported)."""
    from importlib import resources

    return json.loads(resources.files("normdino.evaluation").joinpath("paper_tables.json").read_text("utf-8"))


def paper_figures(tables: dict) -> dict[str, dict[str, dict[str, tuple[float | None, ...]]]]:
    """table -> our method -> our metric -> (BraTS, Liver, RESC) in our units: AUROC, AUPR and Dice as fractions
    in [0, 1] (the paper's percentages / 100), runtime in ms per sample, memory in GB; None = not reported."""
    sources = {"table1": tables["table1"], "table2": tables["table2_dice"],
               "table3": {(r["score"], r["normalized"]): r for r in tables["table3_ablation"]}}
    figures: dict = {}
    for table, rows in PAPER_ROWS.items():
        for method, paper_row in rows.items():
            row = sources[table][paper_row]
            metrics = [k for k in row[PAPER_DATASETS[0]]]
            for metric in metrics:
                values = []
                for dataset in PAPER_DATASETS:
                    value = row[dataset].get(metric)
                    ours = _PAPER_KEYS.get(metric, metric)
                    values.append(None if value is None else round(value / 100, 6) if ours in PAPER_PERCENT_METRICS else value)
                figures.setdefault(table, {}).setdefault(method, {})[_PAPER_KEYS.get(metric, metric)] = tuple(values)
    return figures


PAPER_TABLES = load_paper_tables()
PAPER_FIGURES = paper_figures(PAPER_TABLES)
PAPER_SOURCE = PAPER_TABLES["source"]["paper"] + f" (arXiv {PAPER_TABLES['source']['arxiv']}), Tables 1-3"
PAPER_NOTE = (f"Published figures: {PAPER_SOURCE}, from the package's copy (normdino/evaluation/paper_tables.json, "
              "which says how each row was read). 'paper' is the published figure, 'Δ' = ours − paper "
              "(percentage points for AUROC, AUPR and Dice); '—' in 'paper': not reported there; '†': the paper's "
              "significant improvement over PatchCore with 150 prototypes (paired permutation test; ours is in the "
              "permutation-test table). The paper's setting: "
              "official DINOv2 ViT-S/14 weights, one NVIDIA A6000, batch size 1 for runtime and memory; its runtime "
              "column is per sample for the detection stage, compared here with our backbone + scoring sum.")

TABLES = {
    "table1": ("Table 1: pixel-level detection, runtime and memory",
               ("pixel_auroc", "pixel_aupr", "backbone_ms", "scoring_ms", "ms_per_sample", "peak_memory_gb",
                "scoring_state_mb", "saved_state_mb")),
    "table2": ("Table 2: Dice at the thresholds giving 10 / 5 / 1 % FPR on healthy images",
               ("dice_fpr10", "dice_fpr5", "dice_fpr1")),
    "table3": ("Table 3: ablation of the DPMM score and of embedding normalisation",
               ("pixel_auroc", "pixel_aupr", "dice_fpr5")),
}
TABLE_METHODS = {
    "table1": tuple(PAPER_ROWS["table1"]),
    "table2": ("dpmm", "anomalydino", "anomalydino-1shot", "patchcore-10%", "patchcore-1024", "patchcore-150"),
    "table3": tuple(PAPER_ROWS["table3"]),
}
SEED_ROWS = {"anomalydino-1shot-max": ("anomalydino-1shot", "max"), "anomalydino-1shot-min": ("anomalydino-1shot", "min")}
METHOD_LABELS = {
    "dpmm": "DPMM (cosine, normalised)", "dpmm-euclidean": "DPMM Euclidean, normalised",
    "dpmm-likelihood": "DPMM likelihood, normalised", "dpmm-raw": "DPMM cosine, raw",
    "dpmm-euclidean-raw": "DPMM Euclidean, raw", "dpmm-likelihood-raw": "DPMM likelihood, raw",
    "anomalydino": "AnomalyDINO (full)", "anomalydino-1shot": "AnomalyDINO 1-shot, mean over seeds (max / min)",
    "anomalydino-1shot-max": "AnomalyDINO 1-shot, max over seeds", "anomalydino-1shot-min": "AnomalyDINO 1-shot, min over seeds",
    "patchcore-10%": "PatchCore 10 %", "patchcore-1024": "PatchCore 1024", "patchcore-150": "PatchCore 150",
}
METRIC_LABELS = {"pixel_auroc": "AUROC %", "pixel_aupr": "AUPR %", "backbone_ms": "backbone ms", "scoring_ms": "scoring ms",
                 "ms_per_sample": "ms (sum)", "peak_memory_gb": "GB", "scoring_state_mb": "scoring state MB",
                 "saved_state_mb": "saved state MB",
                 "dice_fpr10": "Dice@10%", "dice_fpr5": "Dice@5%", "dice_fpr1": "Dice@1%",
                 "image_auroc": "image AUROC %"}


# ---------------------------------------------------------------------- tables


def paper_figure(table: str, method: str, metric: str, dataset: str) -> float | None:
    """The paper's figure for one cell in our units (None: not reported, or a data set the paper has not)."""
    figures = PAPER_FIGURES.get(table, {}).get(method, {}).get(metric)
    if figures is None or dataset not in PAPER_DATASETS:
        return None
    return figures[PAPER_DATASETS.index(dataset)]


def paper_metrics(table: str) -> tuple[str, ...]:
    """The metrics of a table that the paper reports for at least one of its rows (these get 'paper' and 'Δ')."""
    reported = {m for method in PAPER_FIGURES.get(table, {}).values() for m, v in method.items()
                if any(x is not None for x in v)}
    return tuple(m for m in TABLES[table][1] if m in reported)


def _our_value(rows: dict, method: str, key: str) -> tuple[float | None, dict | None, list | None]:
    """(value, seed spread, interval) of one of our cells; the 1-shot max/min rows read the spread over seeds."""
    if method in SEED_ROWS:
        base, statistic = SEED_ROWS[method]
        spread = rows.get(base, {}).get(f"{key}_seeds")
        if not key.startswith(("pixel", "dice", "fg_")) or not spread:
            return None, None, None  # runtime and memory: the paper reports them on the mean row only, as here
        return spread[statistic], None, None
    row = rows[method]
    return row.get(key), row.get(f"{key}_seeds"), row.get(f"{key}_ci")


def table_cells(per_dataset: Sequence[dict], foreground: bool = False) -> list[dict]:
    """Every cell of Tables 1-3: ours (with its interval or seed spread), the paper's figure and the difference."""
    cells = []
    for table, (_, metrics) in TABLES.items():
        for data in per_dataset:
            rows = {r["method"]: r for r in data["rows"]} | {s["method"]: s for s in data["few_shot"]}
            for method in TABLE_METHODS[table]:
                if SEED_ROWS.get(method, (method,))[0] not in rows:
                    continue
                for metric in metrics:
                    key = f"fg_{metric}" if foreground and metric.startswith(("pixel", "dice")) else metric
                    ours, seeds, ci = _our_value(rows, method, key)
                    paper = None if foreground else paper_figure(table, method, metric, data["dataset"])
                    defined = ours is not None and ours == ours
                    cells.append({"table": table + ("_foreground" if foreground else ""), "dataset": data["dataset"],
                                  "method": method, "metric": metric, "ours": ours, "ci": ci, "seeds": seeds,
                                  "paper": paper, "paper_row": None if foreground else _paper_row(table, method),
                                  "paper_significant": not foreground and paper_significant(table, method, metric,
                                                                                            data["dataset"]),
                                  "difference": ours - paper if paper is not None and defined else None})
    return cells


def _paper_row(table: str, method: str) -> str | None:
    row = PAPER_ROWS.get(table, {}).get(method)
    if isinstance(row, tuple):
        return f"score {row[0]}, normalised {'yes' if row[1] else 'no'}"
    return row


def _number(value: float | None, metric: str) -> str:
    """One figure as the paper prints it: percentages for AUROC, AUPR and Dice, ms with one decimal."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if metric in PAPER_PERCENT_METRICS or metric == "image_auroc":
        return f"{100 * value:.2f}"
    if metric == "ms_per_sample" or metric.endswith("_ms"):
        return f"{value:.1f}"
    if metric == "p":
        return f"{value:.2g}"
    return f"{value:.3f}"


def _ours_text(cell: dict) -> str:
    text = _number(cell["ours"], cell["metric"])
    if cell.get("seeds"):
        s = cell["seeds"]
        text += f" ({_number(s['max'], cell['metric'])} / {_number(s['min'], cell['metric'])})"
    elif cell.get("ci") and cell["ci"][0] is not None and not (isinstance(cell["ci"][0], float) and math.isnan(cell["ci"][0])):
        text += f" [{_number(cell['ci'][0], cell['metric'])}, {_number(cell['ci'][1], cell['metric'])}]"
    return text


def paper_significant(table: str, method: str, metric: str, dataset: str) -> bool:
    """Whether the paper marks this figure (†) as a significant improvement over PatchCore with 150 prototypes."""
    row = PAPER_ROWS.get(table, {}).get(method)
    marked = PAPER_TABLES["significant_over_patchcore_150"].get(row, []) if table == "table1" else []
    return dataset in marked and metric in ("pixel_auroc", "pixel_aupr")


def _paper_text(cell: dict) -> str:
    text = _number(cell["paper"], cell["metric"])
    return text + " †" if cell.get("paper_significant") else text


def _difference_text(cell: dict) -> str:
    d = cell["difference"]
    if d is None:
        return "—"
    if cell["metric"] in PAPER_PERCENT_METRICS:
        return f"{100 * d:+.2f}"
    return f"{d:+.1f}" if cell["metric"].endswith("ms_per_sample") else f"{d:+.3f}"


def _columns(table: str, foreground: bool) -> list[tuple[str, str, str]]:
    """(header, metric, part) of a table's columns: ours for every metric, 'paper' and 'Δ' where the paper has it."""
    base = table.replace("_foreground", "")
    with_paper = () if foreground else paper_metrics(base)
    columns = []
    for metric in TABLES[base][1]:
        columns.append((METRIC_LABELS.get(metric, metric), metric, "ours"))
        if metric in with_paper:
            columns += [(f"{METRIC_LABELS.get(metric, metric)} paper", metric, "paper"),
                        (f"{METRIC_LABELS.get(metric, metric)} Δ", metric, "difference")]
    return columns


def _table_rows(cells: Sequence[dict], table: str, dataset: str) -> list[dict]:
    """One dict per method (header -> text) of one table and data set."""
    these = [c for c in cells if c["table"] == table and c["dataset"] == dataset]
    text = {"ours": _ours_text, "paper": _paper_text, "difference": _difference_text}
    rows = []
    for method in dict.fromkeys(c["method"] for c in these):
        by_metric = {c["metric"]: c for c in these if c["method"] == method}
        row = {"method": METHOD_LABELS.get(method, method)}
        for header, metric, part in _columns(table, table.endswith("_foreground")):
            row[header] = text[part](by_metric[metric]) if metric in by_metric else "—"
        rows.append(row)
    return rows


def _absent(per_dataset: Sequence[dict]) -> list[str]:
    """The paper's data sets that were not found under the root (they have no rows, hence no difference)."""
    found = {d["dataset"] for d in per_dataset}
    return [BMAD_NAMES[d] for d in PAPER_DATASETS if d not in found]


CELLS_NOTE = ("Cells: ours [95 % bootstrap interval over images]; the 1-shot mean row: mean (max / min over seeds). "
              "AUROC, AUPR and Dice in %, as in the paper. '—' in ours marks an undefined metric (e.g. AUPR without "
              "anomalous pixels) or one not measured, written as null in JSON.")


def markdown_tables(cells: Sequence[dict], per_dataset: Sequence[dict], warning: str | None) -> str:
    """All tables in Markdown, one sub-table per data set; the random-weights warning above every table."""
    lines = ["# normdino reproduce: the DPMM paper's tables", ""]
    if warning:
        lines += [f"> **Warning:** {warning}", ""]
    lines += [f"_{PAPER_NOTE}_", "", CELLS_NOTE, "", TIMING_NOTE, ""]
    absent = _absent(per_dataset)
    if absent:
        lines += [f"Not found under the root (no rows, no comparison): {', '.join(absent)}.", ""]
    tables = list(TABLES) + [t + "_foreground" for t in TABLES]
    for table in tables:
        title = TABLES[table.replace("_foreground", "")][0]
        foreground = table.endswith("_foreground")
        lines += [f"## {title}{' — foreground pixels only (thresholds on healthy foreground)' if foreground else ''}", ""]
        if warning:
            lines += [f"> **Warning:** {warning}", ""]
        for data in per_dataset:
            rows = _table_rows(cells, table, data["dataset"])
            if not rows:
                continue
            header = list(rows[0])
            lines += [f"### {BMAD_NAMES.get(data['dataset'], data['dataset'])}", "",
                      "| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
            lines += ["| " + " | ".join(row[h] for h in header) + " |" for row in rows]
            lines.append("")
    lines += ["## Paired permutation tests (image-wise pixel AUROC / AUPR over anomalous images)", ""]
    if warning:
        lines += [f"> **Warning:** {warning}", ""]
    lines += ["| data set | A | B | metric | mean A | mean B | A − B | p | images |", "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for data in per_dataset:
        for c in data["comparisons"]:
            lines.append(f"| {data['dataset']} | {c['a']} | {c['b']} | {c['metric']} | {_number(c['mean_a'], '')} | "
                         f"{_number(c['mean_b'], '')} | {_number(c['mean_difference'], '')} | "
                         f"{_number(c['p_value'], 'p')} | {c['n_images']} |")
    lines += ["", "## Setting", ""]
    for data in per_dataset:
        keys = ("folder", "train_used", "healthy_used", "evaluated", "calibration", "foreground", "backbone",
                "image_size", "seconds")
        lines.append(f"- **{data['dataset']}**: " + "; ".join(f"{k}: {data[k]}" for k in keys if k in data))
    return "\n".join(lines) + "\n"


def html_report(path: Path, cells: Sequence[dict], per_dataset: Sequence[dict], warning: str | None) -> None:
    """One self-contained HTML page with every table (and the warning banner)."""
    from normdino.io import report

    absent = _absent(per_dataset)
    about = f"<p>{html.escape(PAPER_NOTE)}</p><p>{html.escape(CELLS_NOTE)}</p><p>{html.escape(TIMING_NOTE)}</p>"
    if absent:
        about += f"<p>Not found under the root (no rows, no comparison): {html.escape(', '.join(absent))}.</p>"
    sections = [("About these tables", about)]
    for table in list(TABLES) + [t + "_foreground" for t in TABLES]:
        title = TABLES[table.replace("_foreground", "")][0]
        foreground = table.endswith("_foreground")
        for data in per_dataset:
            rows = _table_rows(cells, table, data["dataset"])
            if not rows:
                continue
            heading = f"{title}{' (foreground only)' if foreground else ''}: {BMAD_NAMES.get(data['dataset'], data['dataset'])}"
            body = (f'<p class="warning">{html.escape(warning)}</p>' if warning else "") + report.html_table(rows, list(rows[0]))
            sections.append((heading, body))
    comparisons = [{"data set": d["dataset"], **{k: c[k] for k in ("a", "b", "metric", "mean_difference", "p_value", "n_images")}}
                   for d in per_dataset for c in d["comparisons"]]
    if comparisons:
        sections.append(("Paired permutation tests", report.html_table(json_safe(comparisons), list(comparisons[0]))))
    report.html_report(path, "normdino reproduce: the DPMM paper's tables", sections, warning=warning)


def write_tables(per_dataset: Sequence[dict], out_dir: Path) -> dict[str, Path]:
    """tables.md, tables.json, results.json and report.html in ``out_dir`` (atomically)."""
    from normdino.evaluation.protocol import RANDOM_WARNING
    from normdino.files import atomic_write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    random_weights = any(d.get("random_weights") for d in per_dataset)
    warning = RANDOM_WARNING if random_weights else None
    cells = table_cells(per_dataset) + table_cells(per_dataset, foreground=True)
    paths = {"markdown": out_dir / "tables.md", "json": out_dir / "tables.json",
             "results": out_dir / "results.json", "html": out_dir / "report.html"}
    tables = {}
    for cell in cells:
        tables.setdefault(cell["table"], {"warning": warning, "title": TABLES[cell["table"].replace("_foreground", "")][0],
                                          "cells": []})["cells"].append(cell)
    units = ("ours, paper and difference: AUROC, AUPR and Dice as fractions in [0, 1] (the paper's percent / 100), "
             "ms per sample, GB; null = undefined, not measured or not reported")
    atomic_write_text(paths["json"], json.dumps(json_safe({"random_backbone": random_weights, "paper_note": PAPER_NOTE,
                                                           "paper_source": PAPER_TABLES["source"], "units": units,
                                                           "not_found": _absent(per_dataset), "tables": tables}),
                                                indent=2, allow_nan=False) + "\n")
    atomic_write_text(paths["results"], json.dumps(json_safe({"random_backbone": random_weights, "warning": warning,
                                                              "datasets": list(per_dataset)}), indent=2,
                                                   allow_nan=False) + "\n")
    atomic_write_text(paths["markdown"], markdown_tables(cells, per_dataset, warning))
    html_report(paths["html"], cells, per_dataset, warning)
    return paths
