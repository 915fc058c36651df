"""AnomalyDINO memory bank and PatchCore coreset as methods, against brute force; k-center properties."""

import itertools

import numpy as np
import pytest
import torch

from normdino.errors import InputError, ModelFileError
from normdino.features.tokens import Tokens, TokenSet
from normdino.methods import create
from normdino.methods.memory_bank import Coreset, MemoryBank, coreset_count, greedy_coreset
from normdino.methods.scoring import nearest_prototype, score_tokens


def _unit(n, d, seed):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=1, keepdim=True)


def _token_set(x: torch.Tensor, grid=(4, 4)) -> TokenSet:
    """(N·h·w, D) rows as N images of an h×w grid, float16 as the token store keeps them."""
    h, w = grid
    patches = x.reshape(-1, h, w, x.shape[-1]).half().numpy()
    return TokenSet(patches, [(16, 16)] * len(patches))


def _half(x):  # what the bank sees after the float16 token store
    return x.half().float()


def test_memory_bank_cosine_matches_brute_force():
    bank_tokens, queries = _unit(704, 24, 0), _unit(128, 24, 1)
    bank = MemoryBank().fit(_token_set(bank_tokens))
    distance, index = bank.nearest(queries)
    stored = torch.nn.functional.normalize(_half(bank_tokens).double(), dim=1)
    similarity = queries.double() @ stored.T
    assert torch.allclose(distance.double(), 1 - similarity.max(dim=1).values, atol=1e-6)
    assert torch.equal(index, similarity.argmax(dim=1))
    assert bank.n_prototypes == 704
    scores = bank.patch_scores(Tokens(queries.reshape(8, 4, 4, 24)))
    assert scores.shape == (8, 4, 4)


def test_bank_is_normalised_once_and_never_again():
    tokens = _unit(160, 16, 2) * 3.0  # not unit length
    bank = MemoryBank().fit(_token_set(tokens))
    assert torch.allclose(bank.bank_.norm(dim=1), torch.ones(160), atol=1e-6)
    # scoring with prototypes_normalized skips re-normalisation: a deliberately non-unit bank row is used as is
    bank.bank_[0] *= 2.0
    q = bank.bank_[0:1] / 2.0
    assert float(bank.nearest(q)[0][0]) == pytest.approx(1 - 2.0, abs=1e-5)


def test_shots_keep_seeded_images():
    tokens = _unit(10 * 16, 8, 3)
    one = create("anomalydino-1shot", seed=5).fit(_token_set(tokens))
    assert one.n_prototypes == 16
    chosen = int(np.random.default_rng(5).choice(10, 1, replace=False)[0])
    expected = torch.nn.functional.normalize(_half(tokens.reshape(10, 16, 8)[chosen]), dim=1)
    assert torch.allclose(one.bank_, expected, atol=1e-6)
    assert create("anomalydino-3shot").fit(_token_set(tokens)).n_prototypes == 48
    with pytest.raises(InputError, match="Nshot"):
        create("anomalydino-xshot")


def test_euclidean_bank_matches_cdist():
    prototypes, queries = torch.randn(150, 20), torch.randn(90, 20)
    expected_distance, expected_index = torch.cdist(queries.double(), prototypes.double()).min(dim=1)
    distance, index = nearest_prototype(queries, prototypes, "euclidean", max_chunk_elements=500)
    assert torch.allclose(distance.double(), expected_distance, atol=1e-4) and torch.equal(index, expected_index)
    bank = MemoryBank(metric="euclidean").fit(_token_set(prototypes[:144]))
    direct = torch.cdist(queries.double(), _half(prototypes[:144]).double()).min(dim=1).values
    assert torch.allclose(bank.nearest(queries)[0].double(), direct, atol=1e-4)


@pytest.mark.parametrize("size,expected", [("10", 10), ("10%", 23), ("100%", 225), ("1000", 225), ("1", 1)])
def test_coreset_count(size, expected):
    assert coreset_count(size, 225) == expected


@pytest.mark.parametrize("size", ["0", "0%", "150%", "x", "-3"])
def test_coreset_count_errors(size):
    with pytest.raises(InputError, match="coreset size"):
        coreset_count(size, 10)


def test_each_pick_is_the_farthest_from_previous_picks():
    tokens = torch.randn(400, 6, generator=torch.Generator().manual_seed(9)).double()
    idx = greedy_coreset(tokens, 40, projection_dim=None).tolist()
    distances = torch.cdist(tokens, tokens)
    assert len(set(idx)) == 40
    for step in range(1, len(idx)):
        min_to_chosen = distances[:, idx[:step]].min(dim=1).values
        assert min_to_chosen[idx[step]] >= min_to_chosen.max() - 1e-5


@pytest.mark.parametrize("seed", range(3))
def test_projected_coreset_picks_one_token_of_every_cluster(seed):
    """25 tight clusters far apart: a k-center coreset of 25 on a 16-d random projection covers each exactly once."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(25, 64, generator=g) * 3
    tokens = (centres[:, None] + 0.05 * torch.randn(25, 20, 64, generator=g)).reshape(-1, 64)
    idx = greedy_coreset(tokens, 25, seed=seed, projection_dim=16)
    assert sorted((idx // 20).tolist()) == list(range(25))
    radius = torch.cdist(tokens.double(), tokens[idx].double()).min(dim=1).values.max()
    within = torch.cdist(tokens[:20].double(), tokens[:20].double()).max()
    assert radius <= 2 * within  # every token is near a chosen one of its own cluster


def test_covering_radius_within_twice_the_optimum():
    for seed in range(3):
        points = torch.randn(14, 2, generator=torch.Generator().manual_seed(seed)).double()
        distances = torch.cdist(points, points)
        for k in (2, 3, 4):
            idx = greedy_coreset(points, k, seed=seed, projection_dim=None)
            greedy_radius = distances[:, idx].min(dim=1).values.max()
            optimum = min(distances[:, list(c)].min(dim=1).values.max() for c in itertools.combinations(range(14), k))
            assert optimum <= greedy_radius <= 2 * optimum + 1e-9


def test_coreset_method():
    tokens = _unit(640, 16, 11) * 2.0
    model = create("patchcore-50", seed=0).fit(_token_set(tokens))
    assert isinstance(model, Coreset) and model.n_prototypes == 50 and model.indices_.numel() == 50
    normalised = torch.nn.functional.normalize(_half(tokens), dim=1)
    assert torch.allclose(model.bank_, normalised[model.indices_], atol=1e-6)
    queries = _unit(40, 16, 12)
    assert torch.allclose(model.nearest(queries)[0], score_tokens(queries, normalised[model.indices_]), atol=1e-6)
    full = MemoryBank().fit(_token_set(tokens))
    assert torch.all(model.nearest(queries)[0] >= full.nearest(queries)[0] - 1e-6)  # a subset is never closer
    assert create("patchcore-10%").fit(_token_set(tokens)).n_prototypes == 64


def test_state_round_trip_and_crafted_states():
    model = create("patchcore-20").fit(_token_set(_unit(160, 8, 13)))
    again = create("patchcore-20").load_state_dict(model.state_dict())
    q = _unit(30, 8, 14)
    assert torch.equal(again.nearest(q)[0], model.nearest(q)[0])
    with pytest.raises(ModelFileError, match="missing"):
        create("anomalydino").load_state_dict({})
    with pytest.raises(ModelFileError, match="unit vectors"):
        create("anomalydino").load_state_dict({"bank": torch.full((4, 8), 3.0)})
    with pytest.raises(ModelFileError, match="NaN"):
        create("anomalydino").load_state_dict({"bank": torch.full((4, 8), float("nan"))})


def test_errors():
    with pytest.raises(InputError, match="not fitted"):
        MemoryBank().nearest(torch.zeros(3, 4))
    with pytest.raises(InputError, match="dimension"):
        MemoryBank().fit(_token_set(_unit(16, 4, 0))).nearest(torch.randn(2, 3))
    with pytest.raises(InputError, match="metric"):
        score_tokens(torch.randn(2, 3), torch.randn(2, 3), metric="manhattan")
    with pytest.raises(InputError, match="metric"):
        MemoryBank(metric="manhattan").fit(_token_set(_unit(16, 4, 0)))
