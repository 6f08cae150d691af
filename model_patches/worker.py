"""vLLM worker extension: DroPE's beta changed in place on every worker of a running engine.

vLLM mixes this class into each worker (``worker_extension_cls``, the engine option
RLHF trainers use to update weights in place) and ``LLM.collective_rpc`` calls its
methods by name on every rank, tensor-parallel ranks included, without reloading
weights. fit_beta sweeps c this way on the engine that serves the model:

    llm = LLM(ckpt, worker_extension_cls=WORKER_EXTENSION, hf_overrides={"drope_beta_coef": 0.1})
    llm.collective_rpc("set_drope_beta", args=(0.3, "log"))
"""

from __future__ import annotations

from typing import Any

WORKER_EXTENSION = "model_patches.worker.DropeWorkerExtension"


class DropeWorkerExtension:
    def set_drope_beta(self, coef: float, mode: str | None = None) -> dict[str, Any]:
        """Set c (and mode) on every DroPE attention layer of this worker's model; returns the new settings."""
        from .llama import set_beta

        return set_beta(self.get_model(), coef, mode).as_dict()
