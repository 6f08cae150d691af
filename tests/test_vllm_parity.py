"""The core test: DroPE inside vLLM's paged-attention engine equals the transformers reference.

Tiny float32 Llama and Qwen2 DroPE checkpoints (random weights, built here),
prompts at 1x, 2x and 4x the training context, beta off and on, plain and
full-width QK-norm attention, with chunked prefill forced to 32-token chunks and
prefix caching on. Prompt log-probabilities and greedy continuations (tokens and
their log-probabilities) must match to 1e-4.

    python -m pytest tests/test_vllm_parity.py
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from model_patches import reference  # noqa: F401  (registers the Auto classes)
from model_patches.config import DropeConfig

from helpers import TOL, assert_parity, prompt, reference_run, vllm_engine, vllm_run

L_TRAIN = 64


DROPE_CASES = [
    pytest.param("llama", "nope", 0.0, "log", id="llama-nope-c0"),
    pytest.param("llama", "nope", 0.4, "log", id="llama-nope-c0.4"),
    pytest.param("llama", "qk_norm_nope", 0.4, "log", id="llama-qknorm-c0.4"),
    pytest.param("llama", "q_norm_nope", 0.3, "floor", id="llama-qnorm-floor"),
    pytest.param("qwen2", "nope", 0.4, "log", id="qwen2-nope-c0.4"),
    pytest.param("qwen2", "k_norm_nope", 0.2, "log", id="qwen2-knorm-c0.2"),
    pytest.param("qwen2", "qk_norm_nope", 0.0, "log", id="qwen2-qknorm-c0"),
    pytest.param("qwen2", "qk_norm_nope", 0.4, "log", id="qwen2-qknorm-c0.4"),
]


@pytest.mark.parametrize("chunked_and_prefix_cached", [False, True], ids=["whole-prefill", "chunked+prefix-cache"])
@pytest.mark.parametrize("family,attention_type,coef,mode", DROPE_CASES)
def test_vllm_matches_reference(tiny_checkpoint, family, attention_type, coef, mode, chunked_and_prefix_cached):
    drope = DropeConfig(train_context=L_TRAIN, beta_coef=coef, beta_mode=mode, attention_type=attention_type)
    ckpt = tiny_checkpoint(family, drope)
    ref = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    prompts = [prompt(n, seed=n) for n in (L_TRAIN, 2 * L_TRAIN, 4 * L_TRAIN)]

    engine_kw = {}
    if chunked_and_prefix_cached:
        engine_kw = dict(enable_chunked_prefill=True, max_num_batched_tokens=32, enable_prefix_caching=True)
    with vllm_engine(ckpt, **engine_kw) as llm:
        for p, got in zip(prompts, vllm_run(llm, prompts), strict=True):
            assert_parity(got, reference_run(ref, p), f"{family}/{attention_type}/c={coef} len={len(p)}")

        if chunked_and_prefix_cached:
            # Two requests sharing a 3*L_train prefix: the second reads the
            # first's cached (unscaled) keys. vLLM skips the cache for requests
            # asking for prompt logprobs, so compare the continuations.
            shared = prompt(3 * L_TRAIN, seed=7)
            first, second = shared + prompt(L_TRAIN, seed=8), shared + prompt(L_TRAIN, seed=9)
            vllm_run(llm, [first], prompt_logprobs=False)
            (got,) = vllm_run(llm, [second], prompt_logprobs=False)
            assert got[3] >= 2 * L_TRAIN, f"prefix cache was not hit (cached tokens: {got[3]})"
            assert_parity(got, reference_run(ref, second), f"{family}/{attention_type} prefix-cached")


def test_beta_changes_output_only_past_train_context(tiny_checkpoint):
    """Same weights, only c differs: identical up to L_train, different beyond it."""
    ids = prompt(4 * L_TRAIN, seed=3)
    logprobs = {}
    for coef in (0.0, 0.5):
        ckpt = tiny_checkpoint("llama", DropeConfig(train_context=L_TRAIN, beta_coef=coef), seed=11)
        with vllm_engine(ckpt) as llm:
            logprobs[coef] = vllm_run(llm, [ids])[0][0]
    diff = (logprobs[0.0] - logprobs[0.5]).abs()
    # prompt_logprobs[i] is the prediction made at position i (the token at i + 1).
    inside, outside = diff[: L_TRAIN - 1], diff[L_TRAIN:]
    assert inside.max() <= TOL, f"beta leaked below L_train: max |diff| {inside.max():.2e}"
    assert outside.mean() > 1e-3, f"beta had no effect past L_train: mean |diff| {outside.mean():.2e}"
