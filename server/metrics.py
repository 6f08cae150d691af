"""Prometheus metrics we add to vLLM's own (which keep their usual vllm:* names).

``DropeStatLogger`` is a ``vllm.stat_logger_plugins`` entry point: vLLM's async
engine feeds it the same per-iteration statistics its Prometheus logger gets, so
it works under plain ``vllm serve`` too. Counts vLLM already exports (tokens,
aborts as ``vllm:request_success_total{finished_reason="abort"}``, queue-limit
rejections as ``vllm:admission_rejections``) are not repeated here.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram
from vllm.v1.metrics.loggers import AggregateStatLoggerBase

from model_patches.config import DropeConfig, is_drope_config

EXTENSION = Histogram(
    "drope:extension_factor",
    "Prompt tokens / DroPE training context L_train of each finished request (s in beta = 1 + c ln s).",
    buckets=(0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0),
)
REJECTED = Counter(
    "drope:requests_rejected",
    "Requests refused by drope-server before they reach vLLM (vLLM's queue limit: vllm:admission_rejections).",
    ["reason"],
)


class DropeStatLogger(AggregateStatLoggerBase):
    def __init__(self, vllm_config, engine_indexes: list[int] | None = None):
        hf_config = vllm_config.model_config.hf_config
        self.train_context = DropeConfig.from_hf_config(hf_config).train_context if is_drope_config(hf_config) else None

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
        if self.train_context is None or iteration_stats is None:
            return
        for finished in iteration_stats.finished_requests:
            EXTENSION.observe(finished.num_prompt_tokens / self.train_context)

    def log_engine_initialized(self) -> None:
        pass
