"""Dirichlet process mixture: EM step against a naive float64 transcription of DESIGN.md, recovery, errors, files."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from scipy.special import digamma, logsumexp

from normdino.errors import InputError, ModelFileError
from normdino.methods.mixture import EPS, DirichletProcessMixture

# ----------------------------------------------------------------------------- naive reference


def naive_em_step(x, means, covs, sticks, alpha, stats, cov_type, rho, reg, alpha_fixed=False):
    """One batched EM step straight from the DESIGN.md equations, in float64 with loops and einsum."""
    x = np.asarray(x, np.float64)
    n, d = x.shape
    k_total = len(sticks)
    v = np.array(sticks, np.float64)
    v[-1] = 1.0
    log_pi = np.array([math.log(v[k]) if v[k] > 0 else -np.inf for k in range(k_total)])
    for k in range(k_total):
        for j in range(k):
            log_pi[k] += np.log1p(-v[j])
    log_p = np.full((n, k_total), -np.inf)
    for k in range(k_total):
        if not np.isfinite(log_pi[k]):
            continue  # dead components are left out of the E-step
        if cov_type == "full":
            sigma = covs[k]
        elif cov_type == "diag":
            sigma = np.diag(covs[k])
        else:
            sigma = covs[k] * np.eye(d)
        diff = x - means[k]
        _, logdet = np.linalg.slogdet(sigma)
        maha = np.einsum("nd,de,ne->n", diff, np.linalg.inv(sigma), diff)
        log_p[:, k] = log_pi[k] - 0.5 * (d * math.log(2 * math.pi) + logdet + maha)
    gamma = np.exp(log_p - logsumexp(log_p, axis=1, keepdims=True))
    nk = (1 - rho) * stats["N"] + rho * gamma.mean(0)
    sk = (1 - rho) * stats["S"] + rho * np.einsum("nk,nd->kd", gamma, x) / n
    if cov_type == "full":
        qk = (1 - rho) * stats["Q"] + rho * np.einsum("nk,nd,ne->kde", gamma, x, x) / n
    else:  # per-dimension second moments; the spherical variance is their mean over dimensions
        qk = (1 - rho) * stats["Q"] + rho * np.einsum("nk,nd->kd", gamma, x * x) / n
    mu = sk / (nk[:, None] + EPS)
    if cov_type == "full":
        cov = qk / (nk[:, None, None] + EPS) - np.einsum("kd,ke->kde", mu, mu) + reg * np.eye(d)
    else:
        cov = qk / (nk[:, None] + EPS) - mu**2 + reg
        if cov_type == "spherical":
            cov = (qk / (nk[:, None] + EPS) - mu**2).mean(1) + reg
    tail = np.array([nk[k + 1 :].sum() for k in range(k_total)])
    v_new = nk / (nk + (alpha - 1) / n + tail + EPS)
    v_new[-1] = 1.0
    alpha_new = alpha
    if not alpha_fixed:
        alpha_new = (k_total - 1) / sum(
            digamma(n * (nk[k] + tail[k]) + alpha + 1) - digamma(n * tail[k] + alpha) for k in range(k_total - 1)
        )
    pi = np.array([v_new[k] * np.prod([1 - v_new[j] for j in range(k)]) for k in range(k_total)])
    return {"means": mu, "covs": cov, "sticks": v_new, "pi": pi, "alpha": alpha_new, "stats": {"N": nk, "S": sk, "Q": qk}}


def _reference_problem(cov_type: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    d, k, n = 5, 6, 400
    centres = rng.normal(size=(3, d))
    x = centres[rng.integers(3, size=n)] + 0.3 * rng.normal(size=(n, d))
    means = x[rng.choice(n, k, replace=False)] + 0.05 * rng.normal(size=(k, d))
    if cov_type == "diag":
        covs = rng.uniform(0.05, 0.3, size=(k, d))
    elif cov_type == "spherical":
        covs = rng.uniform(0.05, 0.3, size=k)
    else:
        a = rng.normal(size=(k, d, d))
        covs = np.einsum("kde,kfe->kdf", a, a) * 0.05 / d + 0.05 * np.eye(d)
    sticks = rng.uniform(0.2, 0.8, size=k)
    sticks[2] = 0.0  # a dead component: log pi = -inf, left out of the E-step
    q0 = np.zeros((k, d, d)) if cov_type == "full" else np.zeros((k, d))
    stats = {"N": np.zeros(k), "S": np.zeros((k, d)), "Q": q0}
    return x, means, covs, sticks, 2.5, stats


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("cov_type", ["diag", "spherical", "full"])
def test_em_steps_match_naive_float64_reference(cov_type, dtype, tol):
    x, means, covs, sticks, alpha, stats = _reference_problem(cov_type)
    half = len(x) // 2
    model = DirichletProcessMixture(n_components=len(sticks), covariance_type=cov_type, dtype=dtype)
    model.set_state(means, covs, sticks, alpha)
    ref = {"means": means, "covs": covs, "sticks": sticks, "alpha": alpha, "stats": stats}
    for batch in (x[:half], x[half:]):  # two steps, so the exponential averaging is checked too
        model.partial_fit(batch)
        ref = naive_em_step(batch, ref["means"], ref["covs"], ref["sticks"], ref["alpha"], ref["stats"],
                            cov_type, rho=0.2, reg=1e-6)
        assert np.abs(model.means_.double().numpy() - ref["means"]).max() <= tol
        assert np.abs(model.weights_.double().numpy() - ref["pi"]).max() <= tol
        assert abs(model.alpha_ - ref["alpha"]) / ref["alpha"] <= tol
        np.testing.assert_allclose(model.covariances_.double().numpy(), ref["covs"], rtol=100 * tol, atol=tol)
    assert model.n_iter_ == 2
    assert model.weights_[2] == 0 and not model.active_[2]
    assert ref["alpha"] != alpha  # the concentration really moved


def test_alpha_fixed_keeps_alpha():
    x, means, covs, sticks, alpha, stats = _reference_problem("diag")
    model = DirichletProcessMixture(n_components=len(sticks), alpha_fixed=True, dtype=torch.float64)
    model.set_state(means, covs, sticks, alpha).partial_fit(x)
    ref = naive_em_step(x, means, covs, sticks, alpha, stats, "diag", rho=0.2, reg=1e-6, alpha_fixed=True)
    assert model.alpha_ == alpha
    np.testing.assert_allclose(model.weights_.numpy(), ref["pi"], atol=1e-12)


# ----------------------------------------------------------------------------- synthetic recovery


def _clusters_on_sphere(n_clusters, d, n, noise, seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(n_clusters, d, generator=g), dim=1)
    labels = torch.randint(n_clusters, (n,), generator=g)
    x = torch.nn.functional.normalize(centres[labels] + noise * torch.randn(n, d, generator=g), dim=1)
    return x, centres, labels


def test_fit_recovers_30_clusters_on_the_sphere():
    x, centres, _ = _clusters_on_sphere(30, 64, 12000, 0.02, seed=1)
    model = DirichletProcessMixture(n_components=100).fit(x, epochs=15, batch_size=2000)
    protos = torch.nn.functional.normalize(model.prototypes(), dim=1)
    cos = protos @ centres.T
    assert cos.max(0).values.min() > 0.99  # every true centre has an active prototype
    # Extra components keep only a sliver of weight: the heaviest component per centre carries almost all of it.
    weights = model.weights_[model.active_]
    owner = cos.argmax(1)
    main = torch.stack([weights[owner == c].max() for c in range(30)])
    assert weights.sum() - main.sum() < 0.03
    model.weight_threshold = 1e-3
    assert 21 <= int(model.active_.sum()) <= 39
    assert torch.isfinite(model.score_samples(x)).all()


def test_initial_means_come_from_the_whole_batch_not_its_first_rows():
    x, centres, labels = _clusters_on_sphere(5, 16, 2000, 0.02, seed=2)
    order = torch.argsort(labels, stable=True)  # first rows all from one cluster
    for init in ("kmeans++", "random"):
        model = DirichletProcessMixture(n_components=20, init=init).fit(x[order], epochs=3, batch_size=2000, shuffle=False)
        cos = torch.nn.functional.normalize(model.prototypes(), dim=1) @ centres.T
        assert cos.max(0).values.min() > 0.99, init


def test_k500_keeps_components_past_index_220_alive():
    n_clusters, d = 500, 32
    g = torch.Generator().manual_seed(3)
    centres = torch.nn.functional.normalize(torch.randn(n_clusters, d, generator=g), dim=1)
    x = torch.nn.functional.normalize(centres.repeat_interleave(20, 0) + 0.005 * torch.randn(20 * n_clusters, d, generator=g), dim=1)
    sticks = 1.0 - torch.rand(n_clusters, generator=g, dtype=torch.float64).pow(1 / 2.0)  # v ~ Beta(1, 2) as in the paper
    model = DirichletProcessMixture(n_components=500)
    model.set_state(centres, torch.full((n_clusters, d), 2.5e-4), sticks, 2.0)
    assert (model.log_weights_[300:] < -104).all()  # exp() of these underflows to 0 in float32
    for _ in range(3):
        model.partial_fit(x)
    assert model.active_.all()
    assert int(model.active_[220:].sum()) == 280


# ----------------------------------------------------------------------------- degenerate input


def _fitted(d=8, k=4, seed=0):
    x, _, _ = _clusters_on_sphere(3, d, 300, 0.05, seed)
    return DirichletProcessMixture(n_components=k).fit(x, epochs=2, batch_size=100), x


def _state(model):
    return {key: value.clone() for key, value in model.to_tensors().items()}


@pytest.mark.parametrize(
    "batch,message",
    [
        (np.full((10, 8), np.nan), "NaN or infinite"),
        (np.pad(np.ones((9, 8)), ((0, 1), (0, 0)), constant_values=np.inf), "NaN or infinite"),
        (np.ones((10, 5)), "has 5 features but the mixture was fitted on 8"),
        (np.ones((0, 8)), "empty"),
        (np.ones(8), "2-D array"),
        (np.array([["a"] * 8] * 3), "real numbers"),
    ],
)
def test_bad_batches_raise_and_leave_the_state_untouched(batch, message):
    model, _ = _fitted()
    before = _state(model)
    with pytest.raises(InputError, match=message):
        model.partial_fit(batch)
    with pytest.raises(ValueError):
        model.score_samples(batch)
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_one_dimensional_embeddings_are_refused():
    with pytest.raises(InputError, match="at least 2 dimensions"):
        DirichletProcessMixture(n_components=2).fit(np.random.default_rng(0).normal(size=(50, 1)))


def test_more_components_than_rows_is_refused():
    with pytest.raises(InputError, match="cannot initialise 50 components from a batch of 20 rows"):
        DirichletProcessMixture(n_components=50).partial_fit(np.random.default_rng(0).normal(size=(20, 4)))


def test_float32_overflow_on_conversion_is_reported():
    with pytest.raises(InputError, match="NaN or infinite"):
        DirichletProcessMixture(n_components=2).partial_fit(np.full((10, 3), 1e300))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"n_components": 0}, "n_components"),
        ({"covariance_type": "tied"}, "covariance_type"),
        ({"update_rate": 0.0}, "update_rate"),
        ({"alpha": -1.0}, "alpha"),
        ({"reg_covar": 0.0}, "reg_covar"),
        ({"init": "first-rows"}, "init"),
        ({"dtype": torch.float16}, "dtype"),
    ],
)
def test_bad_hyper_parameters_are_named(kwargs, message):
    with pytest.raises(InputError, match=message):
        DirichletProcessMixture(**kwargs).partial_fit(np.random.default_rng(0).normal(size=(20, 4)))


def test_set_state_validates_shapes_and_values():
    model = DirichletProcessMixture(n_components=3, covariance_type="full")
    means, covs, sticks = np.zeros((3, 4)), np.stack([np.eye(4)] * 3), np.full(3, 0.5)
    with pytest.raises(InputError, match=r"shape \(3, 4, 4\)"):
        model.set_state(means, np.ones((3, 4)), sticks, 2.0)
    with pytest.raises(InputError, match="positive definite"):
        model.set_state(means, -covs, sticks, 2.0)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        model.set_state(means, covs, np.full(3, 1.5), 2.0)
    with pytest.raises(InputError, match="alpha"):
        model.set_state(means, covs, sticks, 0.0)
    asymmetric = covs.copy()
    asymmetric[0, 0, 1] = 0.5
    with pytest.raises(InputError, match="symmetric"):
        model.set_state(means, asymmetric, sticks, 2.0)
    model.set_state(means, covs, sticks, 2.0)
    assert model.sticks_[-1] == 1 and model.n_iter_ == 0 and model.stat_count_.sum() == 0
    model.partial_fit(np.random.default_rng(0).normal(size=(30, 4)))
    model.set_state(np.zeros((3, 2)), np.stack([np.eye(2)] * 3), sticks, 3.0)  # a new state may change D
    assert model.n_features_in_ == 2 and model.n_iter_ == 0 and model.alpha_ == 3.0


def test_unfitted_model_says_so():
    model = DirichletProcessMixture()
    with pytest.raises(InputError, match="no state yet"):
        model.score_samples(np.ones((3, 4)))
    assert not hasattr(model, "weights_") and not hasattr(model, "active_") and not hasattr(model, "means_")


# ----------------------------------------------------------------------------- files, copies, reproducibility


@pytest.mark.parametrize("cov_type", ["diag", "spherical", "full"])
def test_save_load_round_trip_and_resume(tmp_path, cov_type):
    x, _, _ = _clusters_on_sphere(4, 6, 600, 0.05, seed=4)
    model = DirichletProcessMixture(n_components=8, covariance_type=cov_type, seed=5).fit(x, epochs=2, batch_size=200)
    path = tmp_path / "sub" / "dpmm.safetensors"
    model.save(path)
    loaded = DirichletProcessMixture.load(path)
    assert loaded.get_config() == model.get_config()
    assert loaded.alpha_ == model.alpha_ and loaded.alpha_ != 2.0  # alpha is saved with the state
    for key, value in model.to_tensors().items():
        assert torch.equal(value, loaded.to_tensors()[key]), key
    assert torch.equal(loaded.score_samples(x), model.score_samples(x))
    model.partial_fit(x[:200])  # a resumed fit continues exactly where the saved one stopped
    loaded.partial_fit(x[:200])
    assert torch.equal(loaded.means_, model.means_) and loaded.alpha_ == model.alpha_
    assert [p.name for p in path.parent.iterdir()] == ["dpmm.safetensors"]  # no temporary left behind


def test_bad_files_give_one_clear_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        DirichletProcessMixture.load(tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 not a safetensors file at all")
    with pytest.raises(ModelFileError, match="not a normdino mixture file"):
        DirichletProcessMixture.load(garbage)
    from safetensors.torch import save_file

    no_meta = tmp_path / "nometa.safetensors"
    save_file({"means": torch.zeros(2, 2)}, str(no_meta))
    with pytest.raises(ModelFileError, match="no normdino mixture configuration"):
        DirichletProcessMixture.load(no_meta)

    model, _ = _fitted()
    tensors, config = model.to_tensors(), model.get_config()
    with pytest.raises(ModelFileError, match="format version 99"):
        DirichletProcessMixture.from_tensors(tensors, {**config, "format_version": 99})
    with pytest.raises(ModelFileError, match="'covariances' has shape"):
        DirichletProcessMixture.from_tensors({**tensors, "covariances": torch.ones(4, 3)}, config)
    with pytest.raises(ModelFileError, match=r"means.*expected \(5, 8\)"):
        DirichletProcessMixture.from_tensors(tensors, {**config, "n_components": 5})
    with pytest.raises(ModelFileError, match="lacks tensor"):
        DirichletProcessMixture.from_tensors({k: v for k, v in tensors.items() if k != "alpha"}, config)
    json.dumps(config)  # JSON-able


def test_same_seed_is_bit_identical_other_seed_is_not():
    x, _, _ = _clusters_on_sphere(6, 16, 3000, 0.05, seed=6)

    def run(seed):
        return DirichletProcessMixture(n_components=20, seed=seed).fit(x.numpy(), epochs=3, batch_size=1000).to_tensors()

    a, b, c = run(7), run(7), run(8)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["means"], c["means"])


def test_deepcopy_is_independent():
    model, x = _fitted()
    best = copy.deepcopy(model)
    model.partial_fit(x[:50])
    assert best.n_iter_ == model.n_iter_ - 1
    assert not torch.equal(best.means_, model.means_)
    assert torch.isfinite(best.score_samples(x)).all()


def test_fit_accepts_float16_memmap_and_lists_of_batches(tmp_path):
    x, centres, _ = _clusters_on_sphere(4, 8, 1200, 0.03, seed=9)
    mm = np.lib.format.open_memmap(tmp_path / "tokens.npy", mode="w+", dtype=np.float16, shape=tuple(x.shape))
    mm[:] = x.numpy()
    mm.flush()
    from_memmap = DirichletProcessMixture(n_components=8).fit(np.load(tmp_path / "tokens.npy", mmap_mode="r"), epochs=2, batch_size=400)
    from_tensor = DirichletProcessMixture(n_components=8).fit(torch.from_numpy(mm.astype(np.float32)), epochs=2, batch_size=400)
    assert torch.equal(from_memmap.means_, from_tensor.means_)  # same rows, same order, same values
    from_list = DirichletProcessMixture(n_components=8).fit(list(mm.reshape(3, 400, 8)), epochs=2)
    assert from_list.n_iter_ == 6
    cos = torch.nn.functional.normalize(from_list.prototypes(), dim=1) @ centres.T
    assert cos.max(0).values.min() > 0.99


def test_one_shot_iterator_over_several_epochs_is_refused():
    x = np.random.default_rng(0).normal(size=(300, 4))
    with pytest.raises(InputError, match="no batches"):
        DirichletProcessMixture(n_components=3).fit(iter([x[:150], x[150:]]), epochs=2)


def test_callback_sees_every_epoch_and_can_stop():
    x, _, _ = _clusters_on_sphere(3, 8, 600, 0.05, seed=10)
    seen = []

    def callback(epoch, model):
        seen.append((epoch, model.n_iter_, model.epoch_log_likelihood_))
        return epoch == 2

    model = DirichletProcessMixture(n_components=6).fit(x, epochs=10, batch_size=250, callback=callback)
    assert [s[:2] for s in seen] == [(0, 3), (1, 6), (2, 9)] and model.n_iter_ == 9
    assert seen[-1][2] > seen[0][2]


@pytest.mark.parametrize("cov_type", ["diag", "spherical", "full"])
def test_scores_agree_with_component_densities(cov_type):
    x, _, _ = _clusters_on_sphere(3, 6, 500, 0.1, seed=11)
    model = DirichletProcessMixture(n_components=5, covariance_type=cov_type, dtype=torch.float64).fit(x, epochs=3, batch_size=250)
    comp = model.log_prob_components(x)
    assert comp.shape == (500, 5) and torch.isfinite(comp).all()
    weighted = model.log_prob_components(x, include_weights=True)
    torch.testing.assert_close(weighted, comp + model.log_weights_)
    torch.testing.assert_close(model.score_samples(x), torch.logsumexp(weighted, 1))
    # one component checked against torch.distributions
    k = int(model.weights_.argmax())
    cov = model.covariances_[k]
    cov = {"diag": torch.diag(cov) if cov.ndim == 1 else cov, "spherical": cov * torch.eye(6, dtype=torch.float64), "full": cov}[cov_type]
    mvn = torch.distributions.MultivariateNormal(model.means_[k], covariance_matrix=cov)
    torch.testing.assert_close(comp[:, k], mvn.log_prob(x.double()))
    assert model.prototypes().shape == (int(model.active_.sum()), 6)
