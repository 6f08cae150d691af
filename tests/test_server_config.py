"""drope-server's flags and model resolution, without an engine, and the DroPE defaults inside one.

    python -m pytest tests/test_server_config.py

The first half parses real command lines with the server's own parser (vLLM's
flags + ours) and checks what ``prepare`` hands to vLLM. The second half starts
in-process vLLM engines with *no* drope-server code in the way, as plain
``vllm serve`` users run them, to check the defaults the plugin and config
classes give: 8 x L_train, auto-fit to the KV cache, L_train pinned.
"""

from __future__ import annotations

import json
import pathlib
import shlex
import shutil
import subprocess
import sys
import textwrap

import httpx
import pytest

from model_patches.config import DropeConfig
from model_patches.reference import load_reference
from server.cli import build_parser
from server.config import ALIASES, ServerConfigError, cpu_binding, options_from_args, parse_bytes
from server.config import prepare as _prepare

from helpers import launch_server, prompt, reference_run, stop_server, vllm_engine, vllm_run

L = 64


def parse(*argv):
    return build_parser().parse_args(list(argv))


def prepare(args, on_cpu=True, environ=None):
    return _prepare(args, on_cpu=on_cpu, environ={} if environ is None else environ)


def test_parse_bytes_plain_numbers_are_bytes():
    assert parse_bytes("512") == 512 and parse_bytes("64KiB") == 65536 and parse_bytes("32MiB") == 32 * 2**20
    assert parse_bytes("1GB") == 10**9 and parse_bytes("1.5KiB") == 1536
    # The same letters mean the same as in vLLM's own size flags (--kv-cache-memory-bytes).
    from vllm.utils.argparse_utils import human_readable_int

    for text in ("64K", "64k", "32M", "2G", "2g"):
        assert parse_bytes(text) == human_readable_int(text), text
    for bad in ("lots", "12 parsecs", "-5", ""):
        with pytest.raises(ServerConfigError, match="size"):
            parse_bytes(bad)


def test_every_vllm_serve_flag_is_accepted_and_ours_come_first():
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    vllm_flags = {s for a in make_arg_parser(FlexibleArgumentParser())._actions for s in a.option_strings}
    ours = build_parser()
    flags = {s for a in ours._actions for s in a.option_strings}
    assert vllm_flags <= flags
    assert {"--train-context", "--beta-coef", "--beta-mode", "--max-queue", "--max-body"} <= flags
    titles = [g.title for g in ours._action_groups]
    assert titles.index("DroPE") < min(
        i for i, t in enumerate(titles) if t not in ("positional arguments", "options", "DroPE")
    )
    for flag in (
        "--gpu-memory-utilization",
        "--quantization",
        "--kv-cache-dtype",
        "--max-num-batched-tokens",
        "--enable-chunked-prefill",
        "--speculative-config",
        "--enable-lora",
        "--tensor-parallel-size",
    ):
        assert flag in flags, flag


def test_help_runs_and_lists_aliases():
    out = subprocess.run([sys.executable, "-m", "server", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--beta-coef" in out.stdout and "llama2-7b-drope" in out.stdout


def test_drope_defaults_to_the_configs_context_with_auto_fit(tiny_checkpoint):
    ckpt = tiny_checkpoint("llama", DropeConfig(train_context=L, beta_coef=0.2), max_position_embeddings=L)
    args = parse("--model", str(ckpt))
    drope = prepare(args, on_cpu=True)
    assert drope.train_context == L and drope.beta_coef == 0.2
    assert args.max_model_len == -1  # vLLM's auto-fit of the config's 8 x L_train (engine tests below)
    assert "max_position_embeddings" not in args.hf_overrides and args.hf_overrides["drope_train_context"] == L
    assert args.enforce_eager is True and args.kv_cache_memory_bytes == 2 * 2**30  # CPU defaults


def test_flags_win_and_a_longer_context_raises_the_position_limit(tiny_checkpoint):
    ckpt = tiny_checkpoint("llama", DropeConfig(train_context=L, beta_coef=0.2))
    args = parse(
        "--model",
        str(ckpt),
        "--beta-coef",
        "0.5",
        "--beta-mode",
        "floor",
        "--train-context",
        "128",
        "--max-model-len",
        "20000",
        "--no-enforce-eager",
    )
    drope = prepare(args, on_cpu=True)
    assert (drope.beta_coef, drope.beta_mode, drope.train_context) == (0.5, "floor", 128)
    o = args.hf_overrides
    assert (o["drope_beta_coef"], o["drope_beta_mode"], o["drope_train_context"]) == (0.5, "floor", 128)
    assert o["max_position_embeddings"] == 20000 and args.max_model_len == 20000 and args.enforce_eager is False


def sakana_format(src, dst):
    """A copy whose config.json states L_train only as max_position_embeddings, as Sakana's do."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    del cfg["drope_train_context"]
    cfg["max_position_embeddings"] = L
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_raising_only_max_position_embeddings_keeps_l_train(tiny_checkpoint, tmp_path):
    """The footgun: a Sakana-format file states L_train only as max_position_embeddings."""
    src = tiny_checkpoint("llama", DropeConfig(train_context=L, beta_coef=0.2))
    ckpt = sakana_format(src, tmp_path / "sakana")
    args = parse("--model", str(ckpt), "--hf-overrides", '{"max_position_embeddings": 4096}')
    assert prepare(args, on_cpu=True).train_context == L
    assert args.hf_overrides["drope_train_context"] == L


def test_cpu_binding_gives_every_core_to_the_workers(tiny_checkpoint):
    assert cpu_binding(1, [0, 1]) == {"VLLM_CPU_OMP_THREADS_BIND": "0,1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    assert cpu_binding(2, [0, 1])["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"
    assert cpu_binding(4, [0, 1])["VLLM_CPU_OMP_THREADS_BIND"] == "0|1|0|1"  # ranks share cores
    assert cpu_binding(3, list(range(8)))["VLLM_CPU_OMP_THREADS_BIND"] == "0,1|2,3|4,5,6,7"
    ckpt = str(tiny_checkpoint("llama", None))
    env = {}
    prepare(parse("--model", ckpt, "--tensor-parallel-size", "2"), environ=env)
    assert env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0" and env["VLLM_CPU_OMP_THREADS_BIND"].count("|") == 1
    env = {"VLLM_CPU_OMP_THREADS_BIND": "auto"}  # the user's layout wins
    prepare(parse("--model", ckpt), environ=env)
    assert env == {"VLLM_CPU_OMP_THREADS_BIND": "auto"}
    env = {}
    prepare(parse("--model", ckpt), on_cpu=False, environ=env)
    assert env == {}


def test_beta_flags_on_a_rope_checkpoint_are_refused(tiny_checkpoint):
    with pytest.raises(ServerConfigError, match="apply to DroPE checkpoints"):
        prepare(parse("--model", str(tiny_checkpoint("llama", None)), "--beta-coef", "0.1"), on_cpu=True)
    args = parse("--model", str(tiny_checkpoint("llama", None)))
    assert prepare(args, on_cpu=True) is None and args.max_model_len is None and not args.hf_overrides


def test_queue_and_body_options(tiny_checkpoint):
    ckpt = str(tiny_checkpoint("llama", None))
    args = parse("--model", ckpt)
    prepare(args, on_cpu=True)
    opts = options_from_args(args)
    assert opts.max_queue == 256 and opts.max_body_bytes == 32 * 2**20
    args = parse("--model", ckpt, "--max-queue", "3", "--max-body", "512", "--api-key", "k1")
    prepare(args, on_cpu=True)
    opts = options_from_args(args)
    assert (opts.max_queue, opts.max_body_bytes, opts.api_keys) == (3, 512, ("k1",))
    for bad, msg in (
        (["--max-queue", "-1"], "max-queue"),
        (["--max-body", "0"], "max-body"),
        (["--max-body", "huge"], "size"),
        (["--max-queue", "2", "--max-num-queued-reqs", "9"], "not both"),
    ):
        with pytest.raises(ServerConfigError, match=msg):
            prepare(parse("--model", ckpt, *bad), on_cpu=True)


def test_ray_backend_on_cpu_is_refused_before_the_engine_starts(tiny_checkpoint):
    """vLLM-CPU fails inside engine start-up with Ray (scripts/probe_ray.py); say so up front."""
    ckpt = str(tiny_checkpoint("llama", None))
    with pytest.raises(ServerConfigError, match="no Ray executor"):
        prepare(
            parse("--model", ckpt, "--tensor-parallel-size", "2", "--distributed-executor-backend", "ray"), on_cpu=True
        )
    args = parse("--model", ckpt, "--tensor-parallel-size", "2", "--distributed-executor-backend", "ray")
    prepare(args, on_cpu=False, environ={})  # GPUs: vLLM's own Ray executor
    assert args.distributed_executor_backend == "ray"


def test_unknown_model_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ServerConfigError, match="cannot read config.json"):
        prepare(parse("--model", "nobody/no-such-model"), on_cpu=True)
    assert ALIASES["llama2-7b-drope"] == "SakanaAI/Llama-2-7b-hf-DroPE"
    assert ALIASES["smollm-360m-drope"] == "SakanaAI/SmolLM-360M-DroPE"


# --- The same defaults in a plain vLLM engine: what `vllm serve <DroPE checkpoint>` gets. ---


def test_plain_vllm_serves_8x_train_context(tiny_checkpoint):
    ckpt = tiny_checkpoint("llama", DropeConfig(train_context=L, beta_coef=0.3), max_position_embeddings=L)
    with vllm_engine(ckpt, max_model_len=None) as llm:
        mc = llm.llm_engine.model_config
        assert mc.max_model_len == 8 * L and mc.hf_config.drope_train_context == L
    # A file that states a longer limit keeps it (the tiny checkpoints say 2048).
    with vllm_engine(tiny_checkpoint("llama", DropeConfig(train_context=L)), max_model_len=None) as llm:
        assert llm.llm_engine.model_config.max_model_len == 2048


def test_plain_vllm_auto_fits_a_small_kv_cache(tiny_checkpoint):
    # tiny: 2 layers x 2 KV heads x 32 dims x 2 (K, V) x 4 bytes = 1 KiB per token in float32
    ckpt = tiny_checkpoint("llama", DropeConfig(train_context=L, beta_coef=0.3))
    with vllm_engine(ckpt, max_model_len=None, kv_cache_memory_bytes=300 * 1024, max_num_batched_tokens=512) as llm:
        assert llm.llm_engine.model_config.max_model_len <= 300


def test_plain_vllm_keeps_l_train_when_only_the_position_limit_is_raised(tiny_checkpoint, tmp_path):
    """Sakana format (no drope_train_context), limit raised through hf_overrides: beta still starts at L."""
    src = tiny_checkpoint("llama", DropeConfig(train_context=L, beta_coef=0.5), seed=3)
    ckpt = sakana_format(src, tmp_path / "sakana")
    ids = prompt(300, seed=9)
    with vllm_engine(ckpt, max_model_len=1024, hf_overrides={"max_position_embeddings": 1024}) as llm:
        assert llm.llm_engine.model_config.hf_config.drope_train_context == L
        ((raised, _, _, _),) = vllm_run(llm, [ids])
    with vllm_engine(src, max_model_len=1024, hf_overrides={"max_position_embeddings": 1024}) as llm:  # L stated
        ((explicit, _, _, _),) = vllm_run(llm, [ids])
    assert (raised - explicit).abs().max() < 1e-5


@pytest.mark.parametrize("stated", [True, False], ids=["drope_train_context", "sakana-max_position_embeddings"])
def test_reference_server_and_engine_agree_on_l_train(tiny_checkpoint, tmp_path, stated):
    """model_patches.config.train_context_of is the one rule; the transformers config class, drope-server's
    prepare() and the vLLM engine (through the plugin) all apply it, before a raised position limit."""
    from model_patches.config import read_config_json, train_context_of

    src = tiny_checkpoint("llama", DropeConfig(train_context=L, beta_coef=0.2), max_position_embeddings=2048)
    ckpt = src if stated else sakana_format(src, tmp_path / "sakana")
    raised = {"max_position_embeddings": 1024}
    found = {
        "file": train_context_of(read_config_json(ckpt)),
        "reference": load_reference(ckpt).config.drope_train_context,
        "server": prepare(parse("--model", str(ckpt), "--hf-overrides", json.dumps(raised))).train_context,
    }
    with vllm_engine(ckpt, max_model_len=1024, hf_overrides=raised) as llm:
        model = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
        found["engine"] = model.model.layers[0].self_attn.drope.train_context
    assert found == dict.fromkeys(found, L), found


def readme_vllm_serve_line(needle: str) -> tuple[dict[str, str], list[str]]:
    """The README's `vllm serve` command containing ``needle``: (its environment, its arguments after the model)."""
    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    (line,) = [ln for ln in readme.splitlines() if "vllm serve ./ckpt" in ln and needle in ln]
    words = shlex.split(line.split("#")[0])
    env = dict(w.split("=", 1) for w in words[: words.index("vllm")])
    assert words[words.index("vllm") + 1 : words.index("vllm") + 3] == ["serve", "./ckpt"], line
    return env, words[words.index("vllm") + 3 :]


def test_readmes_plain_vllm_serve_with_our_plugins_allowlisted(tiny_checkpoint, tmp_path):
    """The README's `VLLM_PLUGINS=... vllm serve ./ckpt ...` line, run as written on a Sakana-format checkpoint
    (through `python -m vllm.entrypoints.openai.api_server`, as the README says for the CPU build): all three
    plugins load, and the DroPE model past L_train is the reference's."""
    env, args = readme_vllm_serve_line("VLLM_PLUGINS=")
    assert set(env["VLLM_PLUGINS"].split(",")) == {"drope", "drope_metrics", "drope_server"}
    ckpt = sakana_format(tiny_checkpoint("llama", DropeConfig(train_context=L, beta_coef=0.3), seed=5), tmp_path / "c")
    proc, base, log = launch_server(ckpt, tmp_path, *args, env=env, module="vllm.entrypoints.openai.api_server")
    try:
        card = httpx.get(base + "/v1/models").json()["data"][0]
        assert card["max_model_len"] == 8 * L and card["drope"]["train_context"] == L  # drope + drope_server
        ids = prompt(3 * L, seed=6)
        r = httpx.post(
            base + "/v1/completions",
            json={"model": str(ckpt), "prompt": ids, "max_tokens": 12, "temperature": 0, "logprobs": 0}
            | {"ignore_eos": True, "return_token_ids": True},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        _, toks, glp = reference_run(load_reference(ckpt), ids)
        assert choice["token_ids"] == toks
        assert max(abs(a - float(b)) for a, b in zip(choice["logprobs"]["token_logprobs"], glp, strict=True)) < 1e-4
        assert httpx.get(base + "/nothing").json()["error"]["type"] == "not_found_error"  # our envelope
        metrics = httpx.get(base + "/metrics").text
        assert f"drope:extension_factor_sum {3 * L / L}" in metrics  # drope_metrics
    finally:
        stop_server(proc)
    log.seek(0)
    assert "admission limit 320 requests" in log.read()  # the line's --max-num-queued-reqs, left as given


def test_without_vllm_the_entry_points_name_the_extra(tmp_path):
    """vLLM comes only with the [cpu] / [gpu] extra: a plain `pip install .` must say so, not ImportError: vllm."""
    code = textwrap.dedent("""
        import sys
        sys.modules["vllm"] = None  # as if not installed
        from recalibration import fit_beta
        assert fit_beta.main(["ckpt", "--data", "x"]) == 2
        try:
            import server.cli
        except ImportError as e:
            print("SERVER:", e)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "drope-server[cpu]" in r.stderr and "recalibration.fit_beta" in r.stderr
    assert "SERVER: drope-server runs on vLLM" in r.stdout and "drope-server[gpu]" in r.stdout
