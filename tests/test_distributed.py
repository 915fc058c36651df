"""torchrun scale-out: helpers are identities in a plain run; 2 gloo processes on CPU fit the same mixture as one.

The multi-process tests fork two workers that join a gloo group through a file store (no ports), run the
same code a torchrun job runs, and write what they computed to .npz/.json files that the test compares
with a one-process computation.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed
import torch.multiprocessing as mp

from normdino import distributed as dist
from normdino.errors import InputError
from normdino.evaluation.accumulator import PixelScoreAccumulator
from normdino.thresholds import thresholds_at_fprs
from normdino.features.tokens import TokenSet
from normdino.methods.mixture import DirichletProcessMixture

WORLD = 2
TIMEOUT = datetime.timedelta(seconds=120)  # a collective that waits longer fails the test instead of hanging it
K, D = 12, 16
EPOCHS = 4


# ---------------------------------------------------------------------- data shared by workers and the reference


def _clustered(n: int, seed: int) -> np.ndarray:
    """Unit vectors around 6 directions (a little like DINO tokens), float32."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(6, D))
    x = centres[rng.integers(0, 6, n)] + 0.3 * rng.normal(size=(n, D))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _local_batches(rank: int) -> list[np.ndarray]:
    """This rank's share of 5 global batches (shares of different sizes, 90-130 rows)."""
    rng = np.random.default_rng(1000 + rank)
    return [_clustered(int(rng.integers(90, 131)), seed=10 * i + rank) for i in range(5)]


def _validation(rank: int) -> np.ndarray:
    return _clustered(150 + 40 * rank, seed=500 + rank)


def _image_with_mask(rank: int, image: int) -> tuple[np.ndarray, np.ndarray | None]:
    rng = np.random.default_rng(100 * rank + image)
    mask = None if image == 0 else (rng.random((12, 10)) > 0.8)
    scores = rng.random((12, 10)).astype(np.float32) + (0.0 if mask is None else 0.5 * mask)
    return scores, mask


def _token_share(rank: int) -> TokenSet:
    patches = np.random.default_rng(rank).normal(size=(2 + rank, 1, 2, 2, 3)).astype(np.float16)
    return TokenSet(patches, [(8, 8)] * (2 + rank))


class _MeanMethod:
    """A stand-in NormativeMethod: the mean token (and the order-sensitive first token) of train, val's count."""

    name = "mean"

    def fit(self, train: TokenSet, val: TokenSet | None = None) -> "_MeanMethod":
        flat = train.flat_layer(-1).astype(np.float64)
        self.mean_ = torch.from_numpy(np.concatenate([flat.mean(0), flat[0]]))
        self.fit_info_ = {"n_train": len(train), "n_val": 0 if val is None else len(val), "fitted_here": dist.rank()}
        return self

    def fit_info(self) -> dict:
        return dict(self.fit_info_)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean_}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], info: dict | None = None) -> "_MeanMethod":
        self.mean_, self.fit_info_ = tensors["mean"], dict(info or {})
        return self


def _mixture(covariance: str) -> DirichletProcessMixture:
    return DirichletProcessMixture(n_components=K, covariance_type=covariance, seed=3)


def _fit_with_selection(model: DirichletProcessMixture, data, val: np.ndarray, distributed: bool, **fit_kwargs):
    """Fit keeping the epoch of best validation log-likelihood summed over every rank's validation share."""
    history: list[float] = []

    def keep_best(epoch: int, m: DirichletProcessMixture) -> bool:
        history.append(dist.global_mean(float(m.score_samples(val).double().sum()), len(val)))
        return False

    model.fit(data, epochs=EPOCHS, callback=keep_best, distributed=distributed, **fit_kwargs)
    return history


def _summary(model: DirichletProcessMixture, history: list[float]) -> dict[str, np.ndarray]:
    return {"means": model.means_.numpy(), "weights": model.weights_.numpy(), "alpha": np.array([model.alpha_]),
            "history": np.array(history), "epoch_ll": np.array([model.epoch_log_likelihood_]),
            "covariances": model.covariances_.numpy()}


# ---------------------------------------------------------------------- the worker (runs in each forked process)


def _worker(rank: int, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=WORLD,
                                         timeout=TIMEOUT)
    try:
        results: dict[str, object] = {}
        # the same global batches as lists of shares, shuffled alike on every rank
        for covariance in ("diag", "spherical", "full"):
            model = _mixture(covariance)
            history = _fit_with_selection(model, _local_batches(rank), _validation(rank), True)
            np.savez(f"{out}/list-{covariance}-{rank}.npz", **_summary(model, history))
        # array shares: the global batches are exactly a one-process fit's (shuffled or not)
        share = _clustered(300 + 57 * rank, seed=77 + rank)
        for shuffle in (True, False):
            model = _mixture("diag")
            history = _fit_with_selection(model, share, _validation(rank), True, batch_size=160, shuffle=shuffle)
            np.savez(f"{out}/array-{shuffle}-{rank}.npz", **_summary(model, history))
        # rows of different counts gathered in rank order; thresholds over all ranks' scores
        rows = np.arange(6 * (rank + 2), dtype=np.float32).reshape(-1, 2) + 100 * rank
        np.save(f"{out}/gathered-{rank}.npy", dist.gather_rows(rows))
        scores = [np.random.default_rng(rank).gamma(2.0, size=(7 + rank, 9)).astype(np.float32) for _ in range(3)]
        np.save(f"{out}/thresholds-{rank}.npy", dist.thresholds_at_fprs(scores, [0.01, 0.05, 0.1]))
        accumulator = PixelScoreAccumulator(thresholds=(0.5,), track_regions=True)
        for image in range(2 + rank):
            scores_map, mask = _image_with_mask(rank, image)
            accumulator.add(scores_map, mask)
        merged = dist.reduce_accumulator(accumulator)
        results["metrics"] = [merged.auroc(), merged.aupr(), merged.aupro(), merged.dice_at(0.5), merged.threshold_at_fpr(0.05),
                              merged.n_images_]
        state = dist.broadcast_tensors({"bank": torch.arange(6.0).view(3, 2) * (rank + 1)} if rank == 0 else None)
        results["broadcast"] = state["bank"].tolist()
        # a token set gathered in rank order; a computation on rank 0 given to every rank, or its error
        share = TokenSet(np.full((rank + 1, 1, 2, 2, 3), rank, np.float16), [(4 + rank, 5)] * (rank + 1),
                         sources=[f"r{rank}-{i}" for i in range(rank + 1)])
        whole = dist.gather_token_set(share)
        results["token_set"] = [whole.patches[:, 0, 0, 0, 0].tolist(), [list(s) for s in whole.shapes], whole.sources]
        picked = dist.on_main(lambda: {"indices": torch.tensor([2, 0, 1])}, "the coreset selection")
        results["on_main"] = picked["indices"].tolist()
        try:
            dist.on_main(lambda: (_ for _ in ()).throw(InputError("no rows to select from.")), "the coreset selection")
        except InputError as err:
            results["on_main_error"] = f"own: {err}"
        except dist.DistributedError as err:
            results["on_main_error"] = str(err)
        # any method: shares gathered, fitted on rank 0, its state installed everywhere
        method = dist.fit_on_main(_MeanMethod(), _token_share(rank), _token_share(rank + 5))
        results["fit_on_main"] = [method.mean_.tolist(), method.fit_info()]
        # a split decided on every rank's sources, mapped back to each rank's own items
        sources = [f"s{rank}-{i}" for i in range(3 + rank)]  # rank 0: 3 items, rank 1: 4
        everything = dist.gather_list(sources)
        results["split"] = [len(everything), dist.local_indices(np.array([0, 2, 3, 6]), len(sources)).tolist()]
        # faults: a user error on rank 1 alone ends the block on both ranks with one message
        try:
            with dist.failing_together("token extraction"):
                if rank == 1:
                    raise InputError("image b.png cannot be read.")
        except dist.DistributedError as err:
            results["fault"] = str(err)
        # ... and a NaN batch on rank 1 in the middle of EM stops both ranks at the same step (no hang)
        try:
            with dist.failing_together("the mixture fit"):
                batches = _local_batches(rank)
                if rank == 1:
                    batches[3] = np.full_like(batches[3], np.nan)
                _mixture("diag").fit(batches, epochs=1, shuffle=False, distributed=True)
        except dist.DistributedError as err:
            results["em_fault"] = str(err)
        # after the faults the group still works
        results["after"] = dist.global_sum(rank + 1.0)
        Path(f"{out}/results-{rank}.json").write_text(json.dumps(results))
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one torch thread is 10-20x faster than two on a loaded 2-core machine (no spin-waiting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """Run the worker on 2 forked gloo processes once for the module; returns the folder of their outputs."""
    out = tmp_path_factory.mktemp("ranks")
    mp.start_processes(_worker, args=(str(out),), nprocs=WORLD, start_method="fork")
    return out


def _reference_list(covariance: str) -> dict[str, np.ndarray]:
    """One process, the same global batches (rank 0's share then rank 1's), validation of both ranks together."""
    shares = [_local_batches(r) for r in range(WORLD)]
    batches = [np.concatenate([shares[r][i] for r in range(WORLD)]) for i in range(len(shares[0]))]
    model = _mixture(covariance)
    history = _fit_with_selection(model, batches, np.concatenate([_validation(r) for r in range(WORLD)]), False)
    return _summary(model, history)


def _assert_same_model(got: dict, want: dict) -> None:
    np.testing.assert_allclose(got["means"], want["means"], atol=2e-5)
    np.testing.assert_allclose(got["weights"], want["weights"], atol=2e-5)
    # covariances are Q/N - mu mu^T: float32 cancellation, so compared against their scale (~1e-2 here)
    np.testing.assert_allclose(got["covariances"], want["covariances"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["alpha"], want["alpha"], rtol=1e-5)
    np.testing.assert_allclose(got["history"], want["history"], rtol=1e-5)
    np.testing.assert_allclose(got["epoch_ll"], want["epoch_ll"], rtol=1e-5)
    assert int(np.argmax(got["history"])) == int(np.argmax(want["history"]))  # the same best epoch


# ---------------------------------------------------------------------- multi-process


@pytest.mark.parametrize("covariance", ["diag", "spherical", "full"])
def test_two_ranks_fit_the_same_mixture_as_one_process(two_ranks: Path, covariance: str) -> None:
    want = _reference_list(covariance)
    for r in range(WORLD):
        _assert_same_model(dict(np.load(two_ranks / f"list-{covariance}-{r}.npz")), want)


@pytest.mark.parametrize("shuffle", [True, False])
def test_array_shares_fit_the_one_process_model_of_the_whole_array(two_ranks: Path, shuffle: bool) -> None:
    whole = np.concatenate([_clustered(300 + 57 * r, seed=77 + r) for r in range(WORLD)])
    model = _mixture("diag")
    val = np.concatenate([_validation(r) for r in range(WORLD)])
    history = _fit_with_selection(model, whole, val, False, batch_size=160, shuffle=shuffle)
    for r in range(WORLD):
        _assert_same_model(dict(np.load(two_ranks / f"array-{shuffle}-{r}.npz")), _summary(model, history))


def test_rows_gathered_in_rank_order_and_thresholds_equal_one_process(two_ranks: Path) -> None:
    rows = np.concatenate([np.arange(6 * (r + 2), dtype=np.float32).reshape(-1, 2) + 100 * r for r in range(WORLD)])
    scores = [np.random.default_rng(r).gamma(2.0, size=(7 + r, 9)).astype(np.float32) for r in range(WORLD) for _ in range(3)]
    want = thresholds_at_fprs(scores, [0.01, 0.05, 0.1])
    for r in range(WORLD):
        np.testing.assert_array_equal(np.load(two_ranks / f"gathered-{r}.npy"), rows)
        np.testing.assert_array_equal(np.load(two_ranks / f"thresholds-{r}.npy"), want)  # exactly equal


def test_metric_accumulators_summed_across_ranks_equal_one_process(two_ranks: Path) -> None:
    one = PixelScoreAccumulator(thresholds=(0.5,), track_regions=True)
    for r in range(WORLD):
        for image in range(2 + r):
            one.add(*_image_with_mask(r, image))
    want = [one.auroc(), one.aupr(), one.aupro(), one.dice_at(0.5), one.threshold_at_fpr(0.05), one.n_images_]
    for r in range(WORLD):
        got = json.loads((two_ranks / f"results-{r}.json").read_text())["metrics"]
        np.testing.assert_allclose(got, want, rtol=1e-12)


def test_any_method_fits_on_rank_0_with_every_share_and_its_state_reaches_all(two_ranks: Path) -> None:
    train = [_token_share(r) for r in range(WORLD)]
    whole = TokenSet(np.concatenate([t.patches for t in train]), sum([t.shapes for t in train], []))
    want = _MeanMethod().fit(whole)
    for r in range(WORLD):
        mean, info = json.loads((two_ranks / f"results-{r}.json").read_text())["fit_on_main"]
        np.testing.assert_allclose(mean, want.mean_.numpy(), rtol=1e-12)
        assert info == {"n_train": 5, "n_val": 15, "fitted_here": 0}  # 2+3 train, 7+8 validation images


def test_a_failing_rank_ends_every_rank_with_its_message(two_ranks: Path) -> None:
    for r in range(WORLD):
        results = json.loads((two_ranks / f"results-{r}.json").read_text())
        assert results["broadcast"] == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]
        assert results["token_set"] == [[0.0, 1.0, 1.0], [[4, 5], [5, 5], [5, 5]], ["r0-0", "r1-0", "r1-1"]]
        assert results["on_main"] == [2, 0, 1]
        assert results["split"] == [7, [0, 2] if r == 0 else [0, 3]]
        want = "own: no rows to select from." if r == 0 else "rank 0 failed during the coreset selection: no rows to select from."
        assert results["on_main_error"] == want
        assert results["fault"] == "rank 1 of 2 failed during token extraction: image b.png cannot be read."
        assert results["em_fault"].startswith("rank 1 of 2 failed during the mixture fit: ")
        assert "NaN" in results["em_fault"]
        assert results["after"] == 3.0


# ---------------------------------------------------------------------- plain run: identities


def test_helpers_are_identities_without_a_process_group(monkeypatch) -> None:
    for key in dist.TORCHRUN_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    assert not dist.is_distributed() and dist.rank() == 0 and dist.world_size() == 1 and dist.is_main()
    assert dist.init_from_env("cpu") == "cpu" and not dist.is_distributed()
    t = torch.arange(4.0)
    assert dist.all_reduce_sum(t) is t and torch.equal(t, torch.arange(4.0))
    a = np.ones((3, 2))
    assert dist.gather_rows(a) is a
    assert dist.global_mean(6.0, 3) == 2.0
    assert dist.all_gather_object({"x": 1}) == [{"x": 1}]
    with pytest.raises(InputError, match="plain"):
        with dist.failing_together("anything"):
            raise InputError("plain errors pass through unchanged")


def test_distributed_flag_without_a_group_is_the_ordinary_fit() -> None:
    x = _clustered(600, seed=5)
    a = _mixture("diag").fit(x, epochs=2, batch_size=200)
    b = _mixture("diag").fit(x, epochs=2, batch_size=200, distributed=True)
    for key, value in a.to_tensors().items():
        assert torch.equal(value, b.to_tensors()[key]), key


def test_shards_are_contiguous_near_equal_and_restore_the_order() -> None:
    items = list(range(11))
    shares = [dist.shard(items, 4, r) for r in range(4)]
    assert shares == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10]]
    assert [dist.shard_range(3, 5, r) for r in range(5)] == [(0, 1), (1, 2), (2, 3), (3, 3), (3, 3)]
    assert sum(shares, []) == items


def test_torchrun_environment_and_backend() -> None:
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert dist.launched_by_torchrun(env)
    assert not dist.launched_by_torchrun({**env, "WORLD_SIZE": "1"})
    assert not dist.launched_by_torchrun({k: v for k, v in env.items() if k != "MASTER_PORT"})
    assert dist.backend_for("cuda:1") == "nccl" and dist.backend_for("cpu") == "gloo"
    assert os.environ.get("WORLD_SIZE") in (None, "1") or dist.is_distributed() is False


# ---------------------------------------------------------------------- the detector on rank shares

DETECTOR_CASES = {
    "dpmm": dict(method="dpmm", n_components=8, epochs=2, batch_images=4),
    "anomalydino": dict(method="anomalydino"),
    "patchcore-30": dict(method="patchcore-30"),
    "dpmm-held-out": dict(method="dpmm", n_components=8, epochs=2, batch_images=4, val_fraction=0.25),
    "himatch": dict(method="himatch", layers=(1, 2), clusters=4, retrieve_k=2),
    "dpmm-multistage": dict(method="dpmm-multistage", layers=(1, 2), n_components=8, epochs=2, batch_images=4),
}


def _detector_fit(case: str, backbone: str, data: Path, share=lambda items: items):
    from normdino.detector import AnomalyDetector

    kwargs = dict(DETECTOR_CASES[case])
    detector = AnomalyDetector(backbone=backbone, image_size=56, progress=False, **kwargs)
    train = sorted((data / "train" / "good").glob("*.png"))
    val = None if case.endswith("held-out") else sorted((data / "valid" / "good" / "img").glob("*.png"))
    detector.fit(share(train), None if val is None else share(val))
    state = {f"state.{k}": v.numpy() for k, v in detector.method_.state_dict().items()}
    summary = {k: detector.training_summary_[k] for k in ("n_train_images", "n_val_images", "n_train_tokens", "image_shapes")}
    summary["best_epoch"] = detector.training_summary_.get("best_epoch")
    return {"pixel": detector.pixel_thresholds_, "image": detector.image_thresholds_, **state}, summary


def _detector_worker(rank: int, out: str, backbone: str, data: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=WORLD,
                                         timeout=TIMEOUT)
    try:
        for case in DETECTOR_CASES:
            arrays, summary = _detector_fit(case, backbone, Path(data), dist.shard)
            np.savez(f"{out}/{case}-{rank}.npz", **arrays)
            Path(f"{out}/{case}-{rank}.json").write_text(json.dumps(summary))
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def phantom_data(tmp_path_factory) -> Path:
    from normdino.io.phantoms import write_phantom_dataset

    return write_phantom_dataset(tmp_path_factory.mktemp("phantoms"), n_train=12, n_valid=10,
                                 n_test_normal=1, n_test_anomalous=1, size=64, seed=0)


@pytest.fixture(scope="module")
def detector_ranks(tmp_path_factory, tiny_dinov2_dir, phantom_data) -> Path:
    out = tmp_path_factory.mktemp("detector-ranks")
    mp.start_processes(_detector_worker, args=(str(out), str(tiny_dinov2_dir), str(phantom_data)), nprocs=WORLD,
                       start_method="fork")
    return out


@pytest.mark.parametrize("case", sorted(DETECTOR_CASES))
def test_detector_fitted_on_rank_shares_equals_one_process(case, detector_ranks, tiny_dinov2_dir, phantom_data) -> None:
    want, want_summary = _detector_fit(case, str(tiny_dinov2_dir), phantom_data)
    for r in range(WORLD):
        got = dict(np.load(detector_ranks / f"{case}-{r}.npz"))
        assert json.loads((detector_ranks / f"{case}-{r}.json").read_text()) == json.loads(json.dumps(want_summary))
        assert sorted(got) == sorted(want)
        for key, value in want.items():
            np.testing.assert_allclose(got[key], value, rtol=1e-4, atol=2e-5, err_msg=key)


# ---------------------------------------------------------------------- the command line on 2 ranks


def _fit_argv(train: Path, val: Path, output: Path, backbone: str) -> list[str]:
    return ["fit", str(train), "--val", str(val), "-o", str(output), "--backbone", backbone, "--image-size", "56",
            "--epochs", "2", "--components", "8", "--batch-images", "4", "--no-cache", "--quiet"]


def _cli_worker(rank: int, out: str, argv_sets: list[list[str]]) -> None:
    """Run ``normdino`` as a torchrun rank would (the group exists already); exit codes and stderr to files."""
    import contextlib
    import io

    from normdino.cli import main

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=WORLD,
                                         timeout=TIMEOUT)
    try:
        for i, argv in enumerate(argv_sets):
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                code = main(argv)
            Path(f"{out}/cli-{i}-{rank}.json").write_text(json.dumps({"code": code, "stderr": err.getvalue()}))
    finally:
        torch.distributed.destroy_process_group()


def _predict_argv(model: Path, data: Path, output: Path) -> list[str]:
    return ["predict", str(model), str(data / "test" / "Ungood" / "img"), str(data / "test" / "good" / "img"),
            str(data / "valid" / "good" / "img"), "-o", str(output), "--quiet"]


@pytest.fixture(scope="module")
def cli_ranks(tmp_path_factory, tiny_dinov2_dir, phantom_data) -> Path:
    out = tmp_path_factory.mktemp("cli-ranks")
    broken = out / "broken-train"
    broken.mkdir()
    for i, png in enumerate(sorted((phantom_data / "train" / "good").glob("*.png"))[:4]):
        (broken / f"{i}.png").write_bytes(png.read_bytes())
    # a header but no pixels: it passes the size check every rank makes before any work and fails only when
    # rank 1 (images 2-3) decodes it during token extraction
    (broken / "3.png").write_bytes((broken / "0.png").read_bytes()[:120])
    argv_sets = [_fit_argv(phantom_data / "train" / "good", phantom_data / "valid" / "good" / "img", out / "model.normdino",
                           str(tiny_dinov2_dir)),
                 _fit_argv(broken, phantom_data / "valid" / "good" / "img", out / "broken.normdino", str(tiny_dinov2_dir)),
                 _predict_argv(out / "model.normdino", phantom_data, out / "predicted"),
                 _evaluate_argv(out / "model.normdino", phantom_data, out / "evaluated-bmad"),
                 _evaluate_argv(out / "model.normdino", _patient_folders(phantom_data, out / "patients"), out / "evaluated-folders"),
                 ["evaluate", str(out / "model.normdino"), str(out), "--layout", "volumes", "-o", str(out / "vol"), "--quiet"],
                 _evaluate_argv(out / "model.normdino", _truncated_last_image(out / "patients", out / "broken-eval"),
                                out / "evaluated-broken")]
    mp.start_processes(_cli_worker, args=(str(out), argv_sets), nprocs=WORLD, start_method="fork")
    return out


def _evaluate_argv(model: Path, data: Path, output: Path) -> list[str]:
    """Batch size 1: every image's tokens come from the same forward pass whatever its rank's share."""
    return ["evaluate", str(model), str(data), "-o", str(output), "--bootstrap", "40", "--timing-images", "1",
            "--batch-size", "1", "--no-cache", "--quiet"]


def _truncated_last_image(folders: Path, root: Path) -> Path:
    """A copy of a folders set whose last anomalous image (in rank 1's share only) has a header but no pixels."""
    import shutil

    shutil.copytree(folders, root)
    last = sorted((root / "anomalous").glob("*.png"))[-1]
    last.write_bytes(last.read_bytes()[:120])
    return root


def _patient_folders(phantom: Path, root: Path) -> Path:
    """A folders-layout set whose healthy images are also evaluated: 5 patients, so thresholds are cross-fitted
    in 2 folds; 9 normal + 10 anomalous images give shares of different sizes (healthy 5/4, evaluated 10/9)."""
    for name in ("normal", "anomalous", "masks"):
        (root / name).mkdir(parents=True)
    for i, png in enumerate(sorted((phantom / "valid" / "good" / "img").glob("*.png"))[:9]):
        (root / "normal" / f"patient{i % 5}_{i}.png").write_bytes(png.read_bytes())
    for i, png in enumerate(sorted((phantom / "valid" / "Ungood" / "img").glob("*.png"))):
        name = f"patient{i % 5}_{20 + i}.png"
        (root / "anomalous" / name).write_bytes(png.read_bytes())
        (root / "masks" / name).write_bytes((phantom / "valid" / "Ungood" / "label" / png.name).read_bytes())
    return root


def test_cli_fit_on_two_ranks_writes_the_one_process_model(cli_ranks, tiny_dinov2_dir, phantom_data, tmp_path) -> None:
    from normdino.cli import main
    from normdino.detector import AnomalyDetector

    for r in range(WORLD):
        assert json.loads((cli_ranks / f"cli-0-{r}.json").read_text()) == {"code": 0, "stderr": ""}
    assert main(_fit_argv(phantom_data / "train" / "good", phantom_data / "valid" / "good" / "img",
                          tmp_path / "one.normdino", str(tiny_dinov2_dir))) == 0
    one = AnomalyDetector.load(tmp_path / "one.normdino", progress=False)
    two = AnomalyDetector.load(cli_ranks / "model.normdino", progress=False)
    np.testing.assert_allclose(two.prototypes_.numpy(), one.prototypes_.numpy(), atol=2e-5)
    np.testing.assert_allclose(two.pixel_thresholds_, one.pixel_thresholds_, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(two.image_thresholds_, one.image_thresholds_, rtol=1e-5, atol=1e-6)
    for key in ("n_train_images", "n_val_images", "best_epoch", "n_prototypes"):
        assert two.training_summary_[key] == one.training_summary_[key], key


def test_cli_fit_failing_on_one_rank_ends_both_with_one_message_and_no_model(cli_ranks) -> None:
    results = [json.loads((cli_ranks / f"cli-1-{r}.json").read_text()) for r in range(WORLD)]
    assert [r["code"] for r in results] == [1, 1]
    assert results[1]["stderr"] == ""  # only rank 0 speaks
    message = results[0]["stderr"].strip()
    assert message.startswith("normdino fit: error: rank 1 of 2 failed during token extraction: ")
    assert "3.png" in message and len(message.splitlines()) == 1
    assert not (cli_ranks / "broken.normdino").exists()
    assert not [p for p in cli_ranks.iterdir() if p.name.startswith(".broken.normdino")]  # no temporary left


def test_cli_predict_on_two_ranks_writes_the_one_process_results(cli_ranks, phantom_data, tmp_path) -> None:
    import csv

    from normdino.cli import main

    for r in range(WORLD):
        assert json.loads((cli_ranks / f"cli-2-{r}.json").read_text()) == {"code": 0, "stderr": ""}
    assert main(_predict_argv(cli_ranks / "model.normdino", phantom_data, tmp_path / "one")) == 0
    two, one = cli_ranks / "predicted", tmp_path / "one"
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())  # no rank files left
    rows2, rows1 = (list(csv.DictReader((d / "scores.csv").open())) for d in (two, one))
    assert len(rows1) == 12 and [r["input"] for r in rows2] == [r["input"] for r in rows1]  # input order
    for a, b in zip(rows2, rows1):
        for key in a:
            if key in ("score", "pixel_threshold", "image_threshold", "anomalous_fraction"):
                assert abs(float(a[key]) - float(b[key])) < 2e-5, key
            else:
                assert a[key] == b[key], key
    summary2, summary1 = (json.loads((d / "summary.json").read_text()) for d in (two, one))
    assert summary2.keys() == summary1.keys()
    assert summary2["n_inputs"] == summary1["n_inputs"] == 12 and summary2["n_written"] == 12


TIMING_KEYS = ("backbone_ms", "scoring_ms", "ms_per_sample", "peak_memory_mb", "peak_memory_gb")


@pytest.mark.parametrize("case", ["bmad", "folders"])
def test_cli_evaluate_on_two_ranks_writes_the_one_process_results(case, cli_ranks, tmp_path) -> None:
    from normdino.cli import main

    index = {"bmad": 3, "folders": 4}[case]
    for r in range(WORLD):
        assert json.loads((cli_ranks / f"cli-{index}-{r}.json").read_text()) == {"code": 0, "stderr": ""}
    two = cli_ranks / f"evaluated-{case}"
    argv = _evaluate_argv(cli_ranks / "model.normdino", Path(json.loads((two / "results.json").read_text())["context"]["data"]),
                          tmp_path / "one")
    assert main(argv) == 0
    one = tmp_path / "one"
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir()) == ["report.html", "results.json", "results.md"]
    got, want = (json.loads((d / "results.json").read_text()) for d in (two, one))
    assert got["context"].pop("processes") == WORLD and got["context"] == want["context"]
    assert len(got["rows"]) == len(want["rows"]) == 1
    row, expected = got["rows"][0], want["rows"][0]
    assert sorted(row) == sorted(expected)
    assert row["calibration_folds"] == (2 if case == "folders" else 1)
    assert any(key.endswith("_ci") for key in row) and "fg_pixel_auroc" in row and row["aupro"] is not None
    for key, value in expected.items():
        if key in TIMING_KEYS:
            continue
        if isinstance(value, float):
            assert row[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
        elif isinstance(value, list) and value and isinstance(value[0], float):
            assert row[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
        else:
            assert row[key] == value, key
    assert row["ms_per_sample"] > 0  # timed on rank 0


def test_cli_evaluate_volumes_layout_is_refused_under_torchrun_with_one_message(cli_ranks) -> None:
    results = [json.loads((cli_ranks / f"cli-5-{r}.json").read_text()) for r in range(WORLD)]
    assert [r["code"] for r in results] == [1, 1] and results[1]["stderr"] == ""
    assert results[0]["stderr"].strip() == ("normdino evaluate: error: normdino evaluate --layout volumes does not run under "
                                            "torchrun yet; run it as one process: python -m normdino evaluate ... --layout volumes")
    assert not (cli_ranks / "vol").exists()


def test_cli_evaluate_failing_on_one_rank_ends_both_with_one_message_and_no_results(cli_ranks) -> None:
    results = [json.loads((cli_ranks / f"cli-6-{r}.json").read_text()) for r in range(WORLD)]
    assert [r["code"] for r in results] == [1, 1] and results[1]["stderr"] == ""
    message = results[0]["stderr"].strip()
    assert message.startswith("normdino evaluate: error: rank 1 of 2 failed during token extraction: ")
    assert "patient4_29.png" in message and len(message.splitlines()) == 1
    assert not (cli_ranks / "evaluated-broken").exists()


def test_image_statistics_of_two_shares_extended_in_order_equal_one_pass() -> None:
    from normdino.evaluation.statistics import ImageStatistics

    rng = np.random.default_rng(5)
    images = [(rng.random((9, 7)).astype(np.float32), None if i % 3 == 0 else rng.random((9, 7)) > 0.7) for i in range(7)]

    def statistics(items) -> ImageStatistics:
        stats = ImageStatistics(2)
        for scores, mask in items:
            stats.add(scores + (0 if mask is None else 0.3 * mask), mask, (0.5, 0.9), float(scores.max()), int(mask is not None))
        return stats

    whole, joined = statistics(images), statistics(images[:4]).extend(statistics(images[4:]))
    assert joined.labels == whole.labels and joined.scores == whole.scores
    assert joined.bootstrap(30, seed=2) == whole.bootstrap(30, seed=2)
    with pytest.raises(InputError, match="cannot be joined"):
        whole.extend(ImageStatistics(3))


# ---------------------------------------------------------------------- issue 20: empty held-out shares, mixed inputs


def test_shares_of_images_and_volumes_follow_the_one_process_order() -> None:
    """One list (the images, then the volumes) is shared out; rank order restores it, whatever the counts."""
    from normdino.io.inputs import Inputs
    from normdino.torchrun import share_of

    for n_images, n_volumes, ranks in [(5, 2, 2), (1, 4, 2), (3, 3, 4), (0, 3, 2), (4, 0, 3), (2, 1, 5)]:
        inputs = Inputs(images=[Path(f"i{k}.png") for k in range(n_images)],
                        volumes=[Path(f"v{k}.nii.gz") for k in range(n_volumes)])
        shares = [share_of(inputs, *dist.shard_range(n_images + n_volumes, ranks, r)) for r in range(ranks)]
        assert [p for s in shares for p in [*s.images, *s.volumes]] == [*inputs.images, *inputs.volumes]
        sizes = [len(s.images) + len(s.volumes) for s in shares]
        assert max(sizes) - min(sizes) <= 1


def _write_volume(path: Path, seed: int, slices: int = 4) -> None:
    import nibabel as nib

    from normdino.io.phantoms import make_phantom

    rng = np.random.default_rng(seed)
    planes = np.stack([make_phantom(rng, size=48, lesions=0)[0] for _ in range(slices)], axis=2)
    nib.save(nib.Nifti1Image((planes * 1000).astype(np.int16), np.diag([1.0, 1.0, 3.0, 1.0])), path)


def _mixed_argvs(data: Path, out: Path, backbone: str) -> list[list[str]]:
    """The reviewer's cases: (0) fit without --val holding out ONE image, so one rank holds none;
    (1, 2) fit on a folder of images and volumes (dpmm with --val, and the seeded one-shot pick without), each
    into ``out``."""
    common = ["--backbone", backbone, "--image-size", "56", "--no-cache", "--quiet"]
    dpmm = ["--epochs", "2", "--components", "8", "--batch-images", "4"]
    return [["fit", str(data / "images"), "-o", str(out / "held-out.normdino"), "--val-fraction", "0.1", *dpmm, *common],
            ["fit", str(data / "mixed"), "--val", str(data / "val"), "-o", str(out / "mixed-dpmm.normdino"), *dpmm,
             *common],
            ["fit", str(data / "mixed"), "-o", str(out / "mixed-1shot.normdino"), "--method", "anomalydino-1shot",
             "--seed", "3", *common]]


@pytest.fixture(scope="module")
def mixed_ranks(tmp_path_factory, tiny_dinov2_dir, phantom_data) -> tuple[Path, Path]:
    pytest.importorskip("nibabel")
    data = tmp_path_factory.mktemp("mixed-data")
    (data / "images").mkdir()
    (data / "mixed").mkdir()
    (data / "val").mkdir()
    for png in sorted((phantom_data / "valid" / "good" / "img").glob("*.png"))[:4]:
        (data / "val" / png.name).write_bytes(png.read_bytes())
    for i, png in enumerate(sorted((phantom_data / "train" / "good").glob("*.png"))[:8]):
        (data / "images" / png.name).write_bytes(png.read_bytes())
        if i < 5:
            (data / "mixed" / png.name).write_bytes(png.read_bytes())
    for k in range(3):
        _write_volume(data / "mixed" / f"scan{k}.nii.gz", seed=40 + k)
    out = tmp_path_factory.mktemp("mixed-ranks")
    mp.start_processes(_cli_worker, args=(str(out), _mixed_argvs(data, out, str(tiny_dinov2_dir))), nprocs=WORLD,
                       start_method="fork")
    return data, out


def _same_model(two_path: Path, one_path: Path) -> None:
    from normdino.detector import AnomalyDetector

    two = AnomalyDetector.load(two_path, progress=False, cache_dir=None, keep_fit_state=True)
    one = AnomalyDetector.load(one_path, progress=False, cache_dir=None, keep_fit_state=True)
    got, want = two.method_.state_dict(), one.method_.state_dict()
    assert sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_allclose(got[key].double().numpy(), want[key].double().numpy(), rtol=1e-5, atol=2e-5,
                                   err_msg=key)
    np.testing.assert_allclose(two.pixel_thresholds_, one.pixel_thresholds_, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(two.image_thresholds_, one.image_thresholds_, rtol=1e-5, atol=1e-6)
    for key in ("n_train_images", "n_val_images", "val_held_out", "best_epoch", "n_prototypes"):
        assert two.training_summary_.get(key) == one.training_summary_.get(key), key


@pytest.mark.parametrize("index, name", [(0, "held-out"), (1, "mixed-dpmm"), (2, "mixed-1shot")])
def test_cli_fit_on_two_ranks_equals_one_process_with_an_empty_held_out_share_or_mixed_inputs(
        index, name, mixed_ranks, tiny_dinov2_dir, tmp_path) -> None:
    from normdino.cli import main

    data, out = mixed_ranks
    for r in range(WORLD):
        assert json.loads((out / f"cli-{index}-{r}.json").read_text()) == {"code": 0, "stderr": ""}
    argv = _mixed_argvs(data, tmp_path, str(tiny_dinov2_dir))[index]
    assert main(argv) == 0
    _same_model(out / f"{name}.normdino", tmp_path / f"{name}.normdino")
