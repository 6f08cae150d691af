"""drope-server: OpenAI-compatible HTTP serving of DroPE (and plain RoPE) models on vLLM."""

__version__ = "0.1.0"
