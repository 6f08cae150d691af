"""Prometheus metrics the HTTP layer adds to vLLM's own.

vLLM's stat logger already exports the standard serving metrics under their
usual names (vllm:time_to_first_token_seconds, vllm:inter_token_latency_seconds,
vllm:e2e_request_latency_seconds, vllm:prompt_tokens_total,
vllm:generation_tokens_total, vllm:num_requests_running / _waiting,
vllm:kv_cache_usage_perc, ...) into the same registry, so existing vLLM
dashboards work unchanged. Ours are prefixed drope: and are updated by the
request handlers themselves, so they are exact at every scrape (vLLM's gauges
move only when the engine steps).
"""

from prometheus_client import Counter, Gauge, Histogram

RUNNING = Gauge("drope:num_requests_in_flight", "Requests admitted by the HTTP server and not yet finished or aborted.")
EXTENSION = Histogram(
    "drope:extension_factor",
    "Prompt length / DroPE training context (s in beta = 1 + c ln s); prompt / max context for RoPE models.",
    buckets=(0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0),
)
PROMPT_TOKENS = Counter("drope:prompt_tokens", "Prompt tokens of requests admitted to the engine.")
GENERATION_TOKENS = Counter("drope:generation_tokens", "Tokens generated, streamed or not (aborted requests included).")
ABORTED = Counter("drope:requests_aborted", "Requests aborted in the engine (client gone, cancelled, shutdown).")
REJECTED = Counter("drope:requests_rejected", "Requests refused before reaching the engine.", ["reason"])
HTTP = Counter("drope:http_requests", "HTTP responses by route and status.", ["route", "status"])
