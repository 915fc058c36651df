"""Every registered method honours the interface: fit on a token set, scores (B, h, w) on the tokens' device,
state round trip with bit-identical scores, parameters declared once; the registry resolves names."""

import pytest
import torch

from normdino.errors import InputError
from normdino.features.tokens import Tokens, TokenSet
from normdino.methods import available, create, registry
from normdino.methods.base import check_params_match_init

SMALL = {"n_components": 8, "epochs": 2, "batch_images": 4, "clusters": 4, "retrieve_k": 2}


def _tokens(method, n_images=10, grid=(4, 4), dim=16, seed=0) -> TokenSet:
    request = method.feature_request()
    g = torch.Generator().manual_seed(seed)
    layers = len(request.layers)
    patches = torch.nn.functional.normalize(torch.randn(n_images, layers, *grid, dim, generator=g), dim=-1)
    cls = torch.nn.functional.normalize(torch.randn(n_images, layers, dim, generator=g), dim=-1) if request.cls else None
    return TokenSet(patches.half().numpy(), [(32, 32)] * n_images, None if cls is None else cls.half().numpy())


def _batch(tokens: TokenSet) -> Tokens:
    return tokens.batch(0, 3)


NAMES = sorted(set(available()) | {"anomalydino-2shot", "patchcore-30"})


@pytest.mark.parametrize("name", NAMES)
def test_fit_scores_and_state_round_trip(name):
    method = create(name, **{k: v for k, v in SMALL.items() if k in {p.name for p in registry.method_class(name).PARAMS}})
    assert method.name == name
    train = _tokens(method, seed=1)
    assert method.fit(train, _tokens(method, n_images=4, seed=2)) is method
    query = _batch(_tokens(method, n_images=3, seed=3))
    scores = method.patch_scores(query)
    assert scores.shape == (3, 4, 4) and scores.device == query.device and torch.isfinite(scores).all()
    state = {k: v.clone() for k, v in method.state_dict().items()}
    assert all(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in state.values())
    rebuilt = registry.create(name, **method.get_params()).load_state_dict(state, method.fit_info())
    assert torch.equal(rebuilt.patch_scores(query), scores)
    assert rebuilt.n_prototypes == method.n_prototypes and method.state_bytes() > 0


@pytest.mark.parametrize("family", sorted(registry.families()))
def test_params_are_declared_once_and_validated(family):
    cls = registry.families()[family]
    check_params_match_init(cls)
    method = cls()
    assert set(method.get_params()) == {p.name for p in cls.PARAMS}
    numeric = [p for p in cls.PARAMS if p.minimum is not None and p.type in (int, float) and not p.nargs]
    for param in numeric[:2]:
        setattr(method, param.name, param.type(param.minimum - 1))
        with pytest.raises(InputError, match=param.name):
            method.check_params()
        setattr(method, param.name, cls().get_params()[param.name])


def test_registry_names():
    assert {"dpmm", "anomalydino", "anomalydino-1shot", "patchcore-10%", "patchcore-1024", "patchcore-150"} <= set(available())
    assert create("dpmm-likelihood").score == "likelihood"
    assert create("patchcore-150").coreset_size == "150"
    assert create("anomalydino-4shot", seed=7).shots == 4 and create("anomalydino-4shot", seed=7).seed == 7
    with pytest.raises(InputError, match="unknown method"):
        create("nonsense")
    with pytest.raises(InputError, match="dpmm variants"):
        create("dpmm-manhattan")


@pytest.mark.parametrize("name", ["dpmm", "dpmm-euclidean", "anomalydino", "patchcore-30"])
def test_scoring_stays_on_the_tokens_device(name):
    """On the 'meta' device every tensor op runs without data: any hidden copy to the CPU or .item() would fail."""
    method = create(name, **{k: v for k, v in SMALL.items() if k in {p.name for p in registry.method_class(name).PARAMS}})
    method.fit(_tokens(method), _tokens(method, n_images=4, seed=2))
    method.to("meta")
    query = Tokens(torch.empty(2, 1, 4, 4, 16, device="meta"))
    scores = method.patch_scores(query)
    assert scores.device.type == "meta" and tuple(scores.shape) == (2, 4, 4)


def test_tokens_and_prototypes_on_different_devices_are_refused():
    method = create("anomalydino").fit(_tokens(create("anomalydino")))
    with pytest.raises(InputError, match="move the method"):
        method.patch_scores(Tokens(torch.empty(1, 1, 4, 4, 16, device="meta")))
