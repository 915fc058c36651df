"""What scoring reads versus what the model file keeps: the DPMM's active components against its EM state.

Byte counts are checked against count x dim x itemsize computed here; a model loaded to predict keeps only the
scoring state and scores exactly as the fitted one.
"""

import numpy as np
import pytest
import torch

from normdino.errors import InputError
from normdino.io.phantoms import write_phantom_dataset
from normdino.features.tokens import TokenSet
from normdino.methods import create
from normdino.methods.mixture import ActiveComponents

K, D = 40, 16


@pytest.fixture(scope="module")
def phantoms_dir(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("phantoms"), n_train=6, n_valid=2, n_test_normal=1,
                                 n_test_anomalous=1, size=64, seed=0)


def _tokens(n_images=12, seed=0) -> TokenSet:
    """Tokens around three directions: K = 40 components leave about half of them inactive."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, D, generator=torch.Generator().manual_seed(99))
    x = centres[torch.randint(3, (n_images, 1, 4, 4), generator=g)] + 0.1 * torch.randn(n_images, 1, 4, 4, D, generator=g)
    return TokenSet(torch.nn.functional.normalize(x, dim=-1).half().numpy(), [(32, 32)] * n_images)


def _fitted(name: str):
    return create(name, n_components=K, epochs=5, batch_images=4).fit(_tokens(seed=1), _tokens(4, seed=2))


def _held_bytes(method) -> int:
    """Bytes of every tensor the method object holds (its own attributes and those of any mixture it holds)."""
    seen, total = set(), 0
    objects = [method] + [v for v in vars(method).values() if hasattr(v, "__dict__") and not isinstance(v, torch.Tensor)]
    for obj in objects:
        for value in vars(obj).values():
            if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() not in seen:
                seen.add(value.untyped_storage().data_ptr())
                total += value.untyped_storage().nbytes()
    return total


@pytest.mark.parametrize("score", ["cosine", "euclidean"])
def test_distance_scores_read_only_the_active_means(score):
    method = _fitted("dpmm" if score == "cosine" else f"dpmm-{score}")
    n = method.n_prototypes
    assert 0 < n < K
    assert method.scoring_bytes() == n * D * 4  # prototypes x dim x float32
    # the model file keeps the EM state of all K components: means, variances, stat_sum, stat_square (K x D),
    # sticks and stat_count (K), alpha (1 float64), n_iter (1 int64), and the prototypes (n x D)
    assert method.state_bytes() == 4 * (4 * K * D + 2 * K + n * D) + 8 + 8


def test_the_likelihood_score_reads_the_active_components_means_variances_and_log_weights():
    method = _fitted("dpmm-likelihood")
    n = method.n_prototypes
    assert method.scoring_bytes() == (n * D + n * D + n) * 4
    state = method.scoring_state()
    active = method.mixture_.active_
    torch.testing.assert_close(state["means"], method.mixture_.means_[active], rtol=0, atol=0)
    torch.testing.assert_close(state["log_weights"], method.mixture_.log_weights_[active], rtol=0, atol=0)


def test_the_active_components_score_as_the_full_mixture():
    method = _fitted("dpmm-likelihood")
    x = torch.from_numpy(_tokens(3, seed=5).patches.reshape(-1, D).astype(np.float32))
    full, active = method.mixture_, ActiveComponents(method.mixture_)
    keep = full.active_
    means, variances = full.means_[keep].double(), full.covariances_[keep].double()  # diagonal
    exact = torch.stack([torch.distributions.Normal(means[k], variances[k].sqrt()).log_prob(x.double()).sum(1)
                         for k in range(len(means))], dim=1)  # float64, no centring
    error_active = (active.log_prob_components(x).double() - exact).abs().max()
    error_full = (full.log_prob_components(x)[:, keep].double() - exact).abs().max()
    assert error_active <= max(2 * error_full, 1e-3)  # float32 rounding of the same size as the full mixture's
    assert torch.equal(active.log_weights_, full.log_weights_[keep])
    with pytest.raises(InputError, match="cannot be fitted further or saved"):
        active.to_tensors()
    with pytest.raises(InputError, match="cannot be fitted further or saved"):
        active.partial_fit(x)


@pytest.mark.parametrize("name", ["dpmm", "dpmm-likelihood"])
def test_releasing_the_fit_state_keeps_the_scores_and_only_the_scoring_state(name):
    method = _fitted(name)
    query = _tokens(3, seed=3).batch(0, 3)
    before = method.patch_scores(query)
    saved, scoring = method.state_bytes(), method.scoring_bytes()
    assert _held_bytes(method) >= saved - 16  # fitted: the EM state (alpha and n_iter are Python numbers here)
    method.release_fit_state()
    assert torch.equal(method.patch_scores(query), before)
    assert _held_bytes(method) == scoring  # nothing but what scoring reads
    assert method.state_bytes() == saved and method.scoring_bytes() == scoring  # still reported
    with pytest.raises(InputError, match="keep_fit_state=True"):
        method.state_dict()


def test_a_loaded_detector_holds_the_scoring_state_and_keeps_the_file_on_request(phantoms_dir, tiny_dinov2_dir, tmp_path):
    from normdino.detector import AnomalyDetector

    train = sorted((phantoms_dir / "train" / "good").glob("*.png"))[:6]
    detector = AnomalyDetector(method="dpmm", backbone=str(tiny_dinov2_dir), image_size=56, progress=False,
                               n_components=K, epochs=2, batch_images=4).fit(train)
    path = detector.save(tmp_path / "m.normdino")
    loaded = AnomalyDetector.load(path, progress=False)
    method = loaded.method_
    assert not hasattr(method, "mixture_") and _held_bytes(method) == method.n_prototypes * 32 * 4  # dim 32
    assert method.state_bytes() == detector.method_.state_bytes()
    np.testing.assert_array_equal(loaded.predict(train[:2])[0].patch_map, detector.predict(train[:2])[0].patch_map)
    with pytest.raises(InputError, match="keep_fit_state=True"):
        loaded.save(tmp_path / "again.normdino")
    kept = AnomalyDetector.load(path, progress=False, keep_fit_state=True)
    again = kept.save(tmp_path / "again.normdino")
    assert again.read_bytes() == path.read_bytes()  # the file format is unchanged
