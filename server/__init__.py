"""drope-server: OpenAI-compatible HTTP serving of DroPE (and plain RoPE) models on vLLM."""

__version__ = "0.1.0"

from model_patches.config import require_vllm

require_vllm("drope-server")  # before the first `from vllm ...` below gives a bare ImportError
