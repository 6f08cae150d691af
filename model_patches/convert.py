"""Turn a plain Llama / Qwen2 checkpoint into a DroPE checkpoint.

    python -m model_patches.convert SRC DST [--attention-type nope|qk_norm_nope|q_norm_nope|k_norm_nope]
                                            [--train-context N] [--beta-coef C] [--beta-mode log|floor|none]
                                            [--overwrite]

The weights are not touched: safetensors shards are copied byte for byte, and
QK-norm variants get one extra shard holding q_norm / k_norm weights set to 1
(the identity at initialisation, which recalibration then trains). config.json
is rewritten to Sakana's format plus our drope_* fields; tokenizer, chat
template and generation config are copied. The output is written next to DST
and renamed into place, so an interrupted conversion leaves nothing half-made.
Without recalibration the converted model is *not* a good language model: it
is the starting point of ``python -m recalibration.run``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from .config import (
    ATTENTION_TYPES,
    BETA_MODES,
    FAMILIES,
    PARENT_TO_DROPE,
    DropeConfig,
    DropeConfigError,
    read_config_json,
)

INDEX = "model.safetensors.index.json"
NORM_SHARD = "drope-qk-norm.safetensors"
SINGLE = "model.safetensors"


def convert(
    src: str | Path,
    dst: str | Path,
    *,
    attention_type: str = "nope",
    train_context: int | None = None,
    beta_coef: float = 0.0,
    beta_mode: str = "log",
    overwrite: bool = False,
) -> DropeConfig:
    src, dst = Path(src), Path(dst)
    cfg = read_config_json(src)
    parent = cfg.get("model_type")
    if parent in FAMILIES:
        raise DropeConfigError(f"{src} is already a DroPE checkpoint (model_type {parent!r})")
    if parent not in PARENT_TO_DROPE:
        raise DropeConfigError(
            f"model_type {parent!r} is not supported; expected one of {', '.join(sorted(PARENT_TO_DROPE))}"
        )
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise FileExistsError(f"{dst} exists and is not empty; pass --overwrite to replace it")
    drope = DropeConfig(
        train_context=train_context if train_context is not None else cfg.get("max_position_embeddings"),
        beta_coef=beta_coef,
        beta_mode=beta_mode,
        attention_type=attention_type,
    )
    weights = _weight_map(src)
    adds_norms = drope.q_norm or drope.k_norm
    # transformers reads a lone model.safetensors and ignores any index beside it,
    # so a single-file parent that gains a norm shard becomes a 2-shard checkpoint.
    renames = {}
    if adds_norms and set(weights.values()) == {SINGLE}:
        renames = {SINGLE: "model-00001-of-00002.safetensors"}
    norm_shard = "model-00002-of-00002.safetensors" if renames else NORM_SHARD

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        for f in src.iterdir():
            if f.is_file() and f.name not in ("config.json", INDEX):
                shutil.copy2(f, tmp / renames.get(f.name, f.name))
        if adds_norms:
            weights = {k: renames.get(v, v) for k, v in weights.items()}
            weights.update(_write_norm_shard(tmp / norm_shard, cfg, drope, weights, tmp))
            total = sum((tmp / s).stat().st_size for s in set(weights.values()))
            (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weights}, indent=2))
        elif (src / INDEX).exists():
            shutil.copy2(src / INDEX, tmp / INDEX)
        model_type = PARENT_TO_DROPE[parent]
        cfg.update(model_type=model_type, architectures=[FAMILIES[model_type][0]], **drope.to_hf_fields())
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        if dst.exists():
            shutil.rmtree(dst)
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return drope


def _weight_map(src: Path) -> dict[str, str]:
    """tensor name -> shard file, for a single-file or sharded safetensors checkpoint."""
    from safetensors import safe_open

    if (src / INDEX).exists():
        return dict(json.loads((src / INDEX).read_text())["weight_map"])
    shards = sorted(src.glob("*.safetensors"))
    if not shards:
        raise DropeConfigError(
            f"no safetensors weights in {src} (.bin checkpoints: re-save them with save_pretrained first)"
        )
    out = {}
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            out.update({k: shard.name for k in f.keys()})
    return out


def _write_norm_shard(path: Path, cfg: dict, drope: DropeConfig, weights: dict[str, str], src: Path) -> dict[str, str]:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    # Match the checkpoint's dtype so the shard loads like the rest.
    probe = next(k for k in weights if k.endswith("q_proj.weight"))
    with safe_open(str(src / weights[probe]), "pt") as f:
        dtype = f.get_slice(probe).get_dtype()
    dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(dtype, torch.float32)
    tensors = {}
    for i in range(cfg["num_hidden_layers"]):
        if drope.q_norm:
            tensors[f"model.layers.{i}.self_attn.q_norm.weight"] = torch.ones(
                cfg["num_attention_heads"] * head_dim, dtype=dtype
            )
        if drope.k_norm:
            tensors[f"model.layers.{i}.self_attn.k_norm.weight"] = torch.ones(kv_heads * head_dim, dtype=dtype)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return {k: path.name for k in tensors}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m model_patches.convert",
        description="Convert a plain Llama / Qwen2 HF checkpoint (safetensors) into a DroPE checkpoint.",
    )
    p.add_argument("src", help="directory of the RoPE parent checkpoint")
    p.add_argument("dst", help="output directory (refused if it exists and is not empty, unless --overwrite)")
    p.add_argument(
        "--attention-type",
        default="nope",
        choices=ATTENTION_TYPES,
        help="DroPE attention variant; QK-norm variants add norm weights initialised to 1 (default: nope)",
    )
    p.add_argument(
        "--train-context",
        type=int,
        default=None,
        help="L_train in tokens: beta is 1 up to this length (default: the parent's max_position_embeddings)",
    )
    p.add_argument(
        "--beta-coef",
        type=float,
        default=0.0,
        help="c in beta = 1 + c ln(length / L_train); fit it later with recalibration.fit_beta (default: 0)",
    )
    p.add_argument("--beta-mode", default="log", choices=BETA_MODES, help="beta formula (default: log)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        drope = convert(
            args.src,
            args.dst,
            attention_type=args.attention_type,
            train_context=args.train_context,
            beta_coef=args.beta_coef,
            beta_mode=args.beta_mode,
            overwrite=args.overwrite,
        )
    except (DropeConfigError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote DroPE checkpoint {args.dst}: {drope.describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
