"""Recalibration config: typed dataclasses validated on construction, presets as plain functions.

A run is fully described by one ``RecalibConfig``; ``run.py`` saves it as
``recalib_config.json`` beside the outputs, and ``--resume`` refuses an output
directory whose saved config describes a different run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

from model_patches.config import ATTENTION_TYPES


class RecalibConfigError(ValueError):
    pass


def doc(help: str, *, flag: bool | str = False, **argparse_kw: Any) -> dict[str, Any]:
    """Field metadata: its help text and, with flag, a command-line option of its own (the field name in
    kebab-case, or the given name). run.py builds the CLI from these, so each option is defined once, here."""
    return {"help": help, "flag": flag, **argparse_kw}


@dataclass(frozen=True)
class DataConfig:
    source: str = field(
        default="",
        metadata=doc(
            "text/.md file or directory, .jsonl, .parquet, builtin:essays or a Hugging Face datasets name", flag="data"
        ),
    )
    text_field: str = field(default="text", metadata=doc("the text column of .jsonl / .parquet / hub sources"))
    split: str = field(default="train", metadata=doc("split of a hub dataset"))
    heldout_docs: int = field(
        default=2, metadata=doc("the first N documents of the source (in reading order) are held out for evaluation")
    )
    shuffle_buffer: int = field(
        default=0,
        metadata=doc(
            "documents shuffled within consecutive seeded windows of this many, a new order each epoch (0: file order)"
        ),
    )

    def __post_init__(self) -> None:
        if not self.source:
            raise RecalibConfigError("data.source is required: a text/jsonl/parquet path or a datasets name")
        if self.heldout_docs < 1:
            raise RecalibConfigError("data.heldout_docs must be >= 1 (perplexity needs held-out text)")


@dataclass(frozen=True)
class OptimConfig:
    lr: float | None = field(
        default=None,
        metadata=doc("peak learning rate (default: 1e-3 with QK-norm, 3e-4 without, as in the paper)", flag="lr"),
    )
    betas: tuple[float, float] = field(default=(0.9, 0.95), metadata=doc("AdamW betas"))
    weight_decay: float = field(default=0.1, metadata=doc("AdamW weight decay"))
    warmup_ratio: float = field(default=0.05, metadata=doc("warmup steps as a fraction of all steps"))
    schedule: str = field(default="cosine", metadata=doc("cosine, linear or constant_with_warmup"))
    grad_clip: float = field(default=1.0, metadata=doc("gradient norm clip"))

    def __post_init__(self) -> None:
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise RecalibConfigError(f"optim.lr must be positive, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise RecalibConfigError(f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.schedule not in ("cosine", "linear", "constant_with_warmup"):
            raise RecalibConfigError(f"optim.schedule {self.schedule!r}: cosine, linear or constant_with_warmup")


@dataclass(frozen=True)
class RecalibConfig:
    base: str = field(
        default="",
        metadata=doc(
            "pretrained RoPE checkpoint: directory or hub id (or an already-converted DroPE checkpoint)", flag=True
        ),
    )
    output_dir: str = field(default="", metadata=doc("where checkpoints, logs and final/ go", flag=True))
    attention_type: str = field(
        default="nope", metadata=doc(f"DroPE attention: {', '.join(ATTENTION_TYPES)}", flag=True)
    )
    keep_rope: bool = field(
        default=False,
        metadata=doc(
            "train the base as it is, RoPE kept (pretraining a RoPE parent, e.g. the micro experiment's); "
            "final/ is then a plain checkpoint of the base's family, not DroPE",
            flag=True,
        ),
    )
    seq_len: int | None = field(
        default=None,
        metadata=doc("training length in tokens (default: the base's context, max_position_embeddings)", flag=True),
    )
    max_steps: int | None = field(default=None, metadata=doc("optimizer steps", flag=True))
    token_budget: int | None = field(
        default=None,
        metadata=doc(
            "training tokens over all ranks, instead of --max-steps (steps = budget / global tokens per step)",
            flag=True,
        ),
    )
    micro_batch: int = field(default=1, metadata=doc("sequences per rank per micro-step", flag=True))
    grad_accum: int = field(default=1, metadata=doc("micro-steps per optimizer step", flag=True))
    precision: str = field(
        default="auto",
        metadata=doc(
            "auto (bf16 on GPU, fp32 on CPU), fp32 or bf16; bf16 computes in bf16 and keeps fp32 master weights",
            flag=True,
        ),
    )
    seed: int = field(default=0, metadata=doc("seed of the model's training and of the data shuffle", flag=True))
    save_every: int = field(default=50, metadata=doc("checkpoint interval in optimizer steps", flag=True))
    save_total_limit: int = field(default=2, metadata=doc("checkpoints kept"))
    eval_every: int = field(default=0, metadata=doc("held-out loss every N steps (0: only at the start and end)"))
    eval_batches: int = field(
        default=4,
        metadata=doc("held-out batches of micro_batch x ranks sequences (the same sequences for any number of ranks)"),
    )
    log_every: int = field(default=10, metadata=doc("log interval in optimizer steps"))
    fsdp: bool = field(
        default=False,
        metadata=doc(
            "shard parameters, gradients and optimizer state over the ranks (FSDP2, on CPU and GPU alike); "
            "on by itself under an accelerate FSDP config (recalibration/fsdp.yaml)",
            flag=True,
        ),
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata=doc("recompute each decoder layer's activations in the backward pass (memory for compute)"),
    )
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        if not self.base:
            raise RecalibConfigError("base is required: a RoPE checkpoint directory or hub id")
        if not self.output_dir:
            raise RecalibConfigError("output_dir is required")
        if self.attention_type not in ATTENTION_TYPES:
            raise RecalibConfigError(
                f"unknown attention type {self.attention_type!r}; expected one of {', '.join(ATTENTION_TYPES)}"
            )
        if self.keep_rope and self.attention_type != "nope":
            raise RecalibConfigError(
                f"keep_rope trains the base as it is; attention_type {self.attention_type!r} "
                "applies to a DroPE conversion"
            )
        if (self.max_steps is None) == (self.token_budget is None):
            raise RecalibConfigError("give exactly one of max_steps or token_budget")
        for name in ("micro_batch", "grad_accum", "save_every", "eval_batches", "log_every"):
            if getattr(self, name) < 1:
                raise RecalibConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len is not None and self.seq_len < 8:
            raise RecalibConfigError(f"seq_len must be >= 8, got {self.seq_len}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise RecalibConfigError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")

    @property
    def qk_norm(self) -> bool:
        return self.attention_type != "nope"

    @property
    def lr(self) -> float:
        return self.optim.lr if self.optim.lr is not None else (1e-3 if self.qk_norm else 3e-4)

    def steps(self, seq_len: int, world_size: int = 1) -> int:
        """Optimizer steps; with token_budget, every step trains world_size ranks' batches."""
        if self.max_steps is not None:
            return self.max_steps
        return max(1, self.token_budget // self.tokens_per_step(seq_len, world_size))

    def tokens_per_step(self, seq_len: int, world_size: int = 1) -> int:
        return seq_len * self.micro_batch * self.grad_accum * world_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RecalibConfig:
        d = dict(d)
        data = DataConfig(**d.pop("data", {}))
        optim = d.pop("optim", {})
        if "betas" in optim:
            optim = {**optim, "betas": tuple(optim["betas"])}
        return cls(**d, data=data, optim=OptimConfig(**optim))

    def with_overrides(self, overrides: dict[str, Any]) -> RecalibConfig:
        """Dotted keys: {"optim.lr": 1e-4, "data.source": "x.txt", "max_steps": 10}."""
        top, sub = {}, {"data": {}, "optim": {}}
        for k, v in overrides.items():
            if v is None:
                continue
            head, _, rest = k.partition(".")
            if rest:
                if head not in sub or rest not in {
                    f.name for f in fields(DataConfig if head == "data" else OptimConfig)
                }:
                    raise RecalibConfigError(f"unknown setting {k!r}")
                sub[head][rest] = v
            else:
                if k not in {f.name for f in fields(RecalibConfig)}:
                    raise RecalibConfigError(f"unknown setting {k!r}")
                top[k] = v
        # Validation of every field runs again in the constructors.
        d = self.to_dict()
        d.update(top)
        d["data"] = {**d["data"], **sub["data"]}
        d["optim"] = {**d["optim"], **sub["optim"]}
        if top.get("max_steps") is not None and "token_budget" not in top:
            d["token_budget"] = None
        if top.get("token_budget") is not None and "max_steps" not in top:
            d["max_steps"] = None
        return RecalibConfig.from_dict(d)


def cli_flags() -> list[tuple[str, str, Any, dict[str, Any]]]:
    """(option name, dotted config key, type, metadata) of every field with a command-line option of its own."""
    out = []
    for prefix, cls in (("", RecalibConfig), ("data.", DataConfig), ("optim.", OptimConfig)):
        hints = get_type_hints(cls)
        for f in fields(cls):
            if flag := f.metadata.get("flag"):
                out.append(
                    (
                        f.name if flag is True else flag,
                        prefix + f.name,
                        hints[f.name],
                        {k: v for k, v in f.metadata.items() if k != "flag"},
                    )
                )
    return out


# ---------------- presets: plain functions returning a config ----------------


def tiny(output_dir: str = "runs/tiny", base: str = "", source: str = "") -> RecalibConfig:
    """CPU, minutes: a small random RoPE Llama (built on the fly when base is empty) on real prose."""
    return RecalibConfig(
        base=base or "tiny",
        output_dir=output_dir,
        attention_type="nope",
        seq_len=128,
        max_steps=60,
        micro_batch=4,
        grad_accum=1,
        precision="fp32",
        save_every=20,
        eval_every=20,
        log_every=5,
        data=DataConfig(source=source or "builtin:essays"),
        optim=OptimConfig(lr=1e-3, warmup_ratio=0.1),
    )


def smollm2_135m(output_dir: str = "runs/smollm2-135m", base: str = "", source: str = "") -> RecalibConfig:
    """CPU-feasible: the packaged SmolLM2-135M at 512 tokens (measured: ~5.7 s a step, ~175 tokens/s, on 2 cores)."""
    return RecalibConfig(
        base=base or "smollm2-135m-instruct",
        output_dir=output_dir,
        attention_type="nope",
        seq_len=512,
        max_steps=200,
        micro_batch=2,
        grad_accum=1,
        precision="fp32",
        save_every=25,
        eval_every=50,
        data=DataConfig(source=source or "builtin:essays"),
        optim=OptimConfig(lr=3e-4, warmup_ratio=0.05),
    )


def smollm_360m_gpu(output_dir: str = "runs/smollm-360m-drope", base: str = "", source: str = "") -> RecalibConfig:
    """GPU, paper-like: SmolLM-360M, QK-norm, L=2048, ~2B tokens (~3% of its 600B pretraining), lr 1e-3."""
    return RecalibConfig(
        base=base or "HuggingFaceTB/SmolLM-360M",
        output_dir=output_dir,
        attention_type="qk_norm_nope",
        seq_len=2048,
        token_budget=2_000_000_000,
        micro_batch=16,
        grad_accum=4,
        precision="bf16",
        save_every=500,
        eval_every=500,
        data=DataConfig(source=source or "HuggingFaceFW/fineweb-edu", shuffle_buffer=10_000),
        optim=OptimConfig(lr=1e-3, warmup_ratio=0.01),
    )


def llama2_7b_gpu(output_dir: str = "runs/llama2-7b-drope", base: str = "", source: str = "") -> RecalibConfig:
    """Multi-GPU (FSDP, activation checkpointing), paper-like: Llama-2-7B, QK-norm, L=4096, ~20B tokens (~1% of 2T),
    lr 1e-3. ``--dry-run 8`` prints its sharding plan and memory per rank."""
    return RecalibConfig(
        base=base or "meta-llama/Llama-2-7b-hf",
        output_dir=output_dir,
        attention_type="qk_norm_nope",
        seq_len=4096,
        token_budget=20_000_000_000,
        micro_batch=2,
        grad_accum=8,
        precision="bf16",
        save_every=500,
        eval_every=1000,
        fsdp=True,
        gradient_checkpointing=True,
        data=DataConfig(source=source or "HuggingFaceFW/fineweb-edu", shuffle_buffer=10_000),
        optim=OptimConfig(lr=1e-3, warmup_ratio=0.01),
    )


# The micro long-context experiment (benchmarks/long_context.py builds the base and the data):
# a 2-layer Llama pretrained with RoPE on an associative-recall task at L = 128, then made DroPE
# with 20% of the pretraining steps, and a NoPE-from-scratch control with the same total. Settled on
# 1x accuracy of a pilot seed (BENCHMARKS.md); nothing here was chosen on the long lengths reported.
MICRO_STEPS = 1500
MICRO_ATTENTION = "qk_norm_nope"  # settled on the pilot's 1x accuracy
MICRO_RECAL_STEPS = 300


def _micro(output_dir: str, base: str, source: str, what: str, **kw: Any) -> RecalibConfig:
    if not (base and source):
        raise RecalibConfigError(f"the {what} preset needs --base and --data (benchmarks/long_context.py makes them)")
    fixed = dict(
        seq_len=128,
        micro_batch=32,
        grad_accum=1,
        precision="fp32",
        save_every=500,
        save_total_limit=1,
        eval_every=0,
        eval_batches=4,
        log_every=100,
    )
    return RecalibConfig(
        base=base, output_dir=output_dir, data=DataConfig(source=source, heldout_docs=64), **{**fixed, **kw}
    )


def micro_rope(output_dir: str = "runs/micro-rope", base: str = "", source: str = "") -> RecalibConfig:
    """The micro experiment's RoPE parent: pretraining from a random init, RoPE kept, lr 2e-3."""
    return _micro(
        output_dir,
        base,
        source,
        "micro-rope",
        keep_rope=True,
        max_steps=MICRO_STEPS,
        optim=OptimConfig(lr=2e-3, warmup_ratio=0.05),
    )


def micro_drope(output_dir: str = "runs/micro-drope", base: str = "", source: str = "") -> RecalibConfig:
    """DroPE from the micro RoPE parent: RoPE dropped, recalibrated for 20% of its pretraining steps."""
    return _micro(
        output_dir,
        base,
        source,
        "micro-drope",
        attention_type=MICRO_ATTENTION,
        max_steps=MICRO_RECAL_STEPS,
        optim=OptimConfig(lr=1e-3, warmup_ratio=0.1),
    )


def micro_nope(output_dir: str = "runs/micro-nope", base: str = "", source: str = "") -> RecalibConfig:
    """The control: NoPE from the same random init, as many steps as the parent and its recalibration together."""
    return _micro(
        output_dir,
        base,
        source,
        "micro-nope",
        attention_type=MICRO_ATTENTION,
        max_steps=MICRO_STEPS + MICRO_RECAL_STEPS,
        optim=OptimConfig(lr=2e-3, warmup_ratio=0.05),
    )


PRESETS: dict[str, Callable[..., RecalibConfig]] = {
    "tiny": tiny,
    "smollm2-135m": smollm2_135m,
    "smollm-360m-gpu": smollm_360m_gpu,
    "llama2-7b-gpu": llama2_7b_gpu,
    "micro-rope": micro_rope,
    "micro-drope": micro_drope,
    "micro-nope": micro_nope,
}


def preset(name: str, **kw: Any) -> RecalibConfig:
    if name not in PRESETS:
        raise RecalibConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name](**kw)


__all__ = ["RecalibConfig", "DataConfig", "OptimConfig", "RecalibConfigError", "PRESETS", "preset", "cli_flags"]
