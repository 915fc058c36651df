"""Weights without internet (issue 23): official DINOv2/DINOv3 checkpoints and Hugging Face folders imported into
the offline store, read back to identical tokens; bad files get one sentence each and leave nothing behind."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from normdino.errors import ModelFileError
from normdino.features.backbone import Backbone
from normdino.features.loading import ALIASES, build_random_model, load_model
from normdino.features.weights import import_weights, list_weights, sha256

ARCHS = ["dinov2_vits14", "dinov2_vits14_reg", "dinov2_vitg14", "dinov3_vits16", "dinov3_vits16plus"]


def hub_layout(model, folder) -> dict[str, torch.Tensor]:
    """The tensors as the Hugging Face hub stores them (what save_pretrained writes)."""
    model.save_pretrained(folder)
    return load_file(str(folder / "model.safetensors"))


def official_layout(hub: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """The inverse key map, written independently: hub layout -> the layout of the official DINOv2/DINOv3 .pth files."""
    v3 = model.config.model_type == "dinov3_vit"
    hidden = model.config.hidden_size
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    fixed = {"embeddings.cls_token": "cls_token", "embeddings.mask_token": "mask_token",
             "embeddings.register_tokens": "storage_tokens" if v3 else "register_tokens",
             "embeddings.position_embeddings": "pos_embed", "layernorm.weight": "norm.weight",
             "layernorm.bias": "norm.bias", "norm.weight": "norm.weight", "norm.bias": "norm.bias"}
    gated = any("gate_proj" in k for k in hub)
    for key, value in hub.items():
        if key in fixed:
            out[fixed[key]] = value[0] if (v3 and key == "embeddings.mask_token") else value
            continue
        if key.startswith("embeddings.patch_embeddings."):
            out["patch_embed.proj." + key.split(".")[-1]] = value
            continue
        m = re.match(r"(?:encoder\.)?layer\.(\d+)\.(.+)$", key)
        n, rest = m.group(1), m.group(2)
        block = f"blocks.{n}."
        m = re.match(r"attention\.(?:attention\.)?(query|key|value|q_proj|k_proj|v_proj)\.(weight|bias)$", rest)
        if m:
            qkv.setdefault(f"{block}attn.qkv.{m.group(2)}", {})[m.group(1)[0]] = value
            continue
        rest = (rest.replace("attention.output.dense", "attn.proj").replace("attention.o_proj", "attn.proj")
                .replace("layer_scale1.lambda1", "ls1.gamma").replace("layer_scale2.lambda1", "ls2.gamma")
                .replace("mlp.weights_in", "mlp.w12").replace("mlp.weights_out", "mlp.w3"))
        if v3:
            rest = (rest.replace("mlp.gate_proj", "mlp.w1").replace("mlp.up_proj", "mlp.w2" if gated else "mlp.fc1")
                    .replace("mlp.down_proj", "mlp.w3" if gated else "mlp.fc2"))
        out[block + rest] = value
    for key, parts in qkv.items():
        if "k" not in parts:  # DINOv3 has no key bias: the original stores zeros and masks them
            parts["k"] = torch.zeros(hidden)
            out[key + "_mask"] = torch.cat([torch.ones(hidden), torch.zeros(hidden), torch.ones(hidden)])
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]])
    if v3:
        out["rope_embed.periods"] = 1.0 / model.rope_embeddings.inv_freq
    return out


@pytest.fixture
def store(tmp_path, monkeypatch):
    folder = tmp_path / "store"
    monkeypatch.setenv("NORMDINO_WEIGHTS_DIR", str(folder))
    return folder


@pytest.mark.parametrize("arch", ARCHS)
def test_an_official_checkpoint_imports_to_identical_tokens(arch, store, tmp_path):
    model = build_random_model(arch, seed=3, tiny=True)
    hub = hub_layout(model, tmp_path / "hf")
    checkpoint = tmp_path / f"{arch}_pretrain.pth"
    torch.save(official_layout(hub, model), checkpoint)
    imported = import_weights(checkpoint, arch=arch, tiny=True)
    assert imported.folder == store / arch and imported.record["sha256"] == sha256(store / arch / "model.safetensors")
    assert imported.record["source_sha256"] == sha256(checkpoint)
    stored = load_file(str(store / arch / "model.safetensors"))
    assert stored.keys() == hub.keys() and all(torch.equal(stored[k], hub[k]) for k in hub)  # bit for bit
    loaded, name = load_model(arch)  # --backbone ARCH finds the imported weights, offline
    assert name == ALIASES[arch]
    pixels = torch.rand(2, 3, 56, 56, generator=torch.Generator().manual_seed(0)) if "v2" in arch else \
        torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    reference = Backbone(model, "reference", image_size=pixels.shape[-1], layers=(1, -1)).encode(pixels)
    tokens = Backbone(loaded, name, image_size=pixels.shape[-1], layers=(1, -1)).encode(pixels)
    assert torch.equal(tokens.patch_tokens, reference.patch_tokens) and torch.equal(tokens.cls_tokens,
                                                                                    reference.cls_tokens)
    assert [w.alias for w in list_weights()] == [arch]


def official_dinov2_forward(state: dict[str, torch.Tensor], pixels: torch.Tensor, heads: int) -> torch.Tensor:
    """DINOv2's forward pass written from the original model code (tokens: CLS, registers, patches; final norm)."""
    x = F.conv2d(pixels, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=14)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([state["cls_token"].expand(len(x), -1, -1), x], 1) + state["pos_embed"]
    if "register_tokens" in state:
        x = torch.cat([x[:, :1], state["register_tokens"].expand(len(x), -1, -1), x[:, 1:]], 1)
    dim = x.shape[-1]
    blocks = sorted({int(k.split(".")[1]) for k in state if k.startswith("blocks.")})
    for n in blocks:
        p = lambda name: state[f"blocks.{n}.{name}"]  # noqa: E731
        h = F.layer_norm(x, (dim,), p("norm1.weight"), p("norm1.bias"), eps=1e-6)
        qkv = F.linear(h, p("attn.qkv.weight"), p("attn.qkv.bias")).reshape(len(x), -1, 3, heads, dim // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attention = torch.softmax(q @ k.transpose(-2, -1) / (dim // heads) ** 0.5, -1)
        h = (attention @ v).transpose(1, 2).reshape(len(x), -1, dim)
        x = x + p("ls1.gamma") * F.linear(h, p("attn.proj.weight"), p("attn.proj.bias"))
        h = F.layer_norm(x, (dim,), p("norm2.weight"), p("norm2.bias"), eps=1e-6)
        if f"blocks.{n}.mlp.w12.weight" in state:
            x1, x2 = F.linear(h, p("mlp.w12.weight"), p("mlp.w12.bias")).chunk(2, dim=-1)
            h = F.linear(F.silu(x1) * x2, p("mlp.w3.weight"), p("mlp.w3.bias"))
        else:
            h = F.linear(F.gelu(F.linear(h, p("mlp.fc1.weight"), p("mlp.fc1.bias"))), p("mlp.fc2.weight"),
                         p("mlp.fc2.bias"))
        x = x + p("ls2.gamma") * h
    return F.layer_norm(x, (dim,), state["norm.weight"], state["norm.bias"], eps=1e-6)


@pytest.mark.parametrize("arch", ["dinov2_vits14_reg", "dinov2_vitg14"])
def test_the_dinov2_key_map_matches_the_original_forward_pass(arch, store, tmp_path):
    """Independent of the inverse map: an official-layout state (random, with distinct q/k/v and SwiGLU halves)
    imported and run by transformers gives the original model code's tokens."""
    model = build_random_model(arch, seed=5, tiny=True)
    state = official_layout(hub_layout(model, tmp_path / "hf"), model)
    generator = torch.Generator().manual_seed(1)
    state = {k: (torch.randn(v.shape, generator=generator) * 0.2 if k.endswith(("gamma", "qkv.weight", "w12.weight"))
                 else v) for k, v in state.items()}
    torch.save(state, tmp_path / "official.pth")
    loaded, _ = load_model(import_weights(tmp_path / "official.pth", arch=arch, tiny=True).folder)
    pixels = torch.rand(1, 3, 518, 518, generator=generator)
    with torch.no_grad():
        ours = loaded(pixel_values=pixels).last_hidden_state
        original = official_dinov2_forward(state, pixels, loaded.config.num_attention_heads)
    torch.testing.assert_close(ours, original, atol=2e-5, rtol=1e-4)


def test_a_hugging_face_folder_is_recognised_and_stored(store, tmp_path):
    folder = tmp_path / "dinov2-small"
    build_random_model("dinov2_vits14", seed=2).save_pretrained(folder)  # the real architecture, random weights
    imported = import_weights(folder)
    assert imported.alias == "dinov2_vits14" and imported.record["format"] == "huggingface-folder"
    assert sha256(imported.folder / "model.safetensors") == sha256(folder / "model.safetensors")


def test_bad_files_get_one_sentence_and_leave_nothing(store, tmp_path, caplog):
    model = build_random_model("dinov2_vits14", seed=3, tiny=True)
    state = official_layout(hub_layout(model, tmp_path / "hf"), model)
    good = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(state, good)
    picture = tmp_path / "picture.pth"
    picture.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    resnet = tmp_path / "resnet50.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(1000, 2048)}, resnet)
    extra = tmp_path / "with_head.pth"
    torch.save({**state, "head.weight": torch.zeros(10, 32)}, extra)
    cut = tmp_path / "cut.pth"
    torch.save({**state, "blocks.0.mlp.fc1.weight": state["blocks.0.mlp.fc1.weight"][:64]}, cut)
    v3 = build_random_model("dinov3_vits16", seed=3, tiny=True)
    dinov3 = tmp_path / "dinov3.pth"
    torch.save(official_layout(hub_layout(v3, tmp_path / "hf3"), v3), dinov3)
    published = tmp_path / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"
    published.write_bytes(dinov3.read_bytes())  # the official name, other content
    code = tmp_path / "code.pth"
    torch.save({"cls_token": torch.zeros(1), "fn": print}, code)
    cases = [
        (picture, None, "is not a PyTorch checkpoint"),
        (truncated, "dinov2_vits14", "is truncated"),
        (resnet, None, "is not a DINOv2 or DINOv3 ViT checkpoint"),
        (good, None, "not one of the architectures normdino knows"),  # a width-32 ViT: no published model
        (dinov3, "dinov2_vits14", "is a DINOV3 checkpoint, not dinov2_vits14"),
        (extra, "dinov2_vits14", "1 tensor(s) the dinov2_vits14 architecture has no place for (e.g. 'head.weight')"),
        (cut, "dinov2_vits14", "does not fit the architecture"),
        (code, None, "never runs code from a file"),
    ]
    for path, arch, sentence in cases:
        with pytest.raises(ModelFileError) as info:
            import_weights(path, arch=arch, tiny=arch is not None)
        assert sentence in str(info.value), (path.name, str(info.value))
        assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert not store.exists() or not any(store.iterdir())  # nothing half-written
    assert list_weights() == []
    import logging

    with caplog.at_level(logging.WARNING, logger="normdino"):
        with pytest.raises(ModelFileError, match="not one of the architectures"):
            import_weights(published)  # the official name, other content: warned, then read as usual
    assert "does not match the checksum in its name (08c60483)" in caplog.text


def test_cli_weights_import_and_list(store, tmp_path, capsys):
    from normdino.cli import main

    folder = tmp_path / "dinov2-small"
    build_random_model("dinov2_vits14", seed=2).save_pretrained(folder)
    assert main(["weights", "import", str(folder)]) == 0
    assert main(["weights", "list"]) == 0
    out = capsys.readouterr().out
    assert "dinov2_vits14" in out and sha256(store / "dinov2_vits14" / "model.safetensors")[:16] in out
    assert main(["weights", "import", str(folder)]) == 1
    assert "already imported" in capsys.readouterr().err
    bad = tmp_path / "x.pth"
    bad.write_bytes(b"nope")
    assert main(["weights", "import", str(bad)]) == 1
    assert "is not a PyTorch checkpoint" in capsys.readouterr().err
