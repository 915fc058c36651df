"""Memory bank and coreset scorers against brute force; k-center properties of the greedy coreset."""

import itertools
import math

import numpy as np
import pytest
import torch

from normdino.methods.baselines import Coreset, MemoryBank, greedy_coreset
from normdino.methods.scoring import nearest_prototype, score_tokens
from normdino.errors import InputError


def _unit(n, d, seed):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=1, keepdim=True)


def test_memory_bank_cosine_matches_brute_force_with_chunking():
    bank_tokens, queries = _unit(700, 24, 0), _unit(130, 24, 1)
    bank = MemoryBank(max_chunk_elements=1000).fit(bank_tokens)  # forces many query and bank chunks
    distance, index = bank.nearest(queries)
    similarity = queries.double() @ bank_tokens.double().T
    assert torch.allclose(distance.double(), 1 - similarity.max(dim=1).values, atol=1e-6)
    assert torch.equal(index, similarity.argmax(dim=1))
    assert bank.n_prototypes_ == 700


def test_memory_bank_keeps_batch_shape_and_normalises():
    bank_tokens = _unit(300, 16, 2) * 3.0  # not unit length
    queries = torch.randn(2, 4, 5, 16, generator=torch.Generator().manual_seed(3))
    scores = MemoryBank().fit(bank_tokens.reshape(3, 100, 16)).score(queries)
    assert scores.shape == (2, 4, 5)
    q = queries.reshape(-1, 16)
    expected = 1 - torch.nn.functional.cosine_similarity(q[:, None, :], bank_tokens[None], dim=2).max(dim=1).values
    assert torch.allclose(scores.reshape(-1), expected, atol=1e-5)
    assert torch.allclose(MemoryBank().fit(bank_tokens).score(q.numpy()), expected, atol=1e-5)  # numpy input


def test_one_shot_bank_scores_its_own_image_zero():
    image_tokens = _unit(64, 32, 4).reshape(8, 8, 32)
    bank = MemoryBank().fit(image_tokens)
    assert bank.n_prototypes_ == 64
    assert torch.allclose(bank.score(image_tokens), torch.zeros(8, 8), atol=1e-6)
    assert bank.score(_unit(10, 32, 5)).min() > 0.1


def test_euclidean_and_float16_bank():
    prototypes, queries = torch.randn(150, 20), torch.randn(90, 20)
    expected_distance, expected_index = torch.cdist(queries.double(), prototypes.double()).min(dim=1)
    distance, index = nearest_prototype(queries, prototypes, "euclidean", max_chunk_elements=500)
    assert torch.allclose(distance.double(), expected_distance, atol=1e-4) and torch.equal(index, expected_index)
    half = MemoryBank(dtype=torch.float16).fit(_unit(400, 20, 6))
    full = MemoryBank().fit(_unit(400, 20, 6))
    assert half.bank_.dtype == torch.float16
    assert torch.allclose(half.score(queries), full.score(queries), atol=2e-3)
    assert torch.allclose(score_tokens(queries, prototypes, "cosine"), MemoryBank().fit(prototypes).score(queries), atol=1e-6)


@pytest.mark.parametrize("n,expected", [(10, 10), (0.1, 23), (1.0, 225), (1000, 225), (1, 1)])
def test_coreset_size(n, expected):
    tokens = _unit(225, 8, 7)
    idx = greedy_coreset(tokens, n, projection_dim=4)
    assert idx.dtype == torch.long and idx.numel() == expected
    assert idx.unique().numel() == expected and int(idx.min()) >= 0 and int(idx.max()) < 225
    assert torch.equal(idx, greedy_coreset(tokens, n, projection_dim=4))  # seeded


def test_coreset_seed_changes_start():
    tokens = _unit(500, 8, 8)
    assert not torch.equal(greedy_coreset(tokens, 20, seed=0), greedy_coreset(tokens, 20, seed=1))


def test_each_pick_is_the_farthest_from_previous_picks():
    tokens = torch.randn(400, 6, generator=torch.Generator().manual_seed(9)).double()
    idx = greedy_coreset(tokens, 40, projection_dim=None).tolist()
    distances = torch.cdist(tokens, tokens)
    for step in range(1, len(idx)):
        min_to_chosen = distances[:, idx[:step]].min(dim=1).values
        assert min_to_chosen[idx[step]] >= min_to_chosen.max() - 1e-5


def test_projected_coreset_is_k_center_in_the_projection():
    tokens = _unit(300, 64, 10)
    idx = greedy_coreset(tokens, 15, seed=3, projection_dim=8).tolist()
    generator = torch.Generator().manual_seed(3)
    projected = tokens @ (torch.randn(64, 8, generator=generator) / math.sqrt(8))
    distances = torch.cdist(projected.double(), projected.double())
    for step in range(1, len(idx)):
        min_to_chosen = distances[:, idx[:step]].min(dim=1).values
        assert min_to_chosen[idx[step]] >= min_to_chosen.max() - 1e-4


def test_covering_radius_within_twice_the_optimum():
    for seed in range(3):
        points = torch.randn(14, 2, generator=torch.Generator().manual_seed(seed)).double()
        distances = torch.cdist(points, points)
        for k in (2, 3, 4):
            idx = greedy_coreset(points, k, seed=seed, projection_dim=None)
            greedy_radius = distances[:, idx].min(dim=1).values.max()
            optimum = min(distances[:, list(c)].min(dim=1).values.max() for c in itertools.combinations(range(14), k))
            assert optimum <= greedy_radius <= 2 * optimum + 1e-9


def test_coreset_bank():
    tokens = _unit(600, 16, 11) * 2.0
    model = Coreset(n=50, projection_dim=None).fit(tokens)
    assert model.n_prototypes_ == 50 and model.indices_.numel() == 50
    normalised = tokens / tokens.norm(dim=1, keepdim=True)
    assert torch.allclose(model.bank_, normalised[model.indices_], atol=1e-6)
    queries = _unit(40, 16, 12)
    assert torch.allclose(model.score(queries), score_tokens(queries, normalised[model.indices_]), atol=1e-6)
    assert torch.all(model.score(queries) >= MemoryBank().fit(tokens).score(queries) - 1e-6)  # subset: never closer
    assert Coreset(n=0.1).fit(tokens).n_prototypes_ == 60


def test_errors():
    with pytest.raises(InputError, match="not fitted"):
        MemoryBank().score(torch.zeros(3, 4))
    with pytest.raises(InputError, match="dimension"):
        MemoryBank().fit(torch.randn(5, 4)).score(torch.randn(2, 3))
    with pytest.raises(InputError, match="metric"):
        score_tokens(torch.randn(2, 3), torch.randn(2, 3), metric="manhattan")
    with pytest.raises(InputError, match="fraction"):
        greedy_coreset(torch.randn(5, 3), 1.5)
    with pytest.raises(InputError, match="at least 1"):
        greedy_coreset(torch.randn(5, 3), 0)
    with pytest.raises(InputError, match="zero tokens"):
        MemoryBank().fit(torch.zeros(0, 4))
    assert np.isfinite(MemoryBank(metric="euclidean").fit(torch.randn(5, 4)).score(torch.randn(2, 4)).numpy()).all()
