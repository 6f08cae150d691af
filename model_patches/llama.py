"""DroPE Llama for vLLM (Llama-2, SmolLM, SmolLM2): only what differs from vllm/models/llama.py.

  * ``_init_rotary_emb`` builds no rotary embedding (and applies ``softmax_scale``);
  * optional full-width q / k RMSNorm (``layers.FullWidthRMSNorm``);
  * the query of the token at absolute position p is multiplied by beta(p)
    before paged attention. K and V go into the cache unscaled and position-free,
    so chunked prefill and prefix caching stay exact.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable

import torch
from vllm.config import VllmConfig, get_current_vllm_config_or_none
from vllm.model_executor.models.llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
)

from .beta import apply_query_scale, query_scale_table
from .config import DropeConfig, DropeConfigError
from .layers import FullWidthRMSNorm

logger = logging.getLogger(__name__)


class DroPELlamaAttention(LlamaAttention):
    def __init__(self, config, *args, **kwargs) -> None:
        self.drope = DropeConfig.from_hf_config(config)
        super().__init__(config, *args, **kwargs)
        d = self.drope
        eps = config.rms_norm_eps
        self.q_norm = FullWidthRMSNorm(self.total_num_heads, self.head_dim, eps) if d.q_norm else None
        self.k_norm = FullWidthRMSNorm(self.total_num_kv_heads, self.head_dim, eps) if d.k_norm else None
        if d.scales_queries:
            vllm_config = get_current_vllm_config_or_none()
            n = max(self.max_position_embeddings, vllm_config.model_config.max_model_len if vllm_config else 0)
            self.register_buffer("beta_table", _beta_table(n, d), persistent=False)  # [n] float32

    def _init_rotary_emb(self, config, quant_config) -> None:
        # Upstream calls this after setting self.scaling and before building
        # self.attn, which takes the scale: the one place a constant
        # softmax_scale can reach the kernel without re-building the layer.
        self.rotary_emb = None
        if self.drope.softmax_scale is not None:
            self.scaling = self.drope.softmax_scale

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        # positions: [T] absolute token positions; hidden_states: [T, hidden]
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.k_norm is not None:
            k = self.k_norm(k)
        d = self.drope
        if d.scales_queries:  # static per model: no branch in the compiled graph
            q = apply_query_scale(q, self.beta_table[positions])
        attn_output = self.attn(q, k, v)
        output, _ = self.o_proj(attn_output)
        return output


@functools.lru_cache(maxsize=8)
def _beta_table_cached(n: int, drope: DropeConfig, device: str) -> torch.Tensor:
    return query_scale_table(n, drope.train_context, drope.beta_coef, drope.beta_mode)


def _beta_table(n: int, drope: DropeConfig) -> torch.Tensor:
    # One table shared by all layers (vLLM builds the model under the target
    # default device, so the table lands where the layers do).
    return _beta_table_cached(n, drope, str(torch.get_default_device()))


class DroPELlamaDecoderLayer(LlamaDecoderLayer):
    def __init__(self, vllm_config: VllmConfig, prefix: str = "", config=None, attn_layer_type=None):
        super().__init__(vllm_config, prefix, config, attn_layer_type or self.attention_cls)

    attention_cls: type[LlamaAttention] = DroPELlamaAttention


class DroPELlamaForCausalLM(LlamaForCausalLM):
    decoder_layer_cls: type[LlamaDecoderLayer] = DroPELlamaDecoderLayer

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", layer_type=None):
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type or self.decoder_layer_cls)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = super().load_weights(drop_unused_qk_norms(weights, DropeConfig.from_hf_config(self.config)))
        check_qk_norm_loaded(self, loaded)
        return loaded


def drop_unused_qk_norms(weights: Iterable[tuple[str, torch.Tensor]], drope: DropeConfig):
    unused = drope.unused_qk_norm_weights
    skipped = 0
    for name, tensor in weights:
        if unused and name.endswith(unused):
            skipped += 1
            continue
        yield name, tensor
    if skipped:
        logger.warning("attention_type=%r: ignored %d unused QK-norm weights (%s) in the checkpoint",
                       drope.attention_type, skipped, ", ".join(unused))


def check_qk_norm_loaded(model: torch.nn.Module, loaded: set[str]) -> None:
    """Name the real problem before vLLM's generic 'weights not initialized' does."""
    needed = {n for n, _ in model.named_parameters() if ".q_norm." in n or ".k_norm." in n}
    missing = sorted(needed - loaded)
    if missing:
        attention_type = model.config.attention_type
        raise DropeConfigError(
            f"attention_type={attention_type!r} needs QK-norm weights the checkpoint does not "
            f"have ({len(missing)} missing, e.g. {missing[0]}); convert it with "
            "`python -m model_patches.convert` to add them initialised to 1"
        )
