"""A second oracle from outside this project: transformers' own attention classes, unmodified.

Our reference (model_patches/reference.py) is our code too, so a misreading of DroPE shared by it
and the vLLM classes would pass every parity test. Here the DroPE checkpoint's weights are loaded
into stock transformers modules and made DroPE from the outside only:
  * NoPE: the model's own rotary module with every frequency set to zero (theta -> infinity), so
    cos = 1 and sin = 0 and ``apply_rotary_pos_emb`` is the identity;
  * full-width QK-norm: ``Olmo2Attention`` (RMSNorm over all heads' q and k of a token, the norm
    shape Sakana's checkpoints use) in place of ``LlamaAttention``;
  * beta: a forward hook multiplying each token's (normed) query by 1 + c ln((p + 1) / L_train),
    written here from the paper's formula rather than taken from model_patches.beta.
The engine drope-server runs must give the same prompt log-probabilities, past L_train.

    python -m pytest tests/test_oracles.py
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM, Olmo2Config, Qwen2Config, Qwen2ForCausalLM
from transformers.models.olmo2.modeling_olmo2 import Olmo2Attention

from model_patches.config import DropeConfig

from helpers import TOL, prompt, vllm_engine, vllm_run

L = 64
N = 4 * L  # positions up to s = 4


def paper_beta(n_positions: int, train_context: int, c: float) -> torch.Tensor:
    s = (torch.arange(n_positions, dtype=torch.float64) + 1) / train_context
    return torch.where(s > 1, 1 + c * torch.log(s), torch.ones_like(s)).float()


def stock_model(ckpt, olmo2_attention: bool, with_beta: bool = True):
    """The checkpoint in transformers' plain Llama / Qwen2 classes, DroPE applied only from outside."""
    cfg = json.loads((ckpt / "config.json").read_text())
    drope = DropeConfig.from_hf_config(cfg)
    family = {"llama_drope": "llama", "qwen2_drope": "qwen2"}[cfg["model_type"]]
    fields = {k: v for k, v in cfg.items() if not k.startswith("drope_") and k not in ("model_type", "architectures")}
    config_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if family == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    config = config_cls(**fields, attn_implementation="eager")
    model = model_cls(config).eval()
    if olmo2_attention:
        olmo2 = Olmo2Config(
            hidden_size=config.hidden_size,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads,
            rms_norm_eps=config.rms_norm_eps,
            attention_bias=False,
            attn_implementation="eager",
        )
        for layer in model.model.layers:
            layer.self_attn = Olmo2Attention(olmo2, layer.self_attn.layer_idx)
    model.load_state_dict(load_file(ckpt / "model.safetensors"), strict=True)
    with torch.no_grad():
        model.model.rotary_emb.inv_freq.zero_()  # cos = 1, sin = 0: no position enters q or k
    assert model.model.rotary_emb.attention_scaling == 1.0
    if drope.beta_coef and with_beta:
        assert drope.beta_mode == "log" and drope.softmax_scale is None  # the cases below
        beta = paper_beta(N, drope.train_context, drope.beta_coef)

        def scale(_module, _inputs, q):  # q: [1, S, heads * head_dim], positions 0..S-1
            return q * beta[: q.shape[1], None]

        for layer in model.model.layers:
            attn = layer.self_attn
            (attn.q_norm if olmo2_attention else attn.q_proj).register_forward_hook(scale)
    return model


@torch.no_grad()
def prompt_logprobs(model, ids: list[int]) -> torch.Tensor:
    x = torch.tensor([ids])
    logp = model(x).logits[0].log_softmax(-1)
    return logp[:-1].gather(-1, x[0, 1:, None])[:, 0]


@pytest.mark.parametrize(
    "family,attention_type,coef",
    [
        pytest.param("llama", "nope", 0.4, id="LlamaAttention-nope-c0.4"),
        pytest.param("qwen2", "nope", 0.4, id="Qwen2Attention-nope-c0.4"),
        pytest.param("llama", "qk_norm_nope", 0.4, id="Olmo2Attention-qk_norm-c0.4"),
    ],
)
def test_served_path_equals_stock_transformers_made_drope_from_outside(tiny_checkpoint, family, attention_type, coef):
    drope = DropeConfig(train_context=L, beta_coef=coef, attention_type=attention_type)
    ckpt = tiny_checkpoint(family, drope, seed=41)
    ids = prompt(N, seed=42)
    olmo2 = attention_type == "qk_norm_nope"
    oracle = prompt_logprobs(stock_model(ckpt, olmo2), ids)
    with vllm_engine(ckpt, max_model_len=2 * N) as llm:
        ((served, _, _, _),) = vllm_run(llm, [ids])
    torch.testing.assert_close(served, oracle, atol=TOL, rtol=0)
    if coef:  # and beta is really in play: the same oracle without it is far off past L_train
        no_beta = prompt_logprobs(stock_model(ckpt, olmo2, with_beta=False), ids)
        assert (no_beta[L:] - served[L:]).abs().max() > 100 * TOL
