import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from normdino.methods import scoring


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_cosine_distance_matches_brute_force():
    rng = np.random.default_rng(0)
    tokens, protos = _unit(rng, 300, 16), rng.standard_normal((7, 16)).astype(np.float32)
    expected = cdist(tokens, protos, metric="cosine").min(axis=1)
    got = scoring.score_tokens(torch.from_numpy(tokens).reshape(3, 10, 10, 16), torch.from_numpy(protos), "cosine")
    assert got.shape == (3, 10, 10)
    np.testing.assert_allclose(got.reshape(-1).numpy(), expected, atol=1e-5)


def test_euclidean_distance_matches_brute_force():
    rng = np.random.default_rng(1)
    tokens, protos = rng.standard_normal((200, 8)).astype(np.float32), rng.standard_normal((5, 8)).astype(np.float32)
    expected = cdist(tokens, protos).min(axis=1)
    got = scoring.score_tokens(torch.from_numpy(tokens), torch.from_numpy(protos), "euclidean")
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-4)


def test_unknown_score_method_is_rejected():
    with pytest.raises(ValueError, match="unknown score method"):
        scoring.patch_scores(torch.zeros(2, 3), "manhattan", torch.zeros(1, 3))


def test_upsample_keeps_constant_maps_and_sizes():
    up = scoring.upsample(np.full((4, 4), 0.25, dtype=np.float32), (37, 53))
    assert up.shape == (37, 53) and up.dtype == np.float32
    np.testing.assert_allclose(up, 0.25, rtol=1e-6)


def test_upsample_is_bilinear_between_patch_centres():
    patch = np.array([[0.0, 1.0]], dtype=np.float32)
    up = scoring.upsample(patch, (1, 4))  # half-pixel centres: 0, 0.25, 0.75, 1
    np.testing.assert_allclose(up[0], [0.0, 0.25, 0.75, 1.0], atol=1e-6)


def test_smooth_preserves_mean_and_reduces_peaks():
    img = np.zeros((31, 31), dtype=np.float32)
    img[15, 15] = 1.0
    out = scoring.smooth(img, 2.0)
    assert out.max() < 0.1 and abs(out.sum() - 1.0) < 1e-3
    assert scoring.smooth(img, 0) is img


def test_image_score_is_mean_of_top_fraction():
    values = np.arange(1000, dtype=np.float32).reshape(10, 100)
    assert scoring.image_score(values, 0.01) == pytest.approx(np.mean(np.arange(990, 1000)))
    assert scoring.image_score(np.array([[3.0]]), 0.01) == 3.0


def test_likelihood_score_is_minus_the_best_weighted_component_density():
    from normdino import DirichletProcessMixture

    g = torch.Generator().manual_seed(13)
    means, variances = torch.randn(7, 5, generator=g), torch.rand(7, 5, generator=g) + 0.1
    sticks = torch.full((7,), 0.3)
    mixture = DirichletProcessMixture(n_components=7, covariance_type="diag").set_state(
        means=means, covariances=variances, sticks=sticks, alpha=2.0)
    tokens = torch.randn(3, 11, 5, generator=g)
    x = tokens.reshape(-1, 5).double()
    log_density = torch.stack([torch.distributions.Normal(means[k].double(), variances[k].double().sqrt())
                               .log_prob(x).sum(1) for k in range(7)], dim=1)
    log_weights = torch.log(sticks.double()) + torch.cat([torch.zeros(1), torch.cumsum(torch.log1p(-sticks.double()), 0)[:-1]])
    log_weights[-1] = torch.log1p(-sticks.double()).sum() - torch.log1p(-sticks[-1].double())  # v_K = 1
    expected = -(log_density + log_weights[mixture.active_]).max(dim=1).values
    got = scoring.negative_best_likelihood(tokens, mixture)
    assert got.shape == (3, 11)
    np.testing.assert_allclose(got.reshape(-1).numpy(), expected.numpy(), atol=1e-3)


@pytest.mark.parametrize("sigma", [0.0, 1.5])
def test_batch_pixel_maps_equal_each_map_upsampled_alone_bit_for_bit(sigma):
    """One batched upsampling (as on a GPU) gives every image's map of the one-by-one path exactly (issue 22)."""
    from normdino.methods.scoring import batch_pixel_maps, pixel_map

    maps = torch.rand(5, 7, 9, generator=torch.Generator().manual_seed(0))
    same = batch_pixel_maps(maps, [(61, 83)] * 5, sigma)
    mixed = batch_pixel_maps(maps, [(61, 83), (20, 20), (61, 83), (100, 50), (7, 9)], sigma)
    for i in range(5):
        np.testing.assert_array_equal(same[i], pixel_map(maps[i], (61, 83), sigma))
        assert same[i].dtype == np.float32
    for plane, shape, out in zip(maps, [(61, 83), (20, 20), (61, 83), (100, 50), (7, 9)], mixed):
        np.testing.assert_array_equal(out, pixel_map(plane, shape, sigma))
