"""``normdino reproduce``: the DPMM paper's Tables 1-3 on the BMAD sets, each cell beside the published figure.

For each BMAD set found under the root (:func:`normdino.evaluation.datasets.find_bmad`) one backbone pass
fills one token cache of *unnormalised* tokens; the normalised methods get an L2-normalised copy of the
training tokens and normalise evaluation tokens on the fly, so the ablation's "normalised or not" costs no
second cache. Methods: DPMM with the cosine, Euclidean and likelihood scores, each on normalised and raw
tokens; AnomalyDINO full-shot and 1-shot over ``--seeds`` (max/mean/min); PatchCore 10 %, 1024 and 150.
Thresholds are out of sample (:mod:`normdino.evaluation.splits`); metrics come with 95 % bootstrap intervals
over images, whole-image and foreground-only; DPMM is compared with each baseline by a paired permutation
test on image-wise pixel AUROC/AUPR.

Outputs in ``-o``: ``tables.md``, ``tables.json`` (strict JSON: undefined metrics are null), ``report.html``
(one self-contained file) and ``results.json`` (every row, interval and test).

Published figures: Schulthess & Konukoglu, MICCAI 2025, arXiv 2509.19997, Tables 1-3, from the package's data
file ``paper_tables.json`` (source and reading notes inside). Every row with a published counterpart gets the
paper's figure and ours − paper: DPMM with its three scores x normalised or not, AnomalyDINO full and one-shot
(max / mean / min over seeds), PatchCore 10 %, 1024 and 150. A data set missing under the root has no rows.
"""

from __future__ import annotations

import html
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from normdino.errors import InputError
from normdino.evaluation.timing import TIMING_NOTE
from normdino.io.report import json_safe

log = logging.getLogger(__name__)

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
DPMM_SCORES = ("dpmm", "dpmm-euclidean", "dpmm-likelihood")
BANKS = ("anomalydino", "patchcore-10%", "patchcore-1024", "patchcore-150")
FEW_SHOT = "anomalydino-1shot"


@dataclass
class Settings:
    """Everything ``reproduce`` needs besides the root; the CLI's options, one to one."""

    datasets: tuple[str, ...] = ("brats", "liver", "resc")
    backbone: str = "dinov2_vits14"
    image_size: int = 448
    epochs: int = 40
    components: int = 500
    covariance: str = "diag"
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    seed: int = 0
    n_bootstrap: int = 1000
    n_permutations: int = 10_000
    compare: tuple[tuple[str, str], ...] = ()
    foreground: str = "auto"
    max_train: int | None = None
    max_eval: int | None = None
    timing_images: int = 10
    batch_size: int = 8
    cache_dir: Path | None = None
    device: str = "cpu"
    sigma: float = 0.0
    top_fraction: float = 0.01
    progress: bool = True


# ---------------------------------------------------------------------- tokens and methods


def build_backbone(name: str, image_size: int, layers: Sequence[int], device: str, seed: int = 0):
    """The backbone of every method, returning UNnormalised tokens (``random`` / ``random:ARCH`` for random weights)."""
    from normdino.features.backbone import Backbone

    if name == "random" or name.startswith("random:"):
        return Backbone.random(name.partition(":")[2] or "dinov2_vits14", seed=seed, image_size=image_size,
                               layers=tuple(layers), normalize=False, device=device)
    return Backbone.from_pretrained(name, image_size=image_size, layers=tuple(layers), normalize=False, device=device)


def normalized_copy(tokens, chunk: int = 64):
    """An L2-normalised float16 copy of a token set (patches and CLS), computed ``chunk`` images at a time."""
    from normdino.features.tokens import TokenSet

    def normalize(array: np.ndarray | None) -> np.ndarray | None:
        if array is None:
            return None
        out = np.empty(array.shape, np.float16)
        for start in range(0, len(array), chunk):
            x = np.asarray(array[start:start + chunk], np.float32)
            out[start:start + chunk] = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        return out

    return TokenSet(normalize(tokens.patches), tokens.shapes, normalize(tokens.cls), tokens.sources)


def normalizing(scorer):
    """The scorer fed L2-normalised tokens: a method fitted on normalised tokens scoring the raw token cache."""
    from normdino.evaluation.scorers import Scorer
    from normdino.features.tokens import Tokens

    class NormalizingScorer(Scorer):
        def patch_maps(self, tokens: Tokens) -> torch.Tensor:
            cls = None if tokens.cls is None else torch.nn.functional.normalize(tokens.cls.float(), dim=-1)
            return super().patch_maps(Tokens(torch.nn.functional.normalize(tokens.patches.float(), dim=-1), cls))

    return NormalizingScorer(scorer.name, scorer.method, scorer.positions, scorer.fit_seconds)


def _fit(names: Sequence[str], layers, train, healthy, settings: Settings, seed: int, rename: dict[str, str],
         normalize: bool) -> list:
    from normdino.evaluation.protocol import create_methods, fit_methods

    methods = create_methods(names, seed=seed, epochs=settings.epochs, n_components=settings.components,
                             covariance_type=settings.covariance)
    scorers = fit_methods(methods, layers, train, healthy, device=settings.device, progress=settings.progress)
    for scorer in scorers:
        scorer.name = rename.get(scorer.name, scorer.name)
    return [normalizing(s) for s in scorers] if normalize else scorers


# ---------------------------------------------------------------------- one data set


def _labelled(backbone, healthy_samples, evaluation_samples, settings: Settings):
    from normdino.evaluation.protocol import LabelledTokens, token_set

    images = list(dict.fromkeys([s.image for s in healthy_samples] + [s.image for s in evaluation_samples]))
    tokens = token_set(backbone, images, settings.cache_dir, settings.batch_size, settings.progress)
    row = {path: i for i, path in enumerate(images)}

    def pick(samples):
        return LabelledTokens(tokens.subset([row[s.image] for s in samples]), list(samples))

    return pick(healthy_samples), pick(evaluation_samples)


def _evaluation_samples(dataset, settings: Settings) -> list:
    from normdino.evaluation.protocol import subset

    evaluation = dataset.evaluation
    normal = [s for s in evaluation if s.label == 0]
    anomalous = [s for s in evaluation if s.label == 1]
    if settings.max_eval is not None and len(evaluation) > settings.max_eval:
        n_anomalous = min(len(anomalous), max(1, round(settings.max_eval * len(anomalous) / len(evaluation))))
        normal = subset(normal, settings.max_eval - n_anomalous, settings.seed)
        anomalous = subset(anomalous, n_anomalous, settings.seed)
    return normal + anomalous


def reproduce_dataset(name: str, folder: Path, layout: str, settings: Settings) -> dict:
    """Every method of the paper on one BMAD set: rows, few-shot summaries and paired tests (JSON-able)."""
    from normdino.evaluation.assess import assess_scorer, compare_methods, seed_summary
    from normdino.evaluation.datasets import load_dataset
    from normdino.evaluation.foreground import foreground_from_option
    from normdino.evaluation.protocol import create_methods, feature_union, subset, token_set
    from normdino.evaluation.timing import UNTIMED, time_methods
    from normdino.evaluation.splits import calibration_folds, drop_training_groups

    started = time.perf_counter()
    dataset = load_dataset(folder, layout)
    if not dataset.train:
        raise InputError(f"{folder} has no training images")
    train_paths = subset(dataset.train, settings.max_train, settings.seed)
    healthy_samples = drop_training_groups(dataset.healthy_validation, train_paths)
    if settings.max_eval is not None:
        healthy_samples = subset(healthy_samples, settings.max_eval, settings.seed)
    evaluation_samples = _evaluation_samples(dataset, settings)
    if not healthy_samples or not evaluation_samples:
        raise InputError(f"{folder} needs healthy validation images and evaluation images")
    layers, _ = feature_union(create_methods(list(DPMM_SCORES) + list(BANKS) + [FEW_SHOT], seed=settings.seed))
    backbone = build_backbone(settings.backbone, settings.image_size, layers, settings.device, settings.seed)
    log.info("%s: %d training, %d healthy calibration, %d evaluated images", name, len(train_paths),
             len(healthy_samples), len(evaluation_samples))
    train_raw = token_set(backbone, train_paths, settings.cache_dir, settings.batch_size, settings.progress)
    healthy, test = _labelled(backbone, healthy_samples, evaluation_samples, settings)
    folds = calibration_folds([s.image for s in healthy_samples], [s.image for s in evaluation_samples], settings.seed)
    foreground = foreground_from_option(settings.foreground)
    train_n, healthy_n = normalized_copy(train_raw), normalized_copy(healthy.tokens)
    timing = [s.image for s in evaluation_samples[:settings.timing_images]]

    scorers, results, shots = [], [], []

    def run(fitted, extra: dict | None = None) -> list:
        done = []
        for scorer in fitted:
            result = assess_scorer(scorer, healthy, test, sigma=settings.sigma, top_fraction=settings.top_fraction,
                                   device=backbone.device, folds=folds, foreground=foreground,
                                   n_bootstrap=settings.n_bootstrap, seed=settings.seed, progress=settings.progress)
            result.row.update(extra or {})
            scorers.append(scorer)
            done.append(result)
        return done

    results += run(_fit(DPMM_SCORES, layers, train_n, healthy_n, settings, settings.seed, {}, normalize=True))
    results += run(_fit(DPMM_SCORES, layers, train_raw, healthy.tokens, settings, settings.seed,
                        {m: f"{m}-raw" for m in DPMM_SCORES}, normalize=False))
    results += run(_fit(BANKS, layers, train_n, healthy_n, settings, settings.seed, {}, normalize=True))
    for seed in settings.seeds:
        shots += run(_fit([FEW_SHOT], layers, train_n, healthy_n, settings, seed, {FEW_SHOT: f"{FEW_SHOT}@{seed}"},
                          normalize=True), {"seed": seed})
    # every method timed in one loop, image by image (--timing-images 0: no timing)
    timings = time_methods(backbone, scorers, timing, settings.sigma, settings.top_fraction) if timing else \
        [UNTIMED] * len(scorers)
    for result, measured in zip(results + shots, timings):
        result.row.update(measured.row())
    rows = [r.row for r in results + shots]
    summaries = [seed_summary(FEW_SHOT, [r.row for r in shots])] if shots else []
    pairs = [("dpmm", b) for b in BANKS] + [p for p in settings.compare if p not in [("dpmm", b) for b in BANKS]]
    comparisons = compare_methods(results + shots, pairs, settings.n_permutations, settings.seed)
    return {
        "dataset": name, "folder": str(folder), "layout": layout, **dataset.summary(),
        "train_used": len(train_paths), "healthy_used": len(healthy_samples), "evaluated": len(evaluation_samples),
        "calibration": folds.description, "foreground": foreground.description if foreground else "none",
        "backbone": backbone.name, "random_weights": bool(backbone.is_random), "image_size": backbone.image_size,
        "seconds": round(time.perf_counter() - started, 1),
        "rows": rows, "few_shot": summaries, "comparisons": comparisons,
    }


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


def reproduce(root: str | Path, out_dir: str | Path, settings: Settings) -> dict[str, Path]:
    """Find the BMAD sets under ``root``, run every method on each, write the tables to ``out_dir``."""
    from normdino.evaluation.datasets import find_bmad

    found = find_bmad(root, tuple(settings.datasets))
    per_dataset = [reproduce_dataset(name, folder, layout, settings) for name, (folder, layout) in found.items()]
    return write_tables(per_dataset, Path(out_dir))
