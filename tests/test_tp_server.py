"""One end-to-end request to the server running the DroPE model at --tensor-parallel-size 2.

The greedy completion must be the reference model's greedy continuation.

    python -m pytest tests/test_tp_server.py
"""

from __future__ import annotations

import httpx
import pytest
import torch
from conftest import launch_server
from transformers import AutoTokenizer

from model_patches.config import DropeConfig
from model_patches.reference import load_reference

pytestmark = pytest.mark.slow


def test_completion_at_tp2(tiny_checkpoint, tmp_path, monkeypatch):
    ckpt = tiny_checkpoint("llama", DropeConfig(train_context=64, beta_coef=0.4, attention_type="qk_norm_nope"), seed=2)
    text = "The quick brown fox jumps over the lazy dog. " * 4  # 180 byte tokens: past L_train = 64
    tok = AutoTokenizer.from_pretrained(ckpt)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = load_reference(ckpt).generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                            max_new_tokens=8, do_sample=False)
    want = out[0, len(ids):].tolist()
    assert max(want) < 256, f"precondition: byte tokens only, no special token ({want})"

    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per rank (see README)
    proc, base, log = launch_server(ckpt, tmp_path, "--tensor-parallel-size", "2", "--max-model-len", "256",
                                    "--served-model-name", "tiny")
    try:
        r = httpx.post(f"{base}/v1/completions", timeout=120, json={
            "model": "tiny", "prompt": ids, "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        got = r.json()["choices"][0]["text"]
        assert got == tok.decode(want), f"TP=2 server {got!r} vs reference {tok.decode(want)!r}"
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except Exception:
            proc.kill()
        log.close()
