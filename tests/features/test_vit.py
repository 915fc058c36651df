"""normdino's own DINOv2 forward pass (normdino.features.vit) against transformers' modules, and what loads it."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from normdino.errors import ModelFileError
from normdino.features import vit
from normdino.features.backbone import Backbone
from normdino.features.loading import load_model, save_random_backbone
from normdino.model_checks import check_same_backbone

ROOT = Path(__file__).resolve().parents[2]


def _transformers_outputs(folder: Path, pixels: torch.Tensor):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        return model(pixel_values=pixels, output_hidden_states=True)


@pytest.mark.parametrize("arch, size", [("dinov2_vits14", 70), ("dinov2_vits14", 518), ("dinov2_vits14_reg", 84),
                                        ("dinov2_vitg14", 56)])
def test_the_forward_pass_equals_transformers_bit_for_bit(tmp_path, arch, size):
    """Every layer's tokens, at an interpolated and at the trained position grid, with registers and SwiGLU (ViT-g)."""
    folder = save_random_backbone(tmp_path / arch, arch=arch, seed=3, tiny=True)
    model, _ = load_model(folder)
    assert isinstance(model, vit.DinoV2)
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    expected = _transformers_outputs(folder, pixels)
    with torch.inference_mode():
        got = model(pixels, output_hidden_states=True)
    with torch.no_grad():
        again = model(pixels)  # the position embeddings resized once, kept for the next inputs of this size
    assert torch.equal(got.last_hidden_state, expected.last_hidden_state)
    assert torch.equal(again.last_hidden_state, expected.last_hidden_state)
    assert len(got.hidden_states) == len(expected.hidden_states) == model.config.num_hidden_layers + 1
    for ours, theirs in zip(got.hidden_states, expected.hidden_states):
        assert torch.equal(ours, theirs)


def test_vit_s_at_448_px_equals_transformers_bit_for_bit(tmp_path):
    """The paper's backbone at the paper's resolution (full size: 12 blocks, 384 wide, 1024 + 1 tokens)."""
    folder = save_random_backbone(tmp_path / "vits14", arch="dinov2_vits14", seed=1)
    pixels = torch.randn(1, 3, 448, 448, generator=torch.Generator().manual_seed(1))
    expected = _transformers_outputs(folder, pixels).last_hidden_state
    with torch.inference_mode():
        assert torch.equal(load_model(folder)[0](pixels).last_hidden_state, expected)


def _hub_cache_with(folder: Path, root: Path, repo: str = "facebook/dinov2-small") -> Path:
    """A Hugging Face hub cache under ``root`` holding ``folder``'s config.json and model.safetensors as ``repo``."""
    snapshot = root / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).write_bytes((folder / name).read_bytes())
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    return root


@pytest.mark.parametrize("source", ["folder", "hub cache"])
def test_a_dinov2_loads_and_runs_without_transformers_modelling_code(tiny_dinov2_dir, tmp_path, source):
    """The point of the module: start-up without ~3 s of transformers imports, from a folder or the hub cache."""
    name = str(tiny_dinov2_dir) if source == "folder" else "dinov2_vits14"
    env = {"PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
           "HF_HUB_CACHE": str(_hub_cache_with(tiny_dinov2_dir, tmp_path / "hub")),
           "NORMDINO_WEIGHTS_DIR": str(tmp_path / "no-store")}
    code = ("import sys, torch; from normdino.features.backbone import Backbone; "
            f"b = Backbone.from_pretrained({name!r}, image_size=56); b(torch.zeros(1, 3, 56, 56)); "
            "print(b.identifier); print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    identifier, modules = out.stdout.strip().splitlines()[-2:]
    assert modules == "[]"
    assert f"impl={vit.IMPLEMENTATION}" in identifier


def test_a_module_built_by_transformers_becomes_the_same_dinov2(tiny_dinov2_reg_dir):
    """Backbone converts a transformers module (5.x names q_proj/o_proj) into the one the folder loads."""
    from transformers import AutoModel

    module = AutoModel.from_pretrained(tiny_dinov2_reg_dir, dtype=torch.float32)
    direct = Backbone(module, "module", image_size=56)
    from_dir = Backbone.from_pretrained(tiny_dinov2_reg_dir, image_size=56)
    assert isinstance(direct.model, vit.DinoV2)
    assert direct.weights_digest == from_dir.weights_digest
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    assert torch.equal(direct(pixels), from_dir(pixels))


def _fingerprint_as_transformers_module(module: torch.nn.Module) -> str:
    """The weights digest normdino recorded before it ran DINOv2 itself, computed here from its definition."""
    skip = {"architectures", "transformers_version", "dtype", "torch_dtype", "normdino_random_weights"}
    config = {k: v for k, v in module.config.to_dict().items() if not k.startswith("_") and k not in skip}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for key, tensor in sorted(module.state_dict().items()):
        one = hashlib.sha256(f"{key}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        one.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        digest.update(one.digest())
    return digest.hexdigest()[:32]


def test_model_files_of_earlier_versions_still_name_the_same_weights(tiny_dinov2_dir, tmp_path):
    from transformers import AutoModel

    backbone = Backbone.from_pretrained(tiny_dinov2_dir, image_size=56)
    old_digest = _fingerprint_as_transformers_module(AutoModel.from_pretrained(tiny_dinov2_dir, dtype=torch.float32))
    assert old_digest != backbone.weights_digest
    old = backbone.identifier.replace(backbone.weights_digest, old_digest).replace(
        f"impl={vit.IMPLEMENTATION}", "transformers=4.56.0")
    assert backbone.identifier_before_plain_vit().split("|")[:2] == old.split("|")[:2]
    check_same_backbone(tmp_path / "old.normdino", {"identifier": old, "name": "old"}, backbone, overridden=False)

    other = save_random_backbone(tmp_path / "other", seed=7, tiny=True)
    with pytest.raises(ModelFileError, match="pass the same weights"):
        check_same_backbone(tmp_path / "old.normdino", {"identifier": old, "name": "old"},
                            Backbone.from_pretrained(other, image_size=56), overridden=False)


def test_the_weights_digest_names_the_architecture_and_every_tensor(tiny_dinov2_dir, tmp_path):
    """Independent of transformers: ViTConfig fields + hub tensor names and bytes."""
    model, _ = load_model(tiny_dinov2_dir)
    config = {k: v for k, v in model.config.to_dict().items() if k != "normdino_random_weights"}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    tensors = load_file(tiny_dinov2_dir / "model.safetensors")
    assert sorted(tensors) == sorted(model.state_dict())
    for key, tensor in sorted(tensors.items()):
        one = hashlib.sha256(f"{key}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        one.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        digest.update(one.digest())
    assert Backbone(model, "x").weights_digest == digest.hexdigest()[:32]


def test_missing_or_misshapen_tensors_are_refused_in_one_sentence(tiny_dinov2_dir, tmp_path):
    tensors = load_file(tiny_dinov2_dir / "model.safetensors")
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_bytes((tiny_dinov2_dir / "config.json").read_bytes())
    save_file({k: v for k, v in tensors.items() if "layer.1.mlp.fc2" not in k}, folder / "model.safetensors")
    with pytest.raises(ModelFileError, match=r"2 tensors missing, e.g. 'encoder.layer.1.mlp.fc2.bias'"):
        load_model(folder)
    save_file({**tensors, "layernorm.weight": torch.ones(7)}, folder / "model.safetensors")
    with pytest.raises(ModelFileError, match=r"'layernorm.weight' has shape \(7,\)"):
        load_model(folder)
    without_mask = {k: v for k, v in tensors.items() if k != "embeddings.mask_token"}  # pre-training only
    save_file(without_mask, folder / "model.safetensors")
    assert torch.count_nonzero(load_model(folder)[0].embeddings.mask_token) == 0


def test_weights_in_the_hub_cache_load_without_transformers(tiny_dinov2_dir, tmp_path, monkeypatch):
    """A hub name whose config.json and model.safetensors are cached (as after a first download)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(_hub_cache_with(tiny_dinov2_dir, tmp_path / "hub")))
    monkeypatch.setenv("NORMDINO_WEIGHTS_DIR", str(tmp_path / "no-store"))
    model, name = load_model("dinov2_vits14")
    assert isinstance(model, vit.DinoV2) and name == "facebook/dinov2-small"
    assert Backbone(model, name).weights_digest == Backbone.from_pretrained(tiny_dinov2_dir).weights_digest
