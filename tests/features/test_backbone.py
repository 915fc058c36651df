"""DINO backbones: loading, preprocessing, token grids, layers, errors — on tiny random models."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoModel

from normdino.features.backbone import IMAGENET_MEAN, IMAGENET_STD, Backbone
from normdino.features.loading import ALIASES, HUB_CONFIGS, hub_config, save_random_backbone
from normdino.errors import InputError, ModelFileError, WeightsNotFoundError

TINY = {"tiny_dinov2_dir": (14, 0), "tiny_dinov2_reg_dir": (14, 4), "tiny_dinov3_dir": (16, 4)}


@pytest.fixture(params=sorted(TINY))
def tiny_dir(request):
    """Each tiny saved model, with its (patch size, register count)."""
    return request.getfixturevalue(request.param), *TINY[request.param]


def _pixels(backbone, n=2, seed=0):
    rng = np.random.default_rng(seed)
    return torch.stack([backbone.preprocess(rng.random((40, 50)).astype(np.float32)) for _ in range(n)])


def test_448_input_gives_the_paper_grid(tiny_dir):
    folder, patch, _ = tiny_dir
    backbone = Backbone.from_pretrained(folder)
    side = 448 // patch
    assert backbone.image_size == 448 and backbone.patch_size == patch
    assert backbone.grid_shape() == (side, side)
    tokens = backbone(torch.zeros(1, 3, 448, 448))
    assert tokens.shape == (1, side, side, backbone.embed_dim) and tokens.dtype == torch.float32
    torch.testing.assert_close(tokens.norm(dim=-1), torch.ones(1, side, side))


def test_layers_match_hidden_states_computed_independently(tiny_dir):
    folder, patch, registers = tiny_dir
    backbone = Backbone.from_pretrained(folder, image_size=112, layers=(0, 1, -1))
    pixels = _pixels(backbone)
    out = backbone.encode(pixels)
    grid = 112 // patch
    assert backbone.layers == (0, 1, 2)
    assert out.patch_tokens.shape == (2, 3, grid, grid, 32) and out.cls_tokens.shape == (2, 3, 32)

    reference = AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        ref = reference(pixel_values=pixels, output_hidden_states=True)
    final_norm = reference.layernorm if hasattr(reference, "layernorm") else reference.norm
    for position, layer in enumerate((0, 1, 2)):
        hidden = ref.last_hidden_state if layer == 2 else final_norm(ref.hidden_states[layer])
        expected_patches = F.normalize(hidden[:, 1 + registers :], dim=-1).reshape(2, grid, grid, 32)
        torch.testing.assert_close(out.patch_tokens[:, position], expected_patches, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.cls_tokens[:, position], F.normalize(hidden[:, 0], dim=-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final_norm(ref.hidden_states[-1]), ref.last_hidden_state)


def test_unnormalised_tokens_and_single_forward_pass(tiny_dinov2_reg_dir):
    backbone = Backbone.from_pretrained(tiny_dinov2_reg_dir, image_size=56, layers=(1, 2), normalize=False)
    calls = []
    backbone.model.register_forward_hook(lambda *args: calls.append(1))
    pixels = _pixels(backbone, n=1)
    out = backbone.encode(pixels)
    assert len(calls) == 1
    assert not out.patch_tokens.is_inference() and not out.patch_tokens.requires_grad
    out.patch_tokens.mul_(1.0)  # callers may modify the result in place
    with torch.no_grad():
        expected = AutoModel.from_pretrained(tiny_dinov2_reg_dir)(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(out.patch_tokens[0, 1].reshape(16, 32), expected[0, 5:], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out.patch_tokens.norm(dim=-1), torch.ones(1))
    torch.testing.assert_close(backbone(pixels), out.patch_tokens[:, -1])


def test_preprocess_gray_replicated_and_normalised():
    backbone = Backbone.random(tiny=True, image_size=70)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    constant = backbone.preprocess(np.full((30, 41), 0.25, dtype=np.float32))
    assert constant.shape == (3, 70, 70)
    torch.testing.assert_close(constant, ((0.25 - mean) / std).expand(3, 70, 70))
    one_pixel = backbone.preprocess(np.array([[0.8]], dtype=np.float32))
    torch.testing.assert_close(one_pixel, ((0.8 - mean) / std).expand(3, 70, 70))
    gray = np.random.default_rng(1).random((20, 20)).astype(np.float32)
    pixels = backbone.preprocess(gray) * std + mean
    torch.testing.assert_close(pixels[0], pixels[1])
    torch.testing.assert_close(pixels[0], pixels[2])
    assert pixels.min() >= 0 and pixels.max() <= 1  # bicubic overshoot is clamped


def test_preprocess_matches_the_papers_pil_pipeline():
    backbone = Backbone.random(tiny=True, image_size=448)
    y, x = np.mgrid[0:256, 0:256] / 256.0
    smooth = 0.5 + 0.35 * np.sin(9 * x + 2 * y) * np.cos(5 * y)  # no overshoot, so 8-bit PIL does not clamp mid-way
    gray = np.round(smooth * 255).astype(np.uint8)
    reference = np.asarray(Image.fromarray(gray).resize((448, 448), Image.Resampling.BICUBIC)) / 255.0
    expected = (torch.tensor(reference, dtype=torch.float32) - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(
        IMAGENET_STD
    ).view(3, 1, 1)
    ours = backbone.preprocess(gray / np.float32(255))
    assert (ours - expected).abs().max() < 2.01 / 255 / min(IMAGENET_STD)  # PIL's 8-bit passes round twice


def test_preprocess_colour_rgba_uint8_and_antialiasing():
    backbone = Backbone.random(tiny=True, image_size=56)
    rgb = np.zeros((10, 10, 3), dtype=np.float32)
    rgb[..., 1] = 1.0
    pixels = backbone.preprocess(np.concatenate([rgb, np.zeros((10, 10, 1), np.float32)], axis=2))
    unnormalised = pixels * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    torch.testing.assert_close(unnormalised.mean(dim=(1, 2)), torch.tensor([0.0, 1.0, 0.0]))
    as_uint8 = backbone.preprocess(np.full((5, 5), 51, dtype=np.uint8))
    torch.testing.assert_close(as_uint8, backbone.preprocess(np.full((5, 5), 0.2, dtype=np.float32)))
    checkerboard = (np.indices((560, 560)).sum(axis=0) % 2).astype(np.float32)
    down = backbone.preprocess(checkerboard)[0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]
    assert abs(down.mean().item() - 0.5) < 0.01 and down.std().item() < 0.05  # no aliasing


def test_preprocess_rejects_bad_arrays():
    backbone = Backbone.random(tiny=True, image_size=28)
    for bad in (np.zeros((2, 3, 4, 5)), np.zeros((0, 4)), np.full((3, 3), np.nan)):
        with pytest.raises(InputError):
            backbone.preprocess(bad)
    with pytest.raises(InputError, match="multiple of the patch size"):
        backbone.encode(torch.zeros(1, 3, 30, 30))
    with pytest.raises(InputError, match=r"\(B, 3, H, W\)"):
        backbone.encode(torch.zeros(1, 1, 28, 28))


def test_image_size_rounds_down_to_patch_multiple_and_layers_are_checked(tiny_dinov3_dir):
    assert Backbone.from_pretrained(tiny_dinov3_dir, image_size=450).image_size == 448
    assert Backbone.random(tiny=True, image_size=450).image_size == 448
    with pytest.raises(InputError, match="Layer 3 does not exist"):
        Backbone.from_pretrained(tiny_dinov3_dir, layers=(3,))
    with pytest.raises(InputError, match="smaller than the patch size"):
        Backbone.from_pretrained(tiny_dinov3_dir, image_size=8)


def test_random_is_seeded_marked_and_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="normdino.features.backbone"):
        first = Backbone.random("dinov2_vits14_reg", seed=3, tiny=True, image_size=56)
    assert "RANDOM weights" in caplog.text and first.is_random
    again = Backbone.random("dinov2_vits14_reg", seed=3, tiny=True, image_size=56)
    other = Backbone.random("dinov2_vits14_reg", seed=4, tiny=True, image_size=56)
    pixels = _pixels(first, n=1)
    torch.testing.assert_close(first(pixels), again(pixels), rtol=0, atol=0)
    assert first.identifier == again.identifier != other.identifier
    state = torch.get_rng_state()
    Backbone.random(tiny=True, seed=5)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is left alone


def test_identifier_tracks_every_setting(tiny_dinov2_dir, tiny_dinov2_reg_dir):
    base = Backbone.from_pretrained(tiny_dinov2_dir, image_size=112)
    assert base.identifier == Backbone.from_pretrained(tiny_dinov2_dir, image_size=112, layers=(2,)).identifier
    variants = [
        Backbone.from_pretrained(tiny_dinov2_dir, image_size=126),
        Backbone.from_pretrained(tiny_dinov2_dir, image_size=112, layers=(1,)),
        Backbone.from_pretrained(tiny_dinov2_dir, image_size=112, normalize=False),
        Backbone.from_pretrained(tiny_dinov2_reg_dir, image_size=112),
    ]
    assert len({base.identifier, *(v.identifier for v in variants)}) == 5


def test_saved_model_is_loaded_as_random_and_matches_hub_config(tiny_dinov3_dir, tmp_path):
    config = json.loads((tiny_dinov3_dir / "config.json").read_text())
    assert config["model_type"] == "dinov3_vit" and config["num_register_tokens"] == 4
    assert config["patch_size"] == 16 and config["hidden_size"] == 32 and config["num_hidden_layers"] == 2
    assert Backbone.from_pretrained(tiny_dinov3_dir).is_random
    full = hub_config("dinov2_vitb14")
    assert (full.hidden_size, full.num_hidden_layers, full.num_attention_heads, full.patch_size) == (768, 12, 12, 14)
    with pytest.raises(InputError, match="not empty"):
        save_random_backbone(tiny_dinov3_dir, "dinov3_vits16", tiny=True)


def test_aliases_cover_the_common_models():
    assert ALIASES["dinov2_vits14"] == "facebook/dinov2-small"
    assert ALIASES["dinov2_vits14_reg"] == "facebook/dinov2-with-registers-small"
    assert ALIASES["dinov3_vits16"] == "facebook/dinov3-vits16-pretrain-lvd1689m"
    assert {"dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14", "dinov3_vitb16", "dinov3_vitl16"} <= set(ALIASES)
    assert set(HUB_CONFIGS) <= set(ALIASES)


def test_safetensors_file_beside_config(tiny_dinov2_reg_dir, tmp_path):
    direct = Backbone.from_pretrained(tiny_dinov2_reg_dir / "model.safetensors", image_size=56)
    from_dir = Backbone.from_pretrained(tiny_dinov2_reg_dir, image_size=56)
    pixels = _pixels(direct, n=1)
    torch.testing.assert_close(direct(pixels), from_dir(pixels), rtol=0, atol=0)
    assert direct.identifier.split("|")[1:] == from_dir.identifier.split("|")[1:]

    state = load_file(tiny_dinov2_reg_dir / "model.safetensors")
    (tmp_path / "config.json").write_bytes((tiny_dinov2_reg_dir / "config.json").read_bytes())
    save_file({f"dinov2_with_registers.{k}": v for k, v in state.items()}, tmp_path / "prefixed.safetensors")
    prefixed = Backbone.from_pretrained(tmp_path / "prefixed.safetensors", image_size=56)
    torch.testing.assert_close(prefixed(pixels), from_dir(pixels), rtol=0, atol=0)

    save_file({"something.else": torch.zeros(2)}, tmp_path / "wrong.safetensors")
    with pytest.raises(ModelFileError, match="does not hold the weights"):
        Backbone.from_pretrained(tmp_path / "wrong.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelFileError, match="junk.safetensors"):
        Backbone.from_pretrained(tmp_path / "junk.safetensors")


def test_missing_weights_fail_with_one_clear_sentence(tmp_path):
    with pytest.raises(WeightsNotFoundError, match=r"facebook/dinov2-small.*offline.*local folder"):
        Backbone.from_pretrained("dinov2_vits14")
    with pytest.raises(WeightsNotFoundError, match=r"gated.*(token|HF_TOKEN)"):
        Backbone.from_pretrained("dinov3_vitb16")
    with pytest.raises(WeightsNotFoundError, match="known alias"):
        Backbone.from_pretrained("dinov2_small")
    with pytest.raises(WeightsNotFoundError, match="do not exist"):
        Backbone.from_pretrained(tmp_path / "nothing")
    with pytest.raises(ModelFileError, match="no config.json"):
        Backbone.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelFileError, match="'bert' model"):
        Backbone.from_pretrained(tmp_path)


def test_unavailable_device_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(InputError, match="CUDA"):
        Backbone.random(tiny=True, device="cuda")
    with pytest.raises(InputError, match="Unknown device"):
        Backbone.random(tiny=True, device="tpu9")


def test_embed_images_from_paths_and_arrays(tiny_dinov2_dir, tmp_path):
    backbone = Backbone.from_pretrained(tiny_dinov2_dir, image_size=56, layers=(1, 2))
    rng = np.random.default_rng(2)
    arrays = [rng.integers(0, 256, size=(30 + i, 40), dtype=np.uint8) for i in range(5)]
    paths = []
    for i, array in enumerate(arrays):
        Image.fromarray(array).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    from_paths = backbone.embed_images(paths, batch_size=2, progress=False)
    from_arrays = backbone.embed_images([a / np.float32(255) for a in arrays], batch_size=5, progress=False)
    manual = backbone(torch.stack([backbone.preprocess(a / np.float32(255)) for a in arrays]))
    assert from_paths.shape == (5, 4, 4, 32) and from_paths.dtype == torch.float32
    torch.testing.assert_close(from_paths, manual, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(from_arrays, manual, atol=1e-5, rtol=1e-5)
    both = backbone.embed_images(paths[:2], progress=False, all_layers=True)
    assert both.shape == (2, 2, 4, 4, 32)
    with_workers = backbone.embed_images(paths, batch_size=2, progress=False, workers=2)
    torch.testing.assert_close(with_workers, from_paths, rtol=0, atol=0)
    with pytest.raises(InputError, match="batch_size"):
        backbone.embed_images(paths, batch_size=0)
    with pytest.raises(InputError, match="missing.png"):
        backbone.embed_images([tmp_path / "missing.png"], progress=False)


def test_unreachable_hub_fails_without_retrying(monkeypatch):
    import normdino.features.loading as module

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    probes = []
    monkeypatch.setattr(module, "_hub_reachable", lambda timeout=2.0: probes.append(timeout) or False)
    with pytest.raises(WeightsNotFoundError, match="hub is unreachable"):
        Backbone.from_pretrained("dinov2_vitl14")
    assert probes == [2.0]


def test_gated_and_connection_errors_are_recognised_through_the_cause_chain():
    import normdino.features.loading as module

    class GatedRepoError(Exception):
        pass

    try:
        try:
            raise GatedRepoError("401")
        except GatedRepoError as inner:
            raise OSError("cannot load") from inner
    except OSError as outer:
        assert module._is_gated(outer) and not module._is_connection_error(outer)
    assert module._is_connection_error(OSError("We couldn't connect to 'https://huggingface.co'"))


@pytest.mark.parametrize("arch", ["dinov2_vits14", "dinov2_vits14_reg", "dinov3_vits16"])
def test_bf16_copy_equals_a_converted_deep_copy_and_leaves_the_model_fp32(arch):
    import copy

    from normdino.features.backbone import bf16_copy
    from normdino.features.loading import build_random_model

    model = build_random_model(arch, tiny=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast, reference = bf16_copy(model), copy.deepcopy(model).to(torch.bfloat16)
    got, want = fast.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)
    assert all(torch.equal(v, before[k]) and v.dtype == before[k].dtype for k, v in model.state_dict().items())
    assert not any(p.requires_grad for p in fast.parameters())
