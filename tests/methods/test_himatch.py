"""HiMatch (and dpmm-multistage) on tiny synthetic tokens, against direct numpy computations of the stated rules."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from normdino.errors import InputError, ModelFileError
from normdino.features.tokens import FeatureRequest, Tokens, TokenSet
from normdino.methods import create
from normdino.methods.himatch import (
    HiMatchMethod, fuse, fusion_statistics, fusion_weights, retrieval_scores, retrieve, spherical_kmeans,
)

L, H, W, D = 3, 5, 5, 12


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _tokens(n, seed, anatomy_seed=7, noise=0.5):
    """Unit tokens (n, L, H, W, D) around a fixed per-position 'anatomy', CLS = normalised mean; float16."""
    base = np.random.default_rng(anatomy_seed).normal(size=(L, H, W, D))
    g = np.random.default_rng(seed)
    patches = _unit(base[None] + noise * g.normal(size=(n, L, H, W, D)))
    cls = _unit(patches.mean((2, 3)) + 0.3 * g.normal(size=(n, L, D)))
    return patches.astype(np.float16), cls.astype(np.float16)


def _token_set(n, seed=1, sources=None):
    patches, cls = _tokens(n, seed)
    return TokenSet(patches, [(80, 80)] * n, cls, sources or [])


def _batch(patches, cls):
    return Tokens(torch.from_numpy(patches.astype(np.float32)), torch.from_numpy(cls.astype(np.float32)))


# ---------------------------------------------------------------------------------------------- numpy references
def _np_z(s):
    c = s - s.mean()
    return c / (np.sqrt((c ** 2).mean()) + 1e-12)


def _np_retrieve(q_cls, q_desc, r_cls, r_desc, lam, k, exclude=()):
    """Brute force: per allowed reference, λ z(CLS cos) + (1-λ) z(patch sim), z over the allowed references only;
    sorted by (-score, index); at most k, fewer when fewer are allowed."""
    n = len(r_cls)
    candidates = [j for j in range(n) if j not in exclude]
    r_cls, r_desc = r_cls[candidates], r_desc[candidates]
    cos = np.array([q_cls @ r_cls[j] for j in range(len(candidates))], dtype=np.float64)
    if q_desc.shape[0] == 1:
        patch = np.array([q_desc[0] @ r_desc[j, 0] for j in range(len(candidates))], dtype=np.float64)
    else:
        patch = np.empty(len(candidates))
        for j in range(len(candidates)):
            sims = q_desc @ r_desc[j].T
            patch[j] = 0.5 * (sims.max(1).mean() + sims.max(0).mean())
    score = (lam * _np_z(cos) if lam > 0 else 0) + ((1 - lam) * _np_z(patch) if lam < 1 else 0)
    ranked = sorted(range(len(candidates)), key=lambda j: (-score[j], j))[:k]
    return [candidates[j] for j in ranked]


def _np_kmeans(x, k, iters=10):
    """Farthest-point init from the patch nearest the mean direction, then spherical Lloyd steps (one image)."""
    if k >= len(x):
        return x.copy()
    mean = x.mean(0)
    centres = [x[int(np.argmax(x @ (mean / np.linalg.norm(mean))))]]
    nearest = x @ centres[0]
    for _ in range(1, k):
        pick = int(np.argmin(nearest))
        centres.append(x[pick])
        nearest = np.maximum(nearest, x @ x[pick])
    c = np.stack(centres)
    for _ in range(iters):
        assign = np.argmax(x @ c.T, axis=1)
        for j in range(k):
            members = x[assign == j]
            if len(members):
                c[j] = _unit(members.sum(0))
    return c


def _np_stage_maps(query, banks, refs):
    """(L, H, W): 1 - max cosine to the union of the references' bank vectors, stage by stage, patch by patch."""
    out = np.empty((L, H, W))
    for layer in range(L):
        bank = np.concatenate([banks[r, layer] for r in refs])
        for i in range(H):
            for j in range(W):
                x = _unit(query[layer, i, j].astype(np.float64))
                out[layer, i, j] = 1 - max(float(x @ b) for b in bank)
    return out


# ---------------------------------------------------------------------------------------------- pure pieces
@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("centroids", [1, 3])
def test_retrieval_matches_brute_force(lam, centroids):
    g = np.random.default_rng(0)
    r_cls, q_cls = _unit(g.normal(size=(40, D))), _unit(g.normal(size=(4, D)))
    r_desc, q_desc = _unit(g.normal(size=(40, centroids, D))), _unit(g.normal(size=(4, centroids, D)))
    scores = retrieval_scores(*(torch.from_numpy(a).float() for a in (q_cls, q_desc, r_cls, r_desc)), lam)
    exclude = torch.zeros(4, 40, dtype=torch.bool)
    exclude[1, [3, 5]] = True
    got = retrieve(scores, 6, exclude)
    for b in range(4):
        banned = tuple(np.flatnonzero(exclude[b].numpy()))
        assert got[b].tolist() == _np_retrieve(q_cls[b], q_desc[b], r_cls, r_desc, lam, 6, banned)


def test_retrieval_standardises_over_the_allowed_references_only():
    """Issue 20: the left-out query (cosine 1 with itself, an outlier) must not enter its own z-scores."""
    g = np.random.default_rng(5)
    r_cls, r_desc = _unit(g.normal(size=(40, D))), _unit(g.normal(size=(40, 1, D)))
    q_cls, q_desc = r_cls[:6], r_desc[:6]  # the queries are references 0..5, each excluded from its own row
    exclude = torch.zeros(6, 40, dtype=torch.bool)
    exclude[torch.arange(6), torch.arange(6)] = True
    args = [torch.from_numpy(a).float() for a in (q_cls, q_desc, r_cls, r_desc)]
    scores = retrieval_scores(*args, 0.5, exclude)
    for b in range(6):
        allowed = [j for j in range(40) if j != b]
        expected = 0.5 * _np_z(r_cls[allowed] @ q_cls[b]) + 0.5 * _np_z(r_desc[allowed, 0] @ q_desc[b, 0])
        np.testing.assert_allclose(scores[b, allowed].numpy(), expected, atol=1e-5)
        assert scores[b, b] == -np.inf
    # the whole retrieval (k = 39: every allowed reference, in order) equals the brute-force leave-one-out
    got = retrieve(scores, 39, exclude)
    for b in range(6):
        assert got[b].tolist() == _np_retrieve(q_cls[b], q_desc[b], r_cls, r_desc, 0.5, 39, (b,))


def test_retrieve_caps_k_at_the_allowed_references():
    """Issue 20: with fewer allowed references than k, the rest is -1 (no reference), never an excluded one."""
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0], [1.0, 2.0, 3.0, 4.0]])
    exclude = torch.tensor([[True, False, True, False], [False, False, False, False]])
    assert retrieve(scores, 3, exclude).tolist() == [[1, 3, -1], [3, 2, 1]]


def test_fit_leave_one_out_never_retrieves_the_query_when_k_exceeds_the_references():
    """Issue 20: 6 training images and k = 10 (the default): each reliability query gets the 5 others."""
    train = _token_set(6)
    method = create("himatch", layers=[1, 2, 3], clusters=0, reliability_images=6).fit(train)
    assert method.retrieve_k == 10
    banks, cls, desc = method.banks_.float().numpy(), method.cls_.float().numpy(), method.descriptors_.float().numpy()
    maps = []
    for i in range(6):
        refs = _np_retrieve(cls[i], desc[i], cls, desc, 0.5, 10, (i,))
        assert len(refs) == 5 and i not in refs
        maps.append(_np_stage_maps(train.patches[i].astype(np.float32), banks, refs))
    maps = np.stack(maps)
    sigma = np.array([maps[:, layer].std() for layer in range(L)])
    assert sigma.min() > 0.05  # a query matched with itself would give maps of ~0 and a spread of ~0
    np.testing.assert_allclose(method.stage_std_.numpy(), sigma, rtol=1e-4)
    np.testing.assert_allclose(method.pixel_mean_.numpy(), maps.mean(0), atol=1e-5)


def test_fit_leave_one_out_excludes_the_query_patient_as_the_calibration_split_groups():
    """Issue 20: 2D slices <patient>_<slice>.png: no slice of the query's patient is a leave-one-out reference."""
    from normdino.io.inputs import held_out_groups

    patients, slices = 5, 3
    sources = [f"/data/TCGA_CS_{4940 + p}_19970222_{s}.png" for p in range(patients) for s in range(slices)]
    # slices of one patient are near copies: a per-file exclusion retrieves the patient's own other slices
    parts = [_tokens(slices, seed=30 + p, anatomy_seed=40 + p, noise=0.2) for p in range(patients)]
    patches, cls = (np.concatenate(x) for x in zip(*parts))
    train = TokenSet(patches, [(80, 80)] * len(sources), cls, sources)
    method = create("himatch", layers=[1, 2, 3], clusters=0, retrieve_k=2, reliability_images=15).fit(train)
    groups = held_out_groups(sources)
    assert len(set(groups)) == patients
    banks, cls32, desc = method.banks_.float().numpy(), method.cls_.float().numpy(), method.descriptors_.float().numpy()
    maps, own_patient_refs = [], 0
    for i in range(len(sources)):
        banned = tuple(j for j in range(len(sources)) if groups[j] == groups[i])
        refs = _np_retrieve(cls32[i], desc[i], cls32, desc, 0.5, 2, banned)
        own_patient_refs += len(set(_np_retrieve(cls32[i], desc[i], cls32, desc, 0.5, 2, (i,))) & set(banned))
        maps.append(_np_stage_maps(train.patches[i].astype(np.float32), banks, refs))
    assert own_patient_refs > len(sources)  # excluding only the file itself retrieves mostly the patient's slices
    maps = np.stack(maps)
    np.testing.assert_allclose(method.stage_std_.numpy(), np.array([maps[:, layer].std() for layer in range(L)]), rtol=1e-4)
    np.testing.assert_allclose(method.pixel_mean_.numpy(), maps.mean(0), atol=1e-5)


def test_leave_one_out_mask_groups_like_the_held_out_split():
    from normdino.methods.himatch import leave_one_out_mask

    sources = [f"/d/P{p}_{s}.png" for p in range(4) for s in range(2)]
    mask = leave_one_out_mask(sources, np.array([0, 5]))
    assert mask.tolist() == [[True, True] + [False] * 6, [False] * 4 + [True, True, False, False]]
    # fewer than 4 patients: the split keeps files apart, and so does the leave-one-out
    assert leave_one_out_mask(sources[:4], np.array([1])).tolist() == [[False, True, False, False]]
    # every reference in the query's volume: only the query itself is left out; a single reference is kept
    assert leave_one_out_mask(["v.nii.gz"] * 3, np.array([2])).tolist() == [[False, False, True]]
    assert leave_one_out_mask(["v.nii.gz"], np.array([0])).tolist() == [[False]]


def test_retrieve_breaks_ties_by_index():
    scores = torch.tensor([[1.0, 2.0, 2.0, 0.0, 2.0]])
    assert retrieve(scores, 3).tolist() == [[1, 2, 4]]


def test_spherical_kmeans_matches_numpy_and_is_deterministic():
    x = _unit(np.random.default_rng(3).normal(size=(2, 30, D)))
    got = spherical_kmeans(torch.from_numpy(x).double(), 5)
    for b in range(2):
        np.testing.assert_allclose(got[b].numpy(), _np_kmeans(x[b], 5), atol=1e-10)
    assert torch.equal(got, spherical_kmeans(torch.from_numpy(x).double(), 5))
    assert torch.equal(spherical_kmeans(torch.from_numpy(x), 40), torch.from_numpy(x))  # k >= P keeps every vector


def test_fusion_weights_follow_the_stated_rules():
    maps = torch.from_numpy(np.random.default_rng(4).gamma(2.0, size=(9, L, H, W)) * np.array([1, 3, 0.5])[None, :, None, None])
    stats = fusion_statistics(maps)
    m = maps.numpy()
    sigma = np.array([m[:, layer].std() for layer in range(L)])
    np.testing.assert_allclose(stats["stage_std"].numpy(), sigma, rtol=1e-5)
    expected = sigma ** -2 / (sigma ** -2).sum()
    np.testing.assert_allclose(fusion_weights(stats, "uncertainty").numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(fusion_weights(stats, "mean").numpy(), np.full(L, 1 / L))
    pixel_sigma, pixel_mu = m.std(0), m.mean(0)
    pixel_w = pixel_sigma ** -2 / (pixel_sigma ** -2).sum(0, keepdims=True)
    np.testing.assert_allclose(fusion_weights(stats, "pixel").numpy(), pixel_w, rtol=1e-5)

    query = torch.rand(2, L, H, W)
    q = query.numpy()
    np.testing.assert_allclose(fuse(query, stats, "uncertainty").numpy(), np.tensordot(q, expected, axes=([1], [0])), rtol=1e-5)
    np.testing.assert_allclose(fuse(query, stats, "mean").numpy(), q.mean(1), rtol=1e-5)
    np.testing.assert_allclose(fuse(query, stats, "pixel").numpy(), (pixel_w[None] * (q - pixel_mu[None])).sum(1),
                               rtol=1e-4, atol=1e-6)
    with pytest.raises(InputError, match="unknown fusion"):
        fusion_weights(stats, "median")


# ---------------------------------------------------------------------------------------------- the method
def test_registry_creates_himatch_with_its_request():
    method = create("himatch")
    assert isinstance(method, HiMatchMethod) and method.name == "himatch"
    assert method.feature_request() == FeatureRequest(layers=(3, 6, 9, 12), cls=True)
    assert create("himatch", layers=[12], retrieve_k=4).feature_request().layers == (12,)
    assert create("himatch").get_params()["layers"] == [3, 6, 9, 12]
    with pytest.raises(InputError, match="cls_weight"):
        create("himatch", cls_weight=1.5, layers=[1, 2, 3]).fit(_token_set(4))


@pytest.mark.parametrize("clusters", [0, 4])
def test_stage_maps_equal_direct_numpy_computation(clusters):
    train = _token_set(12)
    method = create("himatch", layers=[1, 2, 3], clusters=clusters, retrieve_k=3, fusion="mean").fit(train)
    banks = method.banks_.float().numpy()
    if clusters == 0:  # every token kept (normalised), in patch order
        np.testing.assert_allclose(banks, _unit(train.patches.astype(np.float64)).reshape(12, L, H * W, D), atol=2e-3)
    else:
        for i in (0, 7):
            for layer in range(L):
                x = _unit(train.patches[i, layer].astype(np.float32).reshape(-1, D).astype(np.float64))
                np.testing.assert_allclose(banks[i, layer], _np_kmeans(x, clusters), atol=2e-3)
    qp, qc = _tokens(2, seed=9)
    tokens = _batch(qp, qc)
    refs = method.retrieve_references(tokens)
    desc = method.descriptors_.float().numpy()
    for b in range(2):
        q_desc = _unit(_unit(qp[b, -1].astype(np.float32).reshape(-1, D)).mean(0))[None]
        assert refs[b].tolist() == _np_retrieve(_unit(qc[b, -1].astype(np.float32)), q_desc,
                                                method.cls_.float().numpy(), desc, 0.5, 3)
    maps = method._stage_maps(tokens)
    for b in range(2):
        np.testing.assert_allclose(maps[b].numpy(), _np_stage_maps(qp[b], banks, refs[b].tolist()), atol=1e-5)
    np.testing.assert_allclose(method.patch_scores(tokens).numpy(), maps.numpy().mean(1), atol=1e-6)


def test_fit_reliability_is_leave_one_out_with_sources_excluded():
    sources = [f"vol{i // 2}" for i in range(10)]  # two slices per volume
    train = _token_set(10, sources=sources)
    method = create("himatch", layers=[1, 2, 3], clusters=0, retrieve_k=2, reliability_images=10).fit(train)
    banks, cls, desc = method.banks_.float().numpy(), method.cls_.float().numpy(), method.descriptors_.float().numpy()
    maps = []
    for i in range(10):
        banned = tuple(j for j in range(10) if sources[j] == sources[i])
        refs = _np_retrieve(cls[i], desc[i], cls, desc, 0.5, 2, banned)
        assert not set(refs) & set(banned)
        maps.append(_np_stage_maps(train.patches[i].astype(np.float32), banks, refs))
    maps = np.stack(maps)
    sigma = np.array([maps[:, layer].std() for layer in range(L)])
    np.testing.assert_allclose(method.stage_std_.numpy(), sigma, rtol=1e-4)
    np.testing.assert_allclose(method.pixel_mean_.numpy(), maps.mean(0), atol=1e-5)
    np.testing.assert_allclose(method.fit_info()["stage_weights"], sigma ** -2 / (sigma ** -2).sum(), atol=1e-5)


@pytest.mark.parametrize("params", [dict(), dict(descriptor="centroids", fusion="pixel"), dict(cluster_scope="retrieved", clusters=3)])
def test_state_round_trip_gives_identical_scores(tmp_path, params):
    train = _token_set(14)
    method = create("himatch", **{"layers": [1, 2, 3], "clusters": 4, "retrieve_k": 3, **params}).fit(train)
    save_file(method.state_dict(), str(tmp_path / "m.safetensors"))
    loaded = create("himatch", **method.get_params()).load_state_dict(load_file(str(tmp_path / "m.safetensors")), method.fit_info())
    tokens = _batch(*_tokens(3, seed=11))
    assert torch.equal(method.patch_scores(tokens), loaded.patch_scores(tokens))
    assert loaded.fit_info() == method.fit_info() and loaded.state_bytes() == method.state_bytes()


def test_load_rejects_wrong_or_corrupt_state():
    method = create("himatch", layers=[1, 2, 3], clusters=4, retrieve_k=3).fit(_token_set(8))
    state = method.state_dict()
    with pytest.raises(ModelFileError, match="banks has shape"):
        create("himatch", layers=[1, 2, 3], clusters=5).load_state_dict(state)
    with pytest.raises(ModelFileError, match="missing tensors banks"):
        create("himatch", layers=[1, 2, 3], clusters=4).load_state_dict({k: v for k, v in state.items() if k != "banks"})
    bad = dict(state, stage_std=torch.tensor([0.1, float("nan"), 0.1]))
    with pytest.raises(ModelFileError, match="NaN"):
        create("himatch", layers=[1, 2, 3], clusters=4).load_state_dict(bad)
    with pytest.raises(ModelFileError, match="descriptors has shape"):
        create("himatch", layers=[1, 2, 3], clusters=4, descriptor="centroids").load_state_dict(state)


def _planted(method_name, check_deep_only=True, **params):
    """A planted patch on every stage (image 0) and on the deep stages only (image 1) outranks every normal patch."""
    train = _token_set(24)
    method = create(method_name, layers=[1, 2, 3], **params).fit(train)
    qp, qc = _tokens(2, seed=13)
    qp[0, :, 1, 3] = _unit(np.random.default_rng(14).normal(size=(L, D))).astype(np.float16)
    qp[1, 1:, 3, 2] = _unit(np.random.default_rng(15).normal(size=(L - 1, D))).astype(np.float16)  # deep stages only
    scores = method.patch_scores(_batch(qp, qc))
    assert scores.shape == (2, H, W)
    normal0 = torch.cat([scores[0].flatten()[:8], scores[0].flatten()[9:]])
    normal1 = torch.cat([scores[1].flatten()[:17], scores[1].flatten()[18:]])
    assert scores[0, 1, 3] > normal0.max()
    assert scores[1, 3, 2] > normal1.max() or not check_deep_only


@pytest.mark.parametrize("fusion", ["uncertainty", "pixel", "mean"])
def test_planted_anomaly_ranks_above_normal_patches(fusion):
    _planted("himatch", clusters=6, retrieve_k=4, fusion=fusion)


# ---------------------------------------------------------------------------------------------- ablation switches
def test_cls_only_and_patch_only_retrieval_use_one_branch():
    train = _token_set(16)
    qp, qc = _tokens(1, seed=20)
    cls_only = create("himatch", layers=[1, 2, 3], retrieval="cls", retrieve_k=5).fit(train)
    patch_only = create("himatch", layers=[1, 2, 3], retrieval="patch", retrieve_k=5).fit(train)
    dual = create("himatch", layers=[1, 2, 3], retrieval="dual", retrieve_k=5).fit(train)
    ref_cls = cls_only.cls_.float().numpy()
    q_cls = _unit(qc[0, -1].astype(np.float32))
    assert cls_only.retrieve_references(_batch(qp, qc))[0].tolist() == list(np.argsort(-(ref_cls @ q_cls), kind="stable")[:5])
    desc = patch_only.descriptors_.float().numpy()[:, 0]
    q_desc = _unit(_unit(qp[0, -1].astype(np.float32).reshape(-1, D)).mean(0))
    assert patch_only.retrieve_references(_batch(qp, qc))[0].tolist() == list(np.argsort(-(desc @ q_desc), kind="stable")[:5])
    # changing only the query's CLS moves CLS-only retrieval, never patch-only retrieval
    qc2 = qc.copy()
    qc2[0, -1] = ref_cls[3].astype(np.float16)
    assert cls_only.retrieve_references(_batch(qp, qc2))[0, 0] == 3
    assert torch.equal(patch_only.retrieve_references(_batch(qp, qc2)), patch_only.retrieve_references(_batch(qp, qc)))
    assert not torch.equal(dual.retrieve_references(_batch(qp, qc2)), dual.retrieve_references(_batch(qp, qc)))


def test_single_stage_and_mean_versus_uncertainty_fusion():
    train = _token_set(12)
    tokens = _batch(*_tokens(2, seed=21))
    full = create("himatch", layers=[1, 2, 3], clusters=4, retrieve_k=3).fit(train)
    maps = full._stage_maps(tokens)
    weights = torch.tensor(full.fit_info()["stage_weights"])
    assert torch.allclose(full.patch_scores(tokens), (weights[None, :, None, None] * maps).sum(1), atol=1e-5)
    mean = create("himatch", layers=[1, 2, 3], clusters=4, retrieve_k=3, fusion="mean").fit(train)
    assert torch.allclose(mean.patch_scores(tokens), maps.mean(1), atol=1e-6)
    assert not torch.allclose(mean.patch_scores(tokens), full.patch_scores(tokens), atol=1e-4)
    single_set = TokenSet(train.patches[:, -1:], train.shapes, train.cls[:, -1:])
    single = create("himatch", layers=[3], clusters=4, retrieve_k=3).fit(single_set)
    assert single.fit_info()["stage_weights"] == [1.0]
    single_tokens = Tokens(tokens.patches[:, -1:], tokens.cls[:, -1:])
    assert torch.allclose(single.patch_scores(single_tokens), maps[:, -1], atol=1e-6)
    with pytest.raises(InputError, match="expects 1 layers"):
        single.patch_scores(tokens)


# ---------------------------------------------------------------------------------------------- dpmm-multistage
_DPMM = dict(layers=[1, 2, 3], n_components=8, epochs=3, batch_images=4)


def test_dpmm_multistage_registry_fusion_rule_and_planted_anomaly():
    from normdino.methods.dpmm_multistage import DPMMMultistage
    from normdino.methods.registry import all_params

    method = create("dpmm-multistage")
    assert isinstance(method, DPMMMultistage) and method.feature_request() == FeatureRequest(layers=(3, 6, 9, 12))
    assert "fusion" in all_params() and sorted(all_params()["layers"][1]) == ["dpmm-multistage", "himatch"]
    train = _token_set(16)
    fitted = create("dpmm-multistage", **_DPMM, reliability_images=16).fit(train)
    tokens = train.batch(0, 16)
    maps = fitted._stage_maps(tokens)
    for i, stage in enumerate(fitted.stages_):  # each stage map is 1 - max cosine to that stage's prototypes
        x = _unit(train.patches[:, i].astype(np.float64))
        p = _unit(stage.prototypes_.double().numpy())
        np.testing.assert_allclose(maps[:, i].numpy(), 1 - (x @ p.T).max(-1), atol=1e-5)
    m = maps.numpy()
    sigma = np.array([m[:, i].std() for i in range(L)])
    np.testing.assert_allclose(fitted.fit_info()["stage_weights"], sigma ** -2 / (sigma ** -2).sum(), atol=1e-5)
    _planted("dpmm-multistage", check_deep_only=False, n_components=64, epochs=5, batch_images=4)  # 25 positions


def test_dpmm_multistage_round_trip_and_bad_state(tmp_path):
    method = create("dpmm-multistage", **_DPMM, fusion="pixel").fit(_token_set(12))
    save_file(method.state_dict(), str(tmp_path / "m.safetensors"))
    state = load_file(str(tmp_path / "m.safetensors"))
    loaded = create("dpmm-multistage", **method.get_params()).load_state_dict(state, method.fit_info())
    tokens = _batch(*_tokens(3, seed=11))
    assert torch.equal(method.patch_scores(tokens), loaded.patch_scores(tokens))
    with pytest.raises(ModelFileError, match="no mixture for stage 4"):
        create("dpmm-multistage", **dict(_DPMM, layers=[1, 2, 3, 4])).load_state_dict(state)
    with pytest.raises(ModelFileError, match="stage_std"):
        create("dpmm-multistage", **_DPMM).load_state_dict(dict(state, stage_std=torch.ones(2)))
