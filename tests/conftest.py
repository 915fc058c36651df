"""Shared test settings: never reach the hub, find ../shared when it is there."""

import logging
import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# the token cache the API uses by default: one throw-away folder per test session, never the user's home
os.environ.setdefault("NORMDINO_CACHE_DIR", tempfile.mkdtemp(prefix="normdino-test-cache-"))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LGG_FLAIR = SHARED_DATA / "lgg-flair"


@pytest.fixture(autouse=True)
def _reset_cli_logging():
    """normdino.cli.main sets the 'normdino' logger's level (-q: errors only); later tests start from scratch."""
    yield
    logging.getLogger("normdino").setLevel(logging.NOTSET)


@pytest.fixture
def lgg_flair() -> Path:
    """The real LGG FLAIR data set in ../shared, or skip."""
    if not (LGG_FLAIR / "train" / "good").is_dir():
        pytest.skip("../shared/data/lgg-flair is not present")
    return LGG_FLAIR


# --- tiny random DINO backbones saved with save_pretrained (issue 4) ---------------------------
def _saved_tiny_backbone(factory, arch: str) -> Path:
    """Save a tiny seeded random model of ``arch`` once per session; load it with Backbone.from_pretrained."""
    from normdino.features.loading import save_random_backbone

    return save_random_backbone(factory.mktemp("backbones") / arch, arch=arch, seed=0, tiny=True)


@pytest.fixture(scope="session")
def tiny_dinov2_dir(tmp_path_factory) -> Path:
    """Folder with a tiny random DINOv2 (patch 14, hidden 32, 2 blocks, 2 heads)."""
    return _saved_tiny_backbone(tmp_path_factory, "dinov2_vits14")


@pytest.fixture(scope="session")
def tiny_dinov2_reg_dir(tmp_path_factory) -> Path:
    """Folder with a tiny random DINOv2 with 4 registers (patch 14)."""
    return _saved_tiny_backbone(tmp_path_factory, "dinov2_vits14_reg")


@pytest.fixture(scope="session")
def tiny_dinov3_dir(tmp_path_factory) -> Path:
    """Folder with a tiny random DINOv3 ViT-S/16 (4 registers, RoPE)."""
    return _saved_tiny_backbone(tmp_path_factory, "dinov3_vits16")
