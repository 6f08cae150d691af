"""vLLM general plugin: runs in every vLLM process (engine core, workers), maybe several times.

Registered as the ``vllm.general_plugins`` entry point ``drope`` in pyproject.toml.
It only *adds* architectures: plain Llama / Qwen2 checkpoints keep vLLM's own classes.
"""

from __future__ import annotations

_ARCHS = {
    "DroPELlamaForCausalLM": "model_patches.llama:DroPELlamaForCausalLM",
    "DroPEQwen2ForCausalLM": "model_patches.qwen2:DroPEQwen2ForCausalLM",
}


def register() -> None:
    from vllm import ModelRegistry
    from vllm.platforms import current_platform

    from .reference import register_with_transformers

    if current_platform.is_cpu():
        _init_amx()
    # vLLM resolves hf_config through transformers' AutoConfig: llama_drope /
    # qwen2_drope must be known there or it would ask for trust_remote_code.
    register_with_transformers()
    supported = set(ModelRegistry.get_supported_archs())
    for arch, target in _ARCHS.items():
        if arch not in supported:
            # A "module:Class" string keeps vLLM's lazy import (no CUDA init here).
            ModelRegistry.register_model(arch, target)
    _register_serving_defaults()


def _register_serving_defaults() -> None:
    # vLLM's per-architecture config hook (how in-tree models adjust their
    # VllmConfig); there is no public registry for out-of-tree models.
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP, VerifyAndUpdateConfig

    class DropeServingDefaults(VerifyAndUpdateConfig):
        @staticmethod
        def verify_and_update_config(vllm_config) -> None:
            # With no --max-model-len, serve the config's 8 x L_train (reference.py)
            # or what the KV cache holds: vLLM's own auto-fit (max_model_len=-1),
            # which lowers it with a warning instead of refusing to start.
            model_config = vllm_config.model_config
            if model_config.original_max_model_len is None:
                model_config.original_max_model_len = -1

    for arch in _ARCHS:
        MODELS_CONFIG_MAP.setdefault(arch, DropeServingDefaults)


def _init_amx() -> None:
    # vLLM-CPU's attention kernel uses AMX tiles without asking the kernel for
    # them; a bf16 prefill of 1-4 tokens then dies with SIGILL. Asking once per
    # process fixes it (docs/vllm-cpu.md).
    import torch

    init = getattr(torch.cpu, "_init_amx", None)
    if init is not None:
        init()
