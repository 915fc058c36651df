"""Shared test settings: never reach the hub, find ../shared when it is there."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LGG_FLAIR = SHARED_DATA / "lgg-flair"


@pytest.fixture
def lgg_flair() -> Path:
    """The real LGG FLAIR data set in ../shared, or skip."""
    if not (LGG_FLAIR / "train" / "good").is_dir():
        pytest.skip("../shared/data/lgg-flair is not present")
    return LGG_FLAIR
