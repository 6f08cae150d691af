"""Shared fixtures: CPU-friendly vLLM settings, tiny checkpoints, an in-process engine.

Run everything:            python -m pytest
Skip the slow (>1 min) ones locally:  python -m pytest -m "not slow"
"""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import subprocess
import sys
import time

# Before anything imports vLLM: engine in-process (starts in ~2 s instead of
# 15), no hub, no usage reporting. See docs/vllm-cpu.md.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx  # noqa: E402
import pytest  # noqa: E402

from model_patches.config import DropeConfig  # noqa: E402
from model_patches.tiny import build_tiny_checkpoint  # noqa: E402

KV_CACHE_BYTES = 64 * 2**20


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


@contextlib.contextmanager
def vllm_engine(model_dir, **kwargs):
    """A float32, eager, in-process vLLM engine, torn down on exit so the next can start."""
    from vllm import LLM

    opts = dict(
        dtype="float32",
        enforce_eager=True,
        max_model_len=1024,
        kv_cache_memory_bytes=KV_CACHE_BYTES,
        max_num_batched_tokens=1024,
        enable_prefix_caching=False,
        seed=0,
    )
    opts.update(kwargs)
    llm = LLM(str(model_dir), **opts)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown() if hasattr(llm.llm_engine, "engine_core") else None
        del llm
        gc.collect()


def launch_server(ckpt, log_dir, *args, env=None):
    """Start `python -m server` (vLLM flags + ours) on a free port; return (process, base URL, log file) once healthy."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(log_dir / "server.log", "w+")
    env = {**os.environ, **(env or {})}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the async engine runs in its own process
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "server",
            "--model",
            str(ckpt),
            "--port",
            str(port),
            "--dtype",
            "float32",
            "--kv-cache-memory-bytes",
            str(KV_CACHE_BYTES),
            "--enforce-eager",
            *args,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read()[-4000:]}")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base, log
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    pytest.fail("server did not become healthy in 180 s")


def scrape_metrics(base: str) -> dict[str, float]:
    """A server's /metrics as {sample name: value summed over labels}, parsed by prometheus-client."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(httpx.get(base + "/metrics").text):
        for sample in fam.samples:
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out
