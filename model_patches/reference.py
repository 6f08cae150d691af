"""Transformers reference implementation of DroPE Llama / Qwen2 (no remote code).

This is the ground truth the vLLM path is tested against and the model that
recalibration trains. It registers ``llama_drope`` / ``qwen2_drope`` with the
Auto classes, so ``AutoModelForCausalLM.from_pretrained(dir)`` loads Sakana's
published checkpoints as well as ours without ``trust_remote_code``.

What differs from upstream transformers, and nothing else:
  * no rotary embedding is applied to q or k;
  * optional RMSNorm over the whole flattened q / k projection (Sakana's layout,
    weights ``self_attn.q_norm.weight`` / ``self_attn.k_norm.weight``);
  * the query of the token at position p is multiplied by beta(p) (``beta.py``);
  * optional constant ``softmax_scale`` in place of 1/sqrt(head_dim).
Keys go into the KV cache after the norm and unscaled, so cached generation equals
a full forward. (Sakana's QK-norm forward passes ``past_key_value=`` where current
transformers passes ``past_key_values=``, silently dropping the cache; we take the
current name.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, Qwen2Config
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaForCausalLM,
    LlamaRMSNorm,
    eager_attention_forward,
)
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2ForCausalLM
from transformers.utils import logging

from .beta import scale_queries
from .config import DEFAULT_CONTEXT_MULTIPLE, TRAIN_CONTEXT_KEY, DropeConfig, DropeConfigError, train_context_of

logger = logging.get_logger(__name__)


class _PinnedTrainContext:
    """Pins L_train when a DroPE config is built, before anything can raise its position limit.

    Sakana's checkpoints state L_train only through ``max_position_embeddings``,
    which is also the longest prompt vLLM accepts. Anything that raises that limit
    afterwards (vLLM's ``hf_overrides``, which are applied to the built config, or a
    user's ``--hf-overrides '{"max_position_embeddings": 32768}'``) would silently
    move L_train and turn beta off. With no RoPE the limit means nothing to the
    model, so it is raised here to at least the serving default, 8 x L_train: plain
    ``vllm serve <DroPE checkpoint>`` then serves past the training length as is.
    """

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        setattr(self, TRAIN_CONTEXT_KEY, train_context_of(self))
        drope = DropeConfig.from_hf_config(self)  # a bad checkpoint fails here, with one clear message
        self.max_position_embeddings = max(self.max_position_embeddings, DEFAULT_CONTEXT_MULTIPLE * drope.train_context)


class DroPELlamaConfig(_PinnedTrainContext, LlamaConfig):
    model_type = "llama_drope"


class DroPEQwen2Config(_PinnedTrainContext, Qwen2Config):
    model_type = "qwen2_drope"


class DroPEAttentionMixin:
    """Replaces the forward of a Llama-shaped attention module (q/k/v/o_proj)."""

    def _init_drope(self, config: Any) -> None:
        self.drope = DropeConfig.from_hf_config(config)
        if self.drope.softmax_scale is not None:
            self.scaling = self.drope.softmax_scale
        # Full-width norms: one RMS over all heads of the token (OLMo-2 / Sakana).
        if self.drope.q_norm:
            self.q_norm = LlamaRMSNorm(config.num_attention_heads * self.head_dim, config.rms_norm_eps)
        if self.drope.k_norm:
            self.k_norm = LlamaRMSNorm(config.num_key_value_heads * self.head_dim, config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: Any = None,  # RoPE's (cos, sin): deliberately unused
        attention_mask: torch.Tensor | None = None,
        past_key_values: Any = None,
        position_ids: torch.LongTensor | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]  # [B, S]
        hidden_shape = (*input_shape, -1, self.head_dim)

        q = self.q_proj(hidden_states)  # [B, S, H*D]
        k = self.k_proj(hidden_states)  # [B, S, KV*D]
        v = self.v_proj(hidden_states)
        if self.drope.q_norm:
            q = self.q_norm(q)
        if self.drope.k_norm:
            k = self.k_norm(k)
        if self.drope.scales_queries:
            if position_ids is None:
                past = past_key_values.get_seq_length(self.layer_idx) if past_key_values is not None else 0
                position_ids = torch.arange(past, past + input_shape[-1], device=q.device)[None]
            d = self.drope
            q = scale_queries(q, position_ids.expand(input_shape), d.train_context, d.beta_coef, d.beta_mode)

        q = q.view(hidden_shape).transpose(1, 2)  # [B, H, S, D]
        k = k.view(hidden_shape).transpose(1, 2)
        v = v.view(hidden_shape).transpose(1, 2)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        sliding = getattr(self, "sliding_window", None)
        attn_output, attn_weights = attention_interface(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **({"sliding_window": sliding} if sliding is not None else {}),
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class DroPELlamaAttention(DroPEAttentionMixin, LlamaAttention):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self._init_drope(config)


class DroPEQwen2Attention(DroPEAttentionMixin, Qwen2Attention):
    def __init__(self, config: Qwen2Config, layer_idx: int):
        super().__init__(config, layer_idx)
        self._init_drope(config)


class _DroPEModelMixin:
    """Swaps every layer's attention for its DroPE twin; refuses missing QK-norm weights."""

    _drope_attention: type[nn.Module]

    def _install_drope_attention(self, config: Any) -> None:
        drope = DropeConfig.from_hf_config(config)  # one clear error here rather than one per layer
        for layer in self.model.layers:
            layer.self_attn = self._drope_attention(config, layer.self_attn.layer_idx)
        # Sakana's q_norm_nope / k_norm_nope checkpoints carry both norms (their attention
        # module always builds both); the one this variant does not apply is not loaded.
        unused = [n for n, used in (("q_norm", drope.q_norm), ("k_norm", drope.k_norm)) if not used]
        if drope.q_norm != drope.k_norm:
            self._keys_to_ignore_on_load_unexpected = {rf"\.self_attn\.{n}\." for n in unused}
            logger.info(
                "attention_type=%s: %s weights in the checkpoint, if any, are ignored", drope.attention_type, unused[0]
            )

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any):
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        missing = sorted(k for k in info["missing_keys"] if ".q_norm." in k or ".k_norm." in k)
        if missing:
            raise DropeConfigError(
                f"attention_type={model.config.attention_type!r} needs QK-norm weights the checkpoint "
                f"does not have ({len(missing)} missing, e.g. {missing[0]}); convert it with "
                "`python -m model_patches.convert` to add them initialised to 1"
            )
        return (model, info) if wants_info else model


class DroPELlamaForCausalLM(_DroPEModelMixin, LlamaForCausalLM):
    config_class = DroPELlamaConfig
    _drope_attention = DroPELlamaAttention

    def __init__(self, config: DroPELlamaConfig):
        super().__init__(config)
        self._install_drope_attention(config)


class DroPEQwen2ForCausalLM(_DroPEModelMixin, Qwen2ForCausalLM):
    config_class = DroPEQwen2Config
    _drope_attention = DroPEQwen2Attention

    def __init__(self, config: DroPEQwen2Config):
        super().__init__(config)
        self._install_drope_attention(config)


def register_with_transformers() -> None:
    """Idempotent: makes the Auto classes know llama_drope / qwen2_drope."""
    for config_cls, model_cls in (
        (DroPELlamaConfig, DroPELlamaForCausalLM),
        (DroPEQwen2Config, DroPEQwen2ForCausalLM),
    ):
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)


register_with_transformers()


def load_reference(path: Any, *, dtype: torch.dtype = torch.float32, **config_overrides: Any) -> nn.Module:
    """Load a DroPE (or plain) checkpoint in eval mode, with config.json keys overridden.

    ``load_reference(dir, drope_beta_coef=0.3)`` is the reference twin of
    vLLM's ``hf_overrides``: keys Sakana's files lack (drope_*) are accepted too.
    """
    config = AutoConfig.from_pretrained(path)
    for key, value in config_overrides.items():
        setattr(config, key, value)
    return AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype).eval()


def set_beta(model: nn.Module, coef: float | None = None, mode: str | None = None) -> DropeConfig:
    """Change beta in place on every DroPE attention layer (fit_beta sweeps c without reloading)."""
    new = None
    for module in model.modules():
        if isinstance(module, DroPEAttentionMixin):
            module.drope = module.drope.with_overrides(beta_coef=coef, beta_mode=mode)
            new = module.drope
    if new is None:
        raise TypeError(f"{type(model).__name__} has no DroPE attention layers")
    model.config.drope_beta_coef, model.config.drope_beta_mode = new.beta_coef, new.beta_mode
    return new


def reference_window_nll(model: nn.Module):
    """windows -> summed next-token NLL of each, one forward from position 0 per window.

    The oracle the engine's perplexity (recalibration.perplexity.engine_nll) is tested
    against: the whole window's logits at once, in the model's dtype, on its device.
    """

    @torch.no_grad()
    def nll(windows: list[list[int]]) -> list[float]:
        device = next(model.parameters()).device
        out = []
        for w in windows:
            x = torch.tensor([w], device=device)
            logits = model(x).logits[0, :-1].float()
            out.append(torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item())
        return out

    return nll
