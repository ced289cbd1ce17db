import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MIRROR = ROOT.parent / "shared" / "mirror"

# Offline by default: tiktoken reads the mirrored gpt2 files unless the caller set a cache dir.
if "TIKTOKEN_CACHE_DIR" not in os.environ and (MIRROR / "tiktoken").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(MIRROR / "tiktoken")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def tiny_cfg(**overrides):
    """A model small enough for unit tests, with deliberately odd sizes."""
    cfg = {
        "vocab_size": 50257,
        "context_length": 24,
        "emb_dim": 36,
        "n_heads": 3,
        "n_layers": 2,
        "drop_rate": 0.0,
        "qkv_bias": False,
    }
    cfg.update(overrides)
    return cfg


@pytest.fixture
def verdict_text():
    path = MIRROR / "the-verdict.txt"
    if not path.is_file():
        pytest.skip("the-verdict.txt mirror not available")
    return path.read_text(encoding="utf-8")
