"""Server configuration without an engine: sizes, model resolution, default context, overrides, CLI.

    python -m pytest tests/test_server_config.py
"""

import pytest

from model_patches.config import DropeConfig
from server.cli import build_parser, config_from_args
from server.config import ALIASES, ServerConfig, ServerConfigError, engine_kwargs, parse_bytes, resolve


def test_parse_bytes():
    assert parse_bytes("4GiB") == 4 * 2**30 and parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes("64KiB") == 64 * 1024 and parse_bytes("2") == 2 * 2**30 and parse_bytes("5000") == 5000
    with pytest.raises(ServerConfigError, match="size"):
        parse_bytes("lots")


def test_drope_defaults_to_8x_train_context_and_pins_it(tiny_checkpoint):
    ckpt = tiny_checkpoint("llama", DropeConfig(train_context=64, beta_coef=0.2), max_position_embeddings=64)
    m = resolve(ServerConfig(model=str(ckpt)))
    assert m.max_model_len == 512 and m.drope.train_context == 64
    # L_train pinned before max_position_embeddings is raised for vLLM's length check.
    assert m.hf_overrides["drope_train_context"] == 64 and m.hf_overrides["max_position_embeddings"] == 512
    assert engine_kwargs(ServerConfig(model=str(ckpt)), m)["max_model_len"] == 512


def test_cli_overrides_win_and_kv_cache_lowers_the_default(tiny_checkpoint):
    ckpt = tiny_checkpoint("llama", DropeConfig(train_context=64, beta_coef=0.2))
    m = resolve(ServerConfig(model=str(ckpt), beta_coef=0.5, beta_mode="floor", train_context=128))
    assert (m.drope.beta_coef, m.drope.beta_mode, m.max_model_len) == (0.5, "floor", 1024)
    # tiny: 2 layers x 2 KV heads x 32 dims x 2 (K, V) x 4 bytes = 1 KiB per token
    m = resolve(ServerConfig(model=str(ckpt), kv_cache_memory_bytes=300 * 1024, dtype="float32"))
    assert m.max_model_len == 288  # 300 tokens fit, rounded down to 16-token blocks


def test_beta_flags_on_a_rope_checkpoint_are_refused(tiny_checkpoint):
    with pytest.raises(ServerConfigError, match="apply to DroPE checkpoints"):
        resolve(ServerConfig(model=str(tiny_checkpoint("llama", None)), beta_coef=0.1))
    m = resolve(ServerConfig(model=str(tiny_checkpoint("llama", None))))
    assert m.drope is None and m.max_model_len is None and "hf_overrides" not in engine_kwargs(ServerConfig(), m)


def test_unknown_model_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ServerConfigError, match="cannot read config.json"):
        resolve(ServerConfig(model="nobody/no-such-model"))
    assert ALIASES["llama2-7b-drope"] == "SakanaAI/Llama-2-7b-hf-DroPE"


def test_cli_flags_are_locked():
    """Renaming a flag breaks users' scripts: this list changes only on purpose."""
    flags = {s for a in build_parser()._actions for s in a.option_strings}
    assert flags >= {
        "--model", "--host", "--port", "--max-model-len", "--beta-coef", "--beta-mode", "--train-context", "--dtype",
        "--tensor-parallel-size", "--pipeline-parallel-size", "--distributed-executor-backend", "--kv-cache-memory",
        "--max-num-seqs", "--enable-prefix-caching", "--served-model-name", "--chat-template", "--api-key",
        "--max-queue", "--hf-overrides", "--max-body", "--shutdown-grace", "--enforce-eager", "--no-enforce-eager",
    }
    cfg = config_from_args(build_parser().parse_args(["--kv-cache-memory", "1GiB", "--max-queue", "3"]))
    assert cfg.kv_cache_memory_bytes == 2**30 and cfg.max_queue == 3
    with pytest.raises(ServerConfigError, match="not valid JSON"):
        config_from_args(build_parser().parse_args(["--hf-overrides", "{x"]))
    with pytest.raises(ServerConfigError, match="max-queue"):
        ServerConfig(max_queue=-1)
