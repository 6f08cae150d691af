"""Tiny, random-weight Llama / Qwen2 checkpoints (RoPE or DroPE) for tests and benchmarks.

Everything is built locally: a byte-level tokenizer (256 byte tokens + 3
specials, no merges, so any text round-trips and token count = UTF-8 bytes) and seeded random weights. head_dim
is 32 or 64 because vLLM's CPU attention kernel rejects other small sizes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .config import FAMILIES, PARENT_TO_DROPE, DropeConfig

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|bos|>{{ m['role'] }}\n{{ m['content'] }}<|eos|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}"
)


def save_byte_tokenizer(out_dir: str | Path) -> Any:
    """Write a byte-level fast tokenizer (ids 0-255 = the 256 bytes, then BOS/EOS/PAD)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for tok in (BOS, EOS, PAD):
        vocab[tok] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        model_max_length=1 << 20,
    )
    fast.save_pretrained(str(out_dir))
    return fast


def tiny_config_dict(
    family: str = "llama",
    *,
    drope: DropeConfig | None = None,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_position_embeddings: int = 2048,
    vocab_size: int = 320,
    tie_word_embeddings: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    """config.json contents; ``drope=None`` gives the plain RoPE parent; ``extra`` keys go in as they are
    (e.g. Qwen2's ``use_sliding_window``, ``sliding_window``, ``max_window_layers``)."""
    if family not in PARENT_TO_DROPE:
        raise ValueError(f"family must be one of {sorted(PARENT_TO_DROPE)}, got {family!r}")
    model_type = family
    arch = "LlamaForCausalLM" if family == "llama" else "Qwen2ForCausalLM"
    cfg: dict[str, Any] = dict(
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        vocab_size=vocab_size,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=257,
        eos_token_id=257 + 1,
        pad_token_id=257 + 2,
        torch_dtype="float32",
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    if drope is not None:
        model_type = PARENT_TO_DROPE[family]
        arch = FAMILIES[model_type][0]
        cfg.update(drope.to_hf_fields())
    cfg.update(model_type=model_type, architectures=[arch], **extra)
    return cfg


def build_tiny_checkpoint(
    out_dir: str | Path,
    family: str = "llama",
    *,
    drope: DropeConfig | None = None,
    seed: int = 0,
    qk_norm_noise: float = 0.3,
    init_std: float = 0.1,
    tokenizer: Any = None,
    **config_kwargs: Any,
) -> Path:
    """Write a random-weight checkpoint + tokenizer to ``out_dir``.

    QK-norm weights are drawn around 1 (``qk_norm_noise``) rather than left at 1,
    so a test that loads them wrongly (unsharded, transposed, ignored) fails.
    ``init_std`` 0.1 (sharper attention, so position and beta effects show in the
    logits of a 2-layer model) suits parity tests; a model that will be trained
    from scratch wants the usual 0.02. ``tokenizer`` (a fast tokenizer) replaces the
    byte-level one; its special-token ids should then be passed as config keys.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from . import reference  # noqa: F401  (registers llama_drope / qwen2_drope)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg_dict = tiny_config_dict(family, drope=drope, **config_kwargs)
    config = AutoConfig.for_model(**cfg_dict)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.copy_(1.0 + qk_norm_noise * torch.randn_like(p))
            elif p.dim() >= 2:
                p.normal_(0.0, init_std)
    model.save_pretrained(str(out))
    if tokenizer is None:
        save_byte_tokenizer(out)
    else:
        tokenizer.save_pretrained(str(out))
    # save_pretrained writes transformers' view of the config; keep exactly ours too
    # (e.g. keys Sakana's format has that our class does not declare).
    on_disk = json.loads((out / "config.json").read_text())
    on_disk.update(cfg_dict)
    (out / "config.json").write_text(json.dumps(on_disk, indent=2))
    return out
