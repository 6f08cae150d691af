"""DroPE Qwen2 / Qwen2.5 for vLLM, written as its difference from DroPE Llama.

vLLM's Qwen2 classes hard-code their attention class, and with RoPE gone a
Qwen2 layer is a Llama layer with a bias on q/k/v and none on o_proj (the same
observation transformers' ``modular_qwen2.py`` is built on). Weight names,
tied embeddings and sliding-window ``layer_types`` are handled by the Llama code.
"""

from __future__ import annotations

from .llama import DroPELlamaAttention, DroPELlamaDecoderLayer, DroPELlamaForCausalLM


class DroPEQwen2Attention(DroPELlamaAttention):
    def __init__(self, config, *args, **kwargs) -> None:
        # Qwen2: qkv_proj has a bias, o_proj has none (its config has no attention_bias key).
        kwargs.update(bias=True, bias_o_proj=False)
        super().__init__(config, *args, **kwargs)


class DroPEQwen2DecoderLayer(DroPELlamaDecoderLayer):
    attention_cls = DroPEQwen2Attention


class DroPEQwen2ForCausalLM(DroPELlamaForCausalLM):
    decoder_layer_cls = DroPEQwen2DecoderLayer
