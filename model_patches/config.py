"""The one meaning of a DroPE checkpoint, shared by vLLM, the reference, recalibration and the server.

A DroPE checkpoint is a plain Llama / Qwen2 checkpoint whose ``config.json`` says
how attention works without RoPE. We read Sakana's published format unchanged
(``model_type`` ``llama_drope`` / ``qwen2_drope``, ``attention_type``, optional
``softmax_scale``, an ignored ``auto_map``) plus three fields of our own:

==========================  =====================================================
``drope_train_context``     tokens the model was (re)calibrated at, ``L_train``.
                            Absent: ``max_position_embeddings`` (Sakana's
                            checkpoints keep their parent's value, which is the
                            length they were recalibrated at).
``drope_beta_coef``         ``c`` in ``beta = 1 + c ln(s)``; absent: 0 (no scaling).
``drope_beta_mode``         ``log`` (the paper's, per token), ``floor`` (vLLM's
                            Llama-4 NoPE variant) or ``none``; absent: ``log``.
==========================  =====================================================

No torch, no vLLM here: this module is imported by every process and by tools
that never load a model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

ATTENTION_TYPES = ("nope", "qk_norm_nope", "q_norm_nope", "k_norm_nope")
BETA_MODES = ("log", "floor", "none")

# model_type -> (architecture, parent model_type). The parent is what a DroPE
# checkpoint is made from and what the RoPE side of an A/B comparison serves.
FAMILIES = {
    "llama_drope": ("DroPELlamaForCausalLM", "llama"),
    "qwen2_drope": ("DroPEQwen2ForCausalLM", "qwen2"),
}
PARENT_TO_DROPE = {parent: drope for drope, (_, parent) in FAMILIES.items()}
DROPE_ARCHITECTURES = tuple(arch for arch, _ in FAMILIES.values())

# Keys we own in config.json.
TRAIN_CONTEXT_KEY = "drope_train_context"
BETA_COEF_KEY = "drope_beta_coef"
BETA_MODE_KEY = "drope_beta_mode"

# Serving default: a DroPE model is served up to this multiple of L_train (the
# paper's 2x-8x range), lowered to what the KV cache holds.
DEFAULT_CONTEXT_MULTIPLE = 8


class DropeConfigError(ValueError):
    """A DroPE checkpoint or override that cannot be served as written."""


@dataclass(frozen=True)
class DropeConfig:
    """How attention works in a DroPE model. Validated on construction."""

    train_context: int
    """L_train: the length (tokens) the model was recalibrated at; beta = 1 up to it."""
    beta_coef: float = 0.0
    """c in beta(s) = 1 + c ln(s), s = (p + 1) / L_train. 0 turns scaling off."""
    beta_mode: str = "log"
    """'log' (paper, per token), 'floor' (vLLM Llama-4 NoPE variant) or 'none'."""
    attention_type: str = "nope"
    """Sakana's variants: nope, qk_norm_nope, q_norm_nope, k_norm_nope."""
    softmax_scale: float | None = None
    """Constant attention-logit scale replacing 1/sqrt(head_dim) (Sakana's field)."""

    def __post_init__(self) -> None:
        if self.attention_type not in ATTENTION_TYPES:
            raise DropeConfigError(
                f"unknown attention_type {self.attention_type!r}; expected one of {', '.join(ATTENTION_TYPES)}"
            )
        if isinstance(self.train_context, bool) or not isinstance(self.train_context, int) or self.train_context <= 0:
            raise DropeConfigError(
                f"training context ({TRAIN_CONTEXT_KEY} or max_position_embeddings) "
                f"must be a positive integer, got {self.train_context!r}"
            )
        if not _is_finite_number(self.beta_coef):
            raise DropeConfigError(f"{BETA_COEF_KEY} must be a finite number, got {self.beta_coef!r}")
        if self.beta_mode not in BETA_MODES:
            raise DropeConfigError(
                f"unknown {BETA_MODE_KEY} {self.beta_mode!r}; expected one of {', '.join(BETA_MODES)}"
            )
        if self.softmax_scale is not None and not (_is_finite_number(self.softmax_scale) and self.softmax_scale > 0):
            raise DropeConfigError(f"softmax_scale must be a positive finite number, got {self.softmax_scale!r}")

    @property
    def q_norm(self) -> bool:
        return self.attention_type in ("qk_norm_nope", "q_norm_nope")

    @property
    def k_norm(self) -> bool:
        return self.attention_type in ("qk_norm_nope", "k_norm_nope")

    @property
    def scales_queries(self) -> bool:
        """False when beta is identically 1, so the per-token multiply can be skipped."""
        return self.beta_mode != "none" and self.beta_coef != 0.0

    @classmethod
    def from_hf_config(cls, hf_config: Any, **overrides: Any) -> DropeConfig:
        """Parse a transformers config object or a ``config.json`` dict.

        ``overrides`` (train_context, beta_coef, beta_mode) win over the file;
        ``None`` values are ignored so CLI flags can be passed straight through.
        """
        get = (
            hf_config.get
            if isinstance(hf_config, Mapping)
            else (lambda key, default=None: getattr(hf_config, key, default))
        )
        fields = dict(
            train_context=train_context_of(hf_config),
            beta_coef=get(BETA_COEF_KEY, 0.0),
            beta_mode=get(BETA_MODE_KEY, "log"),
            attention_type=get("attention_type", "nope"),
            softmax_scale=get("softmax_scale"),
        )
        fields.update({k: v for k, v in overrides.items() if v is not None})
        if fields["train_context"] is None:
            raise DropeConfigError(
                f"config states no training context: set {TRAIN_CONTEXT_KEY} "
                "(or max_position_embeddings), or pass train_context explicitly"
            )
        return cls(**fields)

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides: Any) -> DropeConfig:
        return cls.from_hf_config(read_config_json(path), **overrides)

    def to_hf_fields(self) -> dict[str, Any]:
        """The config.json keys that carry this config (Sakana's names where they exist)."""
        out = {
            "attention_type": self.attention_type,
            TRAIN_CONTEXT_KEY: self.train_context,
            BETA_COEF_KEY: self.beta_coef,
            BETA_MODE_KEY: self.beta_mode,
        }
        if self.softmax_scale is not None:
            out["softmax_scale"] = self.softmax_scale
        return out

    def with_overrides(self, **overrides: Any) -> DropeConfig:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def describe(self) -> str:
        return (
            f"L_train={self.train_context} attention={self.attention_type} "
            f"beta={self.beta_mode}(c={self.beta_coef:g})"
            + (f" softmax_scale={self.softmax_scale:g}" if self.softmax_scale else "")
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def train_context_of(hf_config: Any) -> int | None:
    """L_train as a checkpoint states it: ``drope_train_context``, else ``max_position_embeddings``.

    The one rule, used by the config classes (which pin it when a config is built, before
    anything can raise the position limit), the server and the quality tools. Sakana's
    checkpoints carry no ``drope_train_context``: their ``max_position_embeddings`` is
    their parent's, the length they were recalibrated at.
    """
    get = (
        hf_config.get
        if isinstance(hf_config, Mapping)
        else (lambda key, default=None: getattr(hf_config, key, default))
    )
    stated = get(TRAIN_CONTEXT_KEY)
    return stated if stated is not None else get("max_position_embeddings")


def with_pinned_train_context(file: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """config.json fields with ``overrides`` applied, L_train decided by the file unless stated in the overrides.

    An override of ``max_position_embeddings`` (how vLLM serves past it) never moves L_train.
    """
    return {**file, **overrides, TRAIN_CONTEXT_KEY: overrides.get(TRAIN_CONTEXT_KEY, train_context_of(file))}


def is_drope_config(hf_config: Any) -> bool:
    """True for checkpoints our DroPE classes serve (by model_type or architecture)."""
    get = (
        hf_config.get
        if isinstance(hf_config, Mapping)
        else (lambda key, default=None: getattr(hf_config, key, default))
    )
    archs = get("architectures") or []
    return get("model_type") in FAMILIES or any(a in DROPE_ARCHITECTURES for a in archs)


def read_config_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise DropeConfigError(f"no config.json at {file}") from None
    except json.JSONDecodeError as e:
        raise DropeConfigError(f"{file} is not valid JSON: {e}") from None


VLLM_EXTRAS = "pip install 'drope-server[cpu]' (vLLM's CPU build) or 'drope-server[gpu]' (CUDA)"


def require_vllm(what: str) -> None:
    """Fail with the install line when vLLM, which comes only with an extra, is missing."""
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        raise ImportError(f"{what} runs on vLLM, which is not installed here ({e}): {VLLM_EXTRAS}") from None


def _is_finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
