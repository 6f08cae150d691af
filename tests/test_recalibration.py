"""recalibration: end to end on CPU, kill-and-resume equality, bad inputs, config and data handling.

The tiny preset's base is a small random RoPE Llama; the data are the Paul Graham
essays. End to end: convert -> recalibrate a few dozen steps -> held-out loss
falls -> fit beta -> the checkpoint loads in vLLM through model_patches and generates.

    python -m pytest tests/test_recalibration.py
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from recalibration import fit_beta
from recalibration.config import RecalibConfig, RecalibConfigError, preset
from recalibration.data import check_data, pack
from recalibration.run import main as run_main

from helpers import vllm_engine

FAST = ["--preset", "tiny", "--seq-len", "64", "--set", "micro_batch=2", "--set", "eval_every=0"]


def run_cli(*args: str, crash_at: tuple[str, int] | None = None) -> subprocess.CompletedProcess:
    """recalibration.run in a subprocess; crash_at=("after-save"|"in-save", step) dies there (tests/recalib_crash.py)."""
    launcher = ["-m", "recalibration.run"]
    if crash_at:
        launcher = [os.path.join(os.path.dirname(__file__), "recalib_crash.py"), crash_at[0], str(crash_at[1])]
    return subprocess.run([sys.executable, *launcher, *args], capture_output=True, text=True, timeout=600)


def test_end_to_end_tiny(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main([*FAST, "--output-dir", str(out), "--max-steps", "40", "--save-every", "20"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["seq_len"] == 64
    assert summary["heldout_loss_end"] < summary["heldout_loss_start"] - 0.5, summary
    assert "recalibration summary" in capsys.readouterr().out
    saved = RecalibConfig.from_dict(json.loads((out / "recalib_config.json").read_text()))
    assert saved.max_steps == 40 and saved.seq_len == 64
    final = out / "final"
    cfg = json.loads((final / "config.json").read_text())
    assert cfg["model_type"] == "llama_drope" and cfg["drope_train_context"] == 64

    assert (
        fit_beta.main(
            [str(final), "--data", "builtin:essays", "--lengths", "2x,4x", "--coefs", "0,0.2,0.4", "--windows", "2"]
        )
        == 0
    )
    fitted = json.loads((final / "config.json").read_text())["drope_beta_coef"]
    table = json.loads((final / "fit_beta" / "fit_beta.json").read_text())
    assert fitted == table["best_coef"] and (final / "fit_beta" / "fit_beta.png").exists()
    assert min(table["score"].values()) == table["score"][f"{fitted:g}"]

    with vllm_engine(final, max_model_len=512, hf_overrides={"max_position_embeddings": 512}) as llm:
        from vllm import SamplingParams

        (o,) = llm.generate(
            {"prompt_token_ids": list(range(60, 260))}, SamplingParams(max_tokens=8, temperature=0), use_tqdm=False
        )
        model = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
    assert type(model).__name__ == "DroPELlamaForCausalLM" and len(o.outputs[0].token_ids) == 8
    assert model.model.layers[0].self_attn.drope.beta_coef == fitted


def test_kill_and_resume_gives_the_same_weights(tmp_path):
    common = [*FAST, "--max-steps", "12", "--save-every", "4", "--set", "save_total_limit=5"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    assert run_cli(*common, "--output-dir", str(straight)).returncode == 0
    # Die like kill -9 right after checkpoint 8 is complete ...
    r = run_cli(*common, "--output-dir", str(broken), crash_at=("after-save", 8))
    assert r.returncode == 137, r.stderr[-2000:]
    assert not (broken / "final").exists()
    # ... then resume: it must continue from step 8, not restart.
    r = run_cli(*common, "--output-dir", str(broken), "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "checkpoint-8" in r.stderr
    a, b = load_file(straight / "final" / "model.safetensors"), load_file(broken / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_half_written_checkpoint_is_never_resumed(tmp_path):
    out = tmp_path / "run"
    common = [*FAST, "--max-steps", "8", "--save-every", "4", "--output-dir", str(out)]
    r = run_cli(*common, crash_at=("in-save", 8))
    assert r.returncode == 137
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert "checkpoint-4" in ckpts and "checkpoint-8" not in ckpts  # only in .staging
    r = run_cli(*common, "--resume")
    assert r.returncode == 0 and "checkpoint-4" in r.stderr, r.stderr[-3000:]


@pytest.mark.parametrize(
    "setup,args,match",
    [
        ("none", ["--data", "/nonexistent/corpus.txt"], "does not exist"),
        ("empty", ["--data", "{tmp}/empty"], "no .txt"),
        ("short", ["--data", "{tmp}/short"], "fewer than one sequence"),
        ("none", ["--attention-type", "rope_nope"], "unknown attention type"),
        ("other-run", [], "already holds a different run"),
        ("other-files", [], "already holds other files"),
    ],
)
def test_bad_inputs_fail_clearly_and_overwrite_nothing(tmp_path, capsys, setup, args, match):
    (tmp_path / "empty").mkdir()
    (tmp_path / "short").mkdir()
    (tmp_path / "short" / "a.txt").write_text("Tiny held-out document. " * 8)
    (tmp_path / "short" / "b.txt").write_text("Too short to train on.")
    out = tmp_path / "out"
    if setup == "other-run":
        out.mkdir()
        preset("tiny", output_dir=str(out)).with_overrides({"seed": 99}).save(out / "recalib_config.json")
    if setup == "other-files":
        out.mkdir()
        (out / "notes.txt").write_text("keep me")
    before = sorted(p.name for p in out.iterdir()) if out.exists() else None
    argv = [*FAST, "--output-dir", str(out), "--max-steps", "2", *[a.replace("{tmp}", str(tmp_path)) for a in args]]
    if setup == "short":
        argv += ["--set", "data.heldout_docs=1", "--seq-len", "100"]
    assert run_main(argv) == 2
    assert match in capsys.readouterr().err
    assert (sorted(p.name for p in out.iterdir()) if out.exists() else None) == before


def test_config_validation_and_overrides():
    cfg = preset("tiny", output_dir="x")
    assert cfg.lr == 1e-3 and cfg.with_overrides({"attention_type": "qk_norm_nope", "optim.lr": None}).qk_norm
    assert RecalibConfig.from_dict(cfg.to_dict()) == cfg
    c2 = cfg.with_overrides({"token_budget": 10_000, "optim.weight_decay": 0.05})
    assert c2.max_steps is None and c2.steps(128) == 10_000 // (128 * 4) and c2.optim.weight_decay == 0.05
    with pytest.raises(RecalibConfigError, match="unknown setting"):
        cfg.with_overrides({"optim.momentum": 0.9})
    with pytest.raises(RecalibConfigError, match="exactly one of max_steps or token_budget"):
        RecalibConfig(base="b", output_dir="o", max_steps=1, token_budget=5, data=cfg.data)
    with pytest.raises(RecalibConfigError, match="lr must be positive"):
        cfg.with_overrides({"optim.lr": -1.0})
    # The no-QK-norm default learning rate is the paper's 3e-4.
    assert RecalibConfig(base="b", output_dir="o", max_steps=1, data=cfg.data).lr == 3e-4


def test_data_formats_pack_identically(tmp_path):
    from transformers import AutoTokenizer

    from model_patches.tiny import save_byte_tokenizer
    from recalibration.config import DataConfig
    from recalibration.data import PackedTrainData

    tok = save_byte_tokenizer(tmp_path / "tok") and AutoTokenizer.from_pretrained(tmp_path / "tok")
    docs = [f"Document number {i}. " * (5 + i) for i in range(6)]
    (tmp_path / "txt").mkdir()
    for i, d in enumerate(docs):
        (tmp_path / "txt" / f"{i:02d}.txt").write_text(d)
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs}), tmp_path / "d.parquet")
    streams = []
    for src in ("txt", "d.jsonl", "d.parquet"):
        cfg = DataConfig(source=str(tmp_path / src), heldout_docs=1)
        it = iter(PackedTrainData(cfg, tok, 32, seed=0))
        streams.append([next(it)["input_ids"].tolist() for _ in range(5)])
        check_data(cfg, tok, 32)
    assert streams[0] == streams[1] == streams[2]
    # Documents are joined with EOS and cut into full sequences only.
    assert list(pack(iter([[1, 2, 3], [4, 5]]), 2)) == [[1, 2], [3, 4]]
    assert tok.eos_token_id in sum(streams[0], [])


def test_beta_search_extends_past_the_grid_and_refines():
    calls = []

    def bowl(c):  # minimum at 1.3, beyond the default grid
        calls.append(c)
        return (c - 1.3) ** 2

    best, extended = fit_beta.search([0.0, 0.2, 0.4, 0.6], bowl)
    assert extended and abs(best - 1.3) <= 0.2
    assert len(calls) == len(set(calls))  # nothing evaluated twice
    best, extended = fit_beta.search([0.0, 0.2, 0.4, 0.6], lambda c: (c - 0.3) ** 2)
    assert not extended and best == 0.3  # found by refinement between 0.2 and 0.4


def test_token_budget_is_global_over_ranks():
    """llama2-7b-gpu on 8 GPUs trains its budget once, not 8 times (steps shrink with the world size)."""
    cfg = preset("llama2-7b-gpu")
    per_rank_step = 4096 * cfg.micro_batch * cfg.grad_accum
    for world in (1, 8):
        trained = cfg.steps(4096, world) * per_rank_step * world
        assert cfg.token_budget - per_rank_step * world < trained <= cfg.token_budget, (world, trained)


def test_bf16_training_keeps_fp32_master_weights(tmp_path):
    """precision=bf16 computes in bf16 but keeps (and saves) fp32 weights, as on one GPU."""
    out = tmp_path / "run"
    assert (
        run_main([*FAST, "--output-dir", str(out), "--max-steps", "2", "--save-every", "2", "--set", "precision=bf16"])
        == 0
    )
    weights = load_file(out / "final" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fsdp_yaml_turns_on_sharding_with_a_unit_per_decoder_layer(tiny_checkpoint, family):
    """recalibration/fsdp.yaml, read by accelerate's own loader, asks for FSDP; the plan shards each decoder
    layer of either family as its own unit and splits every parameter over the ranks, unevenly too."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType
    from transformers import AutoConfig

    from model_patches.config import DropeConfig
    from recalibration import sharding

    config = load_config_from_file(os.path.join(os.path.dirname(__file__), "..", "recalibration", "fsdp.yaml"))
    assert config.distributed_type == DistributedType.FSDP and config.mixed_precision in (None, "no")
    model = sharding.meta_model(AutoConfig.from_pretrained(tiny_checkpoint(family, DropeConfig(train_context=64))))
    layers = {n for n, m in model.named_modules() if type(m).__name__.endswith("DecoderLayer")}
    units = {name: free for name, _, free in sharding._units(model)}
    assert layers and all(units.get(n) is True for n in layers), units
    assert units.get("lm_head") is False  # kept until backward, with the final norm
    total = sum(p.numel() for p in model.parameters())
    for world in (2, 3):
        plan = sharding.plan(
            model, fsdp=True, world_size=world, bf16=True, micro_batch=1, seq_len=64, gradient_checkpointing=False
        )
        assert sum(plan.per_rank) == plan.total == total and max(plan.per_rank) - min(plan.per_rank) < total / 50


def test_cli_has_every_flag_and_each_sets_its_config_field():
    """The command line is generated from the config; this pins the flags people use and where they land."""
    from recalibration.run import build_parser, config_from_args

    parser = build_parser()
    options = {o for a in parser._actions for o in a.option_strings}
    for flag in (
        "--preset",
        "--config",
        "--base",
        "--output-dir",
        "--data",
        "--attention-type",
        "--keep-rope",
        "--seq-len",
        "--max-steps",
        "--token-budget",
        "--micro-batch",
        "--grad-accum",
        "--lr",
        "--precision",
        "--seed",
        "--save-every",
        "--set",
        "--resume",
        "--overwrite",
        "--fsdp",
        "--dry-run",
    ):
        assert flag in options, flag
    args = parser.parse_args(
        [
            "--output-dir",
            "o",
            "--data",
            "d.txt",
            "--lr",
            "1e-4",
            "--keep-rope",
            "--seq-len",
            "32",
            "--token-budget",
            "999",
            "--micro-batch",
            "3",
            "--grad-accum",
            "2",
            "--precision",
            "bf16",
            "--seed",
            "7",
            "--save-every",
            "5",
            "--base",
            "b",
            "--set",
            "optim.weight_decay=0.05",
            "--set",
            "data.heldout_docs=4",
            "--fsdp",
            "--resume",
        ]
    )
    cfg = config_from_args(args)
    assert (cfg.output_dir, cfg.data.source, cfg.optim.lr, cfg.keep_rope, cfg.seq_len) == ("o", "d.txt", 1e-4, True, 32)
    assert (cfg.token_budget, cfg.max_steps, cfg.micro_batch, cfg.grad_accum) == (999, None, 3, 2)
    assert (cfg.precision, cfg.seed, cfg.save_every, cfg.base, cfg.fsdp) == ("bf16", 7, 5, "b", True)
    assert (cfg.optim.weight_decay, cfg.data.heldout_docs, args.resume, args.overwrite) == (0.05, 4, True, False)
    # Flags not given leave the preset's values.
    assert config_from_args(parser.parse_args(["--preset", "tiny"])) == preset("tiny")
    assert parser.parse_args(["--dry-run"]).dry_run == 0 and parser.parse_args(["--dry-run", "8"]).dry_run == 8


def test_dry_run_prints_the_sharding_plan_and_writes_nothing(tmp_path, capsys):
    from recalibration.run import resolve_base

    out = tmp_path / "out"
    total = sum(t.numel() for t in load_file(resolve_base("tiny") / "model.safetensors").values())
    assert run_main([*FAST, "--output-dir", str(out), "--max-steps", "2", "--fsdp", "--dry-run", "2"]) == 0
    printed = capsys.readouterr().out
    assert "FSDP2, fully sharded over 2 ranks" in printed and "4 x model.layers.*" in printed
    assert f"parameters/rank : {total // 2:,} on every rank (50.0% of the model)" in printed, printed
    assert "AdamW state" in printed and "activations (estimate" in printed
    assert not out.exists()


def test_dry_run_of_llama2_7b_on_8_ranks_needs_no_weights(tmp_path, capsys):
    """The GPU preset's plan from its config alone: Llama-2-7B's 6,738,415,616 parameters plus the QK-norm
    vectors (2 x 4096 per layer), an eighth of them and 16 bytes each of state per rank."""
    from model_patches.tiny import save_byte_tokenizer

    base = tmp_path / "llama-2-7b"
    save_byte_tokenizer(base)
    (base / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "hidden_size": 4096,
                "intermediate_size": 11008,
                "num_hidden_layers": 32,
                "num_attention_heads": 32,
                "num_key_value_heads": 32,
                "vocab_size": 32000,
                "max_position_embeddings": 4096,
                "rms_norm_eps": 1e-5,
                "tie_word_embeddings": False,
            }
        )
    )
    assert (
        run_main(
            [
                "--preset",
                "llama2-7b-gpu",
                "--base",
                str(base),
                "--data",
                "builtin:essays",
                "--output-dir",
                str(tmp_path / "out"),
                "--dry-run",
                "8",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    total = 6_738_415_616 + 32 * 2 * 4096
    assert f"{total:,} parameters" in printed and "over 8 ranks" in printed and "32 x model.layers.*" in printed
    assert f"{total // 8:,} on every rank" in printed
    state = re.search(r"AdamW state \(2 x fp32\)\s+([\d.]+) GB", printed)
    assert state and float(state.group(1)) == pytest.approx(8 * total / 8 / 1e9, abs=0.01)
    assert "recomputed" in printed  # the preset's activation checkpointing
    assert not (tmp_path / "out").exists()


def test_keep_rope_trains_the_base_as_it_is(tmp_path):
    """--keep-rope (pretraining a RoPE parent) trains the plain model: final/ is the base's family, with
    the base's weight names and changed weights; a DroPE attention type alongside it is refused."""
    from recalibration.run import resolve_base

    out = tmp_path / "run"
    assert run_main([*FAST, "--output-dir", str(out), "--max-steps", "2", "--keep-rope"]) == 0
    cfg = json.loads((out / "final" / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert not (out / "init").exists()
    base = load_file(resolve_base("tiny") / "model.safetensors")
    trained = load_file(out / "final" / "model.safetensors")
    assert trained.keys() == base.keys()
    assert any(not torch.equal(trained[k], base[k]) for k in base)
    with pytest.raises(RecalibConfigError, match="keep_rope"):
        preset("tiny", output_dir="x").with_overrides({"keep_rope": True, "attention_type": "qk_norm_nope"})
