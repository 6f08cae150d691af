"""Checkpoint shapes met in the wild load and match the reference.

  * Sakana's QK-norm attention always carries *both* q_norm and k_norm weights,
    also for q_norm_nope / k_norm_nope: the unused one is accepted and ignored
    (logged once) by vLLM and by the transformers reference, and the two agree.
  * Qwen2 with tied embeddings, and Qwen2 with sliding-window layers, match the
    reference in vLLM.

    python -m pytest tests/test_model_compat.py
"""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import vllm_engine
from safetensors.torch import load_file, save_file
from test_vllm_parity import L_TRAIN, assert_parity, prompt, reference_run, vllm_run

from model_patches.config import DropeConfig
from model_patches.reference import load_reference


def add_unused_norm(ckpt, attention_type: str) -> int:
    """Add the norm Sakana's module carries but this variant does not use (random, so using it shows)."""
    path = ckpt / "model.safetensors"
    sd = load_file(path)
    used, unused = ("q_norm", "k_norm") if attention_type == "q_norm_nope" else ("k_norm", "q_norm")
    g = torch.Generator().manual_seed(5)
    added = 0
    for name in list(sd):
        if f"self_attn.{used}.weight" in name:
            other = name.replace(used, unused)
            width = sd[name.replace(f"{used}.weight", "k_proj.weight" if unused == "k_norm" else "q_proj.weight")].shape[0]
            sd[other] = 1.0 + 2.0 * torch.rand(width, generator=g)
            added += 1
    save_file(sd, path, metadata={"format": "pt"})
    return added


@pytest.mark.parametrize("family,attention_type", [("llama", "q_norm_nope"), ("qwen2", "k_norm_nope")])
def test_sakana_checkpoint_with_both_norms(tiny_checkpoint, tmp_path, caplog, family, attention_type):
    import shutil

    drope = DropeConfig(train_context=L_TRAIN, beta_coef=0.3, attention_type=attention_type)
    ckpt = tmp_path / "sakana"
    shutil.copytree(tiny_checkpoint(family, drope, seed=3), ckpt)
    assert add_unused_norm(ckpt, attention_type) == 2

    with caplog.at_level(logging.WARNING):
        ref = load_reference(ckpt)
    ignored = [r for r in caplog.records if "unused QK-norm" in r.getMessage()]
    assert len(ignored) == 1, [r.getMessage() for r in caplog.records]
    unused = "k_norm" if attention_type == "q_norm_nope" else "q_norm"
    assert not any(unused in n for n, _ in ref.named_parameters())

    prompts = [prompt(n, seed=n) for n in (L_TRAIN, 3 * L_TRAIN)]
    caplog.clear()
    with caplog.at_level(logging.WARNING), vllm_engine(ckpt) as llm:
        got = vllm_run(llm, prompts)
    assert sum("unused QK-norm" in r.getMessage() for r in caplog.records) == 1
    for p, g in zip(prompts, got):
        assert_parity(g, reference_run(ref, p), f"{family}/{attention_type} with both norms len={len(p)}")


@pytest.mark.parametrize("variant", ["tied", "sliding"])
def test_qwen2_tied_and_sliding_window(tiny_checkpoint, variant):
    drope = DropeConfig(train_context=L_TRAIN, beta_coef=0.4, attention_type="qk_norm_nope")
    if variant == "tied":
        ckpt = tiny_checkpoint("qwen2", drope, seed=6, tie_word_embeddings=True)
    else:
        # Layer 0 full attention, layer 1 a 48-token window: prompts longer than the window differ.
        ckpt = tiny_checkpoint("qwen2", drope, seed=4, use_sliding_window=True, sliding_window=48,
                               max_window_layers=1, layer_types=("full_attention", "sliding_attention"))
    ref = load_reference(ckpt)
    if variant == "tied":
        assert ref.lm_head.weight.data_ptr() == ref.model.embed_tokens.weight.data_ptr()
    else:
        assert ref.config.layer_types == ["full_attention", "sliding_attention"]
        # The window must matter for these prompts, or parity would not show vLLM applies it.
        full = load_reference(ckpt, layer_types=["full_attention"] * 2, use_sliding_window=False)
        long = prompt(3 * L_TRAIN, seed=1)
        assert (reference_run(full, long)[0] - reference_run(ref, long)[0]).abs().max() > 1e-2
    prompts = [prompt(n, seed=n) for n in (L_TRAIN, 3 * L_TRAIN)]
    with vllm_engine(ckpt) as llm:
        got = vllm_run(llm, prompts)
    for p, g in zip(prompts, got):
        assert_parity(g, reference_run(ref, p), f"qwen2 {variant} len={len(p)}")
