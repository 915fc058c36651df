"""normdino evaluate / bench end to end on phantoms in the BMAD brain layout (tiny random backbone), checked
against direct computations; the protocol's thresholds, timing passes, peak memory and strict JSON."""

import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

from normdino.cli import main
from normdino.evaluation import protocol, timing
from normdino.evaluation.accumulator import PixelScoreAccumulator
from normdino.evaluation.assess import AssessedResult, assess_scorer
from normdino.evaluation.datasets import Sample, load_dataset
from normdino.evaluation.protocol import LabelledTokens, markdown_table, write_outputs
from normdino.evaluation.scorers import Scorer
from normdino.evaluation.splits import calibration_folds
from normdino.evaluation.statistics import ImageStatistics
from normdino.evaluation.timing import PeakMemory
from normdino.features.tokens import TokenSet
from normdino.io.phantoms import write_phantom_dataset
from normdino.io.reading import read_image
from normdino.methods.scoring import upsample

REQUIRED_KEYS = {"method", "pixel_auroc", "pixel_aupr", "dice_fpr10", "dice_fpr5", "dice_fpr1", "image_auroc",
                 "ms_per_sample", "peak_memory_mb", "n_prototypes"}


def _strict(text: str):
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))


@pytest.fixture(scope="module")
def bmad(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("bmad"), n_train=10, n_valid=6, n_test_normal=3,
                                 n_test_anomalous=4, size=48, seed=3)


def _direct_pixel_metrics(maps: list[np.ndarray], samples) -> tuple[float, float]:
    scores = np.concatenate([m.ravel() for m in maps])
    truth = np.concatenate([(read_image(s.mask) > 0).ravel() if s.mask else np.zeros(m.size, bool)
                            for m, s in zip(maps, samples)])
    return roc_auc_score(truth, scores), average_precision_score(truth, scores)


def _image_score(pixel_map: np.ndarray, top_fraction: float = 0.01) -> float:
    flat = np.sort(pixel_map.ravel())
    return float(flat[-max(1, int(round(top_fraction * flat.size))):].mean())


BENCH_METHODS = ["dpmm", "dpmm-euclidean", "anomalydino", "anomalydino-1shot", "patchcore-150"]


def test_bench_matches_a_direct_memory_bank_computation(bmad, tiny_dinov2_dir, tmp_path):
    """normdino.evaluation.bench.run_bench from Python, with its statistics (what `normdino bench` runs)."""
    from normdino.evaluation.bench import bench_settings, run_bench
    from normdino.evaluation.report_options import ReportOptions

    out = tmp_path / "bench"
    report = ReportOptions(output=out, json_path=tmp_path / "r.json", timing_images=2, n_bootstrap=40,
                           compare=(("dpmm", "patchcore-150"),), n_permutations=99, progress=False)
    settings = bench_settings("dpmm", backbone=str(tiny_dinov2_dir), image_size=56, epochs=2, n_components=8)
    run = run_bench(bmad, BENCH_METHODS, report, settings, seeds=(0, 1))
    assert run.random_backbone and [r["method"] for r in run.rows][-1] == "anomalydino-1shot"
    payload = _strict((tmp_path / "r.json").read_text())
    rows = {r["method"]: r for r in payload["rows"]}
    assert list(rows) == ["dpmm", "dpmm-euclidean", "anomalydino", "anomalydino-1shot@0", "anomalydino-1shot@1",
                          "patchcore-150", "anomalydino-1shot"]
    for name, row in rows.items():
        if "@" in name or name == "anomalydino-1shot":
            continue
        assert REQUIRED_KEYS <= set(row) and row["ms_per_sample"] > 0 and row["peak_memory_mb"] > 0
        assert row["backbone_ms"] > 0 and row["scoring_ms"] > 0 and row["timing_images"] == 2
        assert row["ms_per_sample"] == pytest.approx(row["backbone_ms"] + row["scoring_ms"], abs=2e-3)
        assert row["pixel_auroc_ci"][0] <= row["pixel_auroc_ci"][1] and "fg_pixel_auroc" in row
    assert rows["anomalydino"]["n_prototypes"] == 10 * 16  # every training token: 10 images x 4x4 grid
    assert rows["anomalydino-1shot@0"]["n_prototypes"] == 16 and rows["patchcore-150"]["n_prototypes"] == 150
    spread = rows["anomalydino-1shot"]["pixel_auroc_seeds"]
    seeds = sorted(rows[f"anomalydino-1shot@{s}"]["pixel_auroc"] for s in (0, 1))
    assert (spread["min"], spread["max"]) == pytest.approx(tuple(seeds)) and spread["mean"] == pytest.approx(np.mean(seeds))
    assert {(c["a"], c["b"], c["metric"]) for c in payload["comparisons"]} == {
        ("dpmm", "patchcore-150", "image-wise AUROC"), ("dpmm", "patchcore-150", "image-wise AUPR")}

    # AnomalyDINO by hand: 1-NN cosine distance to every training token, bilinear upsampling, scikit-learn
    from normdino.features.backbone import Backbone

    backbone = Backbone.from_pretrained(tiny_dinov2_dir, image_size=56)
    dataset = load_dataset(bmad)

    def tokens(path):
        with torch.inference_mode():
            out = backbone.encode(backbone.preprocess(read_image(path))[None])
        return out.patch_tokens[0, -1].float().numpy()  # (h, w, D), L2-normalised by the backbone

    bank = np.concatenate([tokens(p).reshape(-1, tokens(p).shape[-1]) for p in dataset.train])
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    maps = []
    for sample in dataset.test:
        t = tokens(sample.image)
        distance = 1 - (t.reshape(-1, t.shape[-1]) @ bank.T).max(axis=1)
        maps.append(upsample(distance.reshape(t.shape[:2]), read_image(sample.image).shape[:2]))
    auroc, aupr = _direct_pixel_metrics(maps, dataset.test)
    assert rows["anomalydino"]["pixel_auroc"] == pytest.approx(auroc, abs=2e-3)
    assert rows["anomalydino"]["pixel_aupr"] == pytest.approx(aupr, abs=5e-3)
    image_scores = [_image_score(m) for m in maps]
    assert rows["anomalydino"]["image_auroc"] == pytest.approx(
        roc_auc_score([s.label for s in dataset.test], image_scores), abs=1e-6)
    html = (out / "report.html").read_text()
    assert "RANDOM weights" in html and "<svg" in html and "Best and worst cases" in html
    markdown = (out / "results.md").read_text()
    assert "| dpmm |" in markdown and "Paired permutation tests" in markdown and "Foreground pixels only" in markdown
    assert "| backbone ms | scoring ms | ms/sample (sum) |" in markdown and "image by image" in markdown


def test_bench_command_line_gives_run_bench_these_settings():
    """The command line only translates: the same ReportOptions and settings as the Python call above."""
    from normdino.cli import build_parser
    from normdino.cli.options import estimator_settings, report_options, seeds
    from normdino.evaluation.report_options import ReportOptions

    args = build_parser(estimator_options=True).parse_args(
        ["bench", "data", "--methods", ",".join(BENCH_METHODS), "--image-size", "56", "--epochs", "2",
         "--components", "8", "--timing-images", "2", "-o", "out", "--json", "r.json", "--quiet", "--bootstrap",
         "40", "--seeds", "0,1", "--compare", "dpmm,patchcore-150", "--permutations", "99"])
    assert report_options(args) == ReportOptions(output=Path("out"), json_path=Path("r.json"), timing_images=2,
                                                 n_bootstrap=40, compare=(("dpmm", "patchcore-150"),),
                                                 n_permutations=99, progress=False)
    settings = estimator_settings(args, method="dpmm")[0]
    assert (settings["image_size"], settings["epochs"], settings["n_components"]) == (56, 2, 8)
    assert seeds(args.seeds) == (0, 1)
    assert estimator_settings(args, method="patchcore-150")[2]["coreset_size"] == "150"


def test_evaluate_matches_the_detectors_own_maps(bmad, tiny_dinov2_dir, tmp_path, capsys):
    from normdino.detector import AnomalyDetector

    model = tmp_path / "m.normdino"
    assert main(["fit", str(bmad / "train" / "good"), "-o", str(model), "--val", str(bmad / "valid" / "good" / "img"),
                 "--backbone", str(tiny_dinov2_dir), "--image-size", "56", "--epochs", "1", "--components", "8",
                 "--no-cache", "--quiet"]) == 0
    assert main(["evaluate", str(model), str(bmad), "--layout", "bmad-brain", "-o", str(tmp_path / "ev"),
                 "--timing-images", "2", "--no-cache", "--quiet", "--bootstrap", "0", "--foreground", "none"]) == 0
    printed = capsys.readouterr().out  # the table, the random-weights warning, where the report is
    assert "| method | AUROC |" in printed and "RANDOM weights" in printed and "report.html" in printed
    payload = _strict((tmp_path / "ev" / "results.json").read_text())
    rows = payload["rows"]
    assert len(rows) == 1 and REQUIRED_KEYS <= set(rows[0])
    # memory: what scoring reads (the active means, n x 32 float32) apart from the model file's size
    n, k, dim = rows[0]["n_prototypes"], 8, 32
    assert rows[0]["scoring_state_mb"] == round(n * dim * 4 / 2**20, 4)
    assert rows[0]["saved_state_mb"] == round((4 * (4 * k * dim + 2 * k + n * dim) + 16) / 2**20, 4)
    assert payload["context"]["model_file_mb"] == round(model.stat().st_size / 2**20, 4)
    test = load_dataset(bmad).test
    predictions = AnomalyDetector.load(model).predict([s.image for s in test])
    auroc, aupr = _direct_pixel_metrics([p.pixel_map for p in predictions], test)
    assert rows[0]["pixel_auroc"] == pytest.approx(auroc, abs=2e-3)
    assert rows[0]["pixel_aupr"] == pytest.approx(aupr, abs=5e-3)
    assert rows[0]["image_auroc"] == pytest.approx(roc_auc_score([s.label for s in test],
                                                                 [p.score for p in predictions]), abs=1e-6)


class _Oracle:
    """A method stub: patch score = token channel 0 + 0.01 x channel 1."""

    n_prototypes = 1

    def patch_scores(self, tokens):
        return tokens.patches[:, 0, ..., 0] + 0.01 * tokens.patches[:, 0, ..., 1]

    def state_bytes(self):
        return 0


def _oracle_sets(tmp_path, healthy_names, truth):
    rng = np.random.default_rng(0)

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
        samples.append(Sample(image=tmp_path / f"P{i % 2}_{i}.png", mask=path if m.any() else None, label=int(m.any())))
    healthy_samples = [Sample(tmp_path / n, None, 0) for n in healthy_names]
    healthy = LabelledTokens(TokenSet(tokens_of([np.zeros((4, 4), bool)] * len(healthy_names)), [(4, 4)] * len(healthy_names)),
                             healthy_samples)
    test = LabelledTokens(TokenSet(tokens_of(truth), [(4, 4)] * len(truth)), samples)
    return healthy, test


def test_assess_scorer_metrics_match_a_direct_computation(tmp_path):
    """An oracle scorer: AUROC, FPR thresholds and Dice as computed by hand, thresholds from another patient."""
    truth = [np.zeros((4, 4), bool) for _ in range(4)]
    truth[1][1:3, 1:3] = True
    truth[2][0, :] = True
    healthy_names = [f"P{p}_{s}.png" for p in range(2) for s in range(100, 125)]  # patients P0 and P1, as the test
    healthy, test = _oracle_sets(tmp_path, healthy_names, truth)
    folds = calibration_folds([s.image for s in healthy.samples], [s.image for s in test.samples])
    assert folds.n_folds == 2
    result = assess_scorer(Scorer("oracle", _Oracle(), [0]), healthy, test, folds=folds, n_bootstrap=30)
    row = result.row

    scores = (test.tokens.patches[:, 0, ..., 0] + 0.01 * test.tokens.patches[:, 0, ..., 1]).astype(np.float32)
    labels = np.stack(truth)
    assert row["pixel_auroc"] == pytest.approx(roc_auc_score(labels.ravel(), scores.ravel())) == pytest.approx(1.0)
    healthy_scores = (0.01 * healthy.tokens.patches[:, 0, ..., 1]).astype(np.float32)
    for t, fpr in enumerate((10, 5, 1)):
        tp = fp = fn = 0
        for fold in range(2):
            calibrating = np.array([f != fold for f in folds.healthy])
            threshold = result.thresholds[fold][t]
            assert (healthy_scores[calibrating] > threshold).mean() <= fpr / 100 + 1e-9
            scored = np.array([f == fold for f in folds.evaluation])
            predicted = scores[scored] > threshold
            tp += (predicted & labels[scored]).sum()
            fp += (predicted & ~labels[scored]).sum()
            fn += (~predicted & labels[scored]).sum()
        assert row[f"dice_fpr{fpr}"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert row["image_auroc"] == pytest.approx(1.0) and row["calibration_folds"] == 2
    assert row["pixel_auroc_ci"] == pytest.approx([1.0, 1.0])


def test_peak_memory_sees_an_allocation_that_only_the_sampler_can_see():
    """The block is freed inside the ``with``: the readings at enter and exit cannot see it, only the sampler."""
    with PeakMemory() as memory:
        before = PeakMemory.rss_bytes()
        block = np.ones(80 * 2**20 // 8)  # 80 MB, touched
        seen, deadline = memory.n_samples_, time.monotonic() + 5
        while memory.n_samples_ < seen + 2 and time.monotonic() < deadline:
            time.sleep(0.001)  # wait for two samples while the block is alive
        del block
        after = PeakMemory.rss_bytes()
    assert after < before + 40 * 2**20  # freed: the exit reading is no witness
    assert memory.peak_bytes >= before + 60 * 2**20


class _Clock:
    """A fake clock: the stubs below advance it by known amounts, so the measured times are exact."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _timing_stubs(tmp_path, clock, state, costs):
    """A backbone costing 5 ms per image and one method per cost (ms), recording who ran when."""

    class Backbone:
        device = torch.device("cpu")

        def preprocess(self, image):
            return torch.zeros(3, 14, 14)

        def encode(self, batch):
            clock.now += 0.005
            state["backbone"] += 1
            return SimpleNamespace(patch_tokens=torch.zeros(1, 1, 2, 2, 3), cls_tokens=None)

    class Method(_Oracle):
        def __init__(self, name, cost):
            self.name, self.cost = name, cost

        def patch_scores(self, tokens):
            clock.now += self.cost / 1000
            state["calls"].append((self.name, state["sampling"]))
            return super().patch_scores(tokens)

    images = []
    for i in range(3):
        images.append(tmp_path / f"{i}.png")
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(images[-1])
    return Backbone(), [Scorer(name, Method(name, cost), [0]) for name, cost in costs], images


def test_timing_reports_backbone_and_scoring_apart_with_every_method_interleaved(tmp_path, monkeypatch):
    """Backbone and scoring ms are measured apart (exactly, on a fake clock) and the methods take turns per image."""
    clock, state = _Clock(), {"sampling": False, "calls": [], "backbone": 0}

    class RecordingMemory:
        def __init__(self, device):
            self.peak_bytes, self.added_bytes = 3 * 2**20, 2**20  # 1 MB above what was held on entering

        def __enter__(self):
            state["sampling"] = True
            return self

        def __exit__(self, *exc):
            state["sampling"] = False

    backbone, scorers, images = _timing_stubs(tmp_path, clock, state, [("a", 2.0), ("b", 7.0), ("c", 1.0)])
    monkeypatch.setattr(timing, "PeakMemory", RecordingMemory)
    timings = timing.time_methods(backbone, scorers, images, 0.0, 0.01, warmup=1, clock=clock)
    assert [t.backbone_ms for t in timings] == pytest.approx([5.0] * 3)
    assert [t.scoring_ms for t in timings] == pytest.approx([2.0, 7.0, 1.0])
    assert [t.total_ms for t in timings] == pytest.approx([7.0, 12.0, 6.0])
    row = timings[1].row()
    assert (row["backbone_ms"], row["scoring_ms"], row["ms_per_sample"], row["timing_images"]) == (5.0, 7.0, 12.0, 3)
    timed = [name for name, sampling in state["calls"] if not sampling]
    assert timed == ["a", "b", "c"] + ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # warm-up, then rotating turns
    sampled = [name for name, sampling in state["calls"] if sampling]
    assert sampled == ["a"] * 3 + ["b"] * 3 + ["c"] * 3  # peak memory: each method's own pass, never timed
    assert all(t.peak_mb == 1.0 for t in timings) and state["backbone"] == 3 + 9 + 9  # stubs: no weights, no state

    # a backbone with weights and a method with a scoring state: peak = weights + state + what the pass added
    backbone.model = torch.nn.Linear(10, 10)  # 110 float32 = 440 bytes
    scorers[0].method.scoring_bytes = lambda: 1000
    [one] = timing.time_methods(backbone, scorers[:1], images[:1], 0.0, 0.01, warmup=0, clock=clock)
    assert one.peak_mb == (440 + 1000 + 2**20) / 2**20


def test_evaluate_methods_times_all_methods_in_one_loop(tmp_path, monkeypatch):
    """evaluate_methods hands every scorer to one time_methods call and puts each one's columns in its row."""
    calls = []

    def fake_time_methods(backbone, scorers, images, sigma, top_fraction):
        calls.append([s.name for s in scorers])
        return [timing.Timing(4.0, float(i), 10.0, len(images)) for i in range(len(scorers))]

    truth = [np.zeros((4, 4), bool) for _ in range(2)]
    truth[1][1:3, 1:3] = True
    healthy, test = _oracle_sets(tmp_path, [f"P{p}_{s}.png" for p in range(2) for s in range(100, 104)], truth)
    monkeypatch.setattr(protocol, "time_methods", fake_time_methods)
    results = protocol.evaluate_methods([Scorer("x", _Oracle(), [0]), Scorer("y", _Oracle(), [0])],
                                        SimpleNamespace(device="cpu"), healthy, test, timing_images=2)
    assert calls == [["x", "y"]]
    assert [(r.row["backbone_ms"], r.row["scoring_ms"], r.row["ms_per_sample"]) for r in results] == [(4.0, 0.0, 4.0),
                                                                                                        (4.0, 1.0, 5.0)]


def test_results_json_is_strict_and_undefined_metrics_are_explained(tmp_path):
    accumulator = PixelScoreAccumulator().add(np.linspace(0, 1, 16).reshape(4, 4), None)  # no anomalous pixel
    row = {"method": "m", "pixel_auroc": float("nan"), "pixel_aupr": float("nan"), "image_auroc": float("nan"),
           "ms_per_sample": 1.5, "pixel_auroc_ci": [float("nan"), float("nan")]}
    result = AssessedResult(row, accumulator, [], ImageStatistics(3))
    with pytest.warns(RuntimeWarning):
        paths = write_outputs([result], [], SimpleNamespace(is_random=False), tmp_path, "t", {"x": float("inf")})
    payload = _strict(paths["json"].read_text())
    assert payload["rows"][0]["pixel_auroc"] is None and payload["context"]["x"] is None
    markdown = paths["markdown"].read_text()
    assert "| m | — |" in markdown and "as null" in markdown


def test_markdown_table_has_the_paper_columns_and_intervals():
    table = markdown_table([{"method": "dpmm", "pixel_auroc": 0.9, "pixel_auroc_ci": [0.85, 0.93], "dice_fpr5": 0.5,
                             "n_prototypes": 150}])
    assert table.splitlines()[0].startswith("| method | AUROC | AUPR | Dice@10% | Dice@5% | Dice@1%")
    assert "| dpmm | 0.9000 [0.850, 0.930] |" in table
