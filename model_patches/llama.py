"""DroPE Llama for vLLM (Llama-2, SmolLM, SmolLM2): only what differs from vllm/models/llama.py.

* ``_init_rotary_emb`` builds no rotary embedding (and applies ``softmax_scale``);
* optional full-width q / k RMSNorm (``layers.FullWidthRMSNorm``);
* the query of the token at absolute position p is multiplied by beta(p)
  before paged attention. K and V go into the cache unscaled and position-free,
  so chunked prefill and prefix caching stay exact.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from vllm.config import VllmConfig, get_current_vllm_config_or_none
from vllm.logger import init_logger
from vllm.model_executor.models.llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
)

from .beta import apply_query_scale, query_scale_table
from .config import DropeConfig, DropeConfigError
from .layers import FullWidthRMSNorm, full_width_qk_norm

logger = init_logger(__name__)


class DroPELlamaAttention(LlamaAttention):
    def __init__(self, config, *args, **kwargs) -> None:
        self.drope = DropeConfig.from_hf_config(config)
        super().__init__(config, *args, **kwargs)
        d = self.drope
        eps = config.rms_norm_eps
        self.q_norm = FullWidthRMSNorm(self.total_num_heads, self.head_dim, eps) if d.q_norm else None
        self.k_norm = FullWidthRMSNorm(self.total_num_kv_heads, self.head_dim, eps) if d.k_norm else None
        # Fixed when the layer is built, so eager and compiled forwards agree; what beta_table
        # holds may change later (set_beta), its presence may not.
        self.scales_queries = d.scales_queries
        if self.scales_queries:
            vllm_config = get_current_vllm_config_or_none()
            n = max(self.max_position_embeddings, vllm_config.model_config.max_model_len if vllm_config else 0)
            # One table per layer (4 bytes a position: 4 MiB for 32 layers at 32K), so changing one
            # engine's c in place cannot reach another engine built in the same process.
            table = query_scale_table(n, d.train_context, d.beta_coef, d.beta_mode)
            self.register_buffer("beta_table", table, persistent=False)  # [n] float32

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
        q, k = full_width_qk_norm(q, k, self.q_norm, self.k_norm)
        if self.scales_queries:  # static per layer: no branch in the compiled graph
            q = apply_query_scale(q, self.beta_table[positions])
        attn_output = self.attn(q, k, v)
        output, _ = self.o_proj(attn_output)
        return output

    def set_beta(self, coef: float, mode: str | None = None) -> DropeConfig:
        """c (and the mode) changed in place, without rebuilding the layer.

        The new values are copied into ``beta_table``'s storage, which is what the eager
        forward, a torch.compile graph (the buffer is one of its inputs) and a captured
        CUDA graph all read; a Python float would stay baked into the compiled code.
        """
        new = self.drope.with_overrides(beta_coef=coef, beta_mode=mode)
        if not self.scales_queries:
            raise DropeConfigError(
                f"this engine was built without the query scale ({self.drope.describe()}): beta can only "
                "change in place on a model loaded with a nonzero drope_beta_coef and a mode other than none"
            )
        table = query_scale_table(len(self.beta_table), new.train_context, new.beta_coef, new.beta_mode)
        self.beta_table.copy_(table)
        self.drope = new
        return new


def set_beta(model: torch.nn.Module, coef: float, mode: str | None = None) -> DropeConfig:
    """Change c (and mode) in place on every DroPE attention layer of a loaded vLLM model."""
    layers = [m for m in model.modules() if isinstance(m, DroPELlamaAttention)]
    if not layers:
        raise DropeConfigError(f"{type(model).__name__} has no DroPE attention layers")
    for layer in layers:
        new = layer.set_beta(coef, mode)
    return new


class DroPELlamaDecoderLayer(LlamaDecoderLayer):
    def __init__(self, vllm_config: VllmConfig, prefix: str = "", config=None, attn_layer_type=None):
        super().__init__(vllm_config, prefix, config, attn_layer_type or self.attention_cls)

    attention_cls: type[LlamaAttention] = DroPELlamaAttention


class DroPELlamaForCausalLM(LlamaForCausalLM):
    decoder_layer_cls: type[LlamaDecoderLayer] = DroPELlamaDecoderLayer

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", layer_type=None):
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type or self.decoder_layer_cls)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = super().load_weights(skip_unused_norms(weights, DropeConfig.from_hf_config(self.config)))
        check_qk_norm_loaded(self, loaded)
        return loaded


def skip_unused_norms(weights: Iterable[tuple[str, torch.Tensor]], drope: DropeConfig):
    """Drop the norm a q_norm_nope / k_norm_nope checkpoint carries but does not use.

    Sakana's QK-norm attention always builds both ``q_norm`` and ``k_norm`` and only
    the forward decides which it applies, so their q_norm_nope checkpoints hold an
    untrained ``k_norm`` (and vice versa).
    """
    unused = tuple(name for name, used in ((".q_norm.", drope.q_norm), (".k_norm.", drope.k_norm)) if not used)
    skipped = 0
    for name, tensor in weights:
        if unused and any(u in name for u in unused):
            skipped += 1
            continue
        yield name, tensor
    if skipped:
        logger.info(
            "attention_type=%s: ignored %d unused %s weights in the checkpoint",
            drope.attention_type,
            skipped,
            "/".join(u.strip(".") for u in unused),
        )


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
