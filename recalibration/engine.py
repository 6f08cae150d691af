"""The engine the quality tools measure on: vLLM's, from vLLM's own engine arguments, set up as drope-server does.

fit_beta and evaluate take every ``vllm serve`` engine flag under its usual name
(``--tensor-parallel-size``, ``--dtype``, ``--max-model-len``, ``--gpu-memory-utilization``,
``--enforce-eager``, ``--max-num-batched-tokens``, ...) and get drope-server's platform
defaults (``server.config.engine_defaults``: eager, a bounded KV cache and every core
bound to the ranks on CPU), so a model is measured the way it is served, on one device
or several. Two things differ from serving, on purpose:

* prefix caching is off: the keys and values of every layer above the first depend on
  beta, so a cache filled under one c would be read under another;
* the workers carry ``model_patches.worker`` so c can change in place (fit_beta).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
from collections.abc import Iterator
from typing import Any

from model_patches.worker import WORKER_EXTENSION


def add_engine_args(parser: Any) -> None:
    """vLLM's engine arguments (EngineArgs.add_cli_args), with the measurement's defaults."""
    from vllm.engine.arg_utils import EngineArgs

    EngineArgs.add_cli_args(parser)
    notes = {
        "--enforce-eager": "default here, as in drope-server: on on CPU, off on GPU",
        "--max-model-len": "default here: the longest measured length + 1",
        "--enable-prefix-caching": "always off here: cached keys and values depend on beta",
    }
    for action in parser._actions:
        for flag, note in notes.items():
            if flag in action.option_strings:
                action.help = f"{action.help or ''} ({note})"
    # model: the positional CHECKPOINT (or --model); enforce_eager: decided per platform.
    parser.set_defaults(model=None, enforce_eager=None, max_model_len=None, enable_prefix_caching=False)


def engine_parser() -> Any:
    """A bare parser with only vLLM's engine arguments, for building an engine namespace from code."""
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    p = FlexibleArgumentParser()
    add_engine_args(p)
    return p


def engine_namespace(argv: list[str] | None = None) -> argparse.Namespace:
    """``engine_namespace(["--dtype", "float32"])``: the engine arguments a command line would give."""
    return engine_parser().parse_args(argv or [])


def user_max_model_len(args: argparse.Namespace) -> int | None:
    value = getattr(args, "max_model_len", None)
    return value if value is not None and value > 0 else None


@contextlib.contextmanager
def engine(args: argparse.Namespace, model: str, hf_overrides: dict[str, Any], max_model_len: int) -> Iterator[Any]:
    """A vLLM ``LLM`` for ``model`` with the user's engine arguments, our overrides on top; shut down on exit."""
    from vllm import LLM
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms import current_platform

    from server.config import engine_defaults

    ns = argparse.Namespace(**vars(args))
    env = dict(os.environ)
    engine_defaults(ns, on_cpu=current_platform.is_cpu(), environ=env)
    user = ns.hf_overrides if isinstance(ns.hf_overrides, dict) else {}
    ns.model, ns.hf_overrides, ns.max_model_len = model, {**user, **hf_overrides}, max_model_len
    ns.enable_prefix_caching, ns.worker_extension_cls = False, WORKER_EXTENSION
    # The CPU core binding is this engine's (its workers read it when they start), not the
    # calling process's: the next engine may have another number of ranks.
    added = {k: v for k, v in env.items() if os.environ.get(k) != v}
    os.environ.update(added)
    llm = None
    try:
        llm = LLM.from_engine_args(EngineArgs.from_cli_args(ns))
        yield llm
    finally:
        core = getattr(llm.llm_engine, "engine_core", None) if llm is not None else None
        if core is not None:
            core.shutdown()
        del llm
        gc.collect()
        for k in added:
            os.environ.pop(k, None)
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def set_beta(llm: Any, coef: float, mode: str) -> None:
    """c and mode on every worker of a loaded DroPE engine (tensor-parallel ranks included), in place."""
    llm.collective_rpc("set_drope_beta", args=(coef, mode))


def drope_overrides(drope: Any, mode: str, max_model_len: int) -> dict[str, Any]:
    """hf_overrides for a DroPE engine whose c will be set in place.

    The query-scale multiply is built into the model only when c != 0 (a c = 0 model
    serves at vanilla speed), so the engine is built with the checkpoint's c, or 1
    when that is 0; every measurement sets the real c first. Without RoPE the position
    limit is only vLLM's length check, so it is raised to what is measured.
    """
    return {
        "drope_beta_mode": mode,
        "drope_beta_coef": drope.beta_coef or 1.0,
        "max_position_embeddings": max_model_len,
    }


def rope_overrides(base_cfg: dict[str, Any], max_model_len: int) -> dict[str, Any]:
    """The RoPE parent as it is, past its training length: only vLLM's length check is raised
    (the rotary table simply covers more positions; nothing is rescaled)."""
    return {"max_position_embeddings": max(max_model_len, base_cfg.get("max_position_embeddings") or 0)}


def yarn_overrides(
    base_cfg: dict[str, Any], longest: int, original: int | None = None, max_model_len: int | None = None
) -> dict[str, Any]:
    """YaRN scaled so the parent's original context covers ``longest`` (transformers 5's rope_parameters).

    The same ``--hf-overrides`` a user gives drope-server or ``vllm serve`` for a YaRN A/B
    (README), so the baseline measured here is the baseline served. The position limit
    also covers ``max_model_len`` (a longest-token prompt plus the token vLLM generates).
    """
    original = original or base_cfg["max_position_embeddings"]
    factor = max(1.0, longest / original)
    rope = base_cfg.get("rope_parameters") or {}
    theta = rope.get("rope_theta", base_cfg.get("rope_theta", 10000.0))
    return {
        "rope_parameters": {
            "rope_type": "yarn",
            "factor": factor,
            "original_max_position_embeddings": original,
            "rope_theta": theta,
        },
        "max_position_embeddings": max(int(original * factor), longest, max_model_len or 0),
    }
