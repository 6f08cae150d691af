"""Quality measured on the serving engine: perplexity, fit_beta and evaluate on vLLM.

* engine perplexity (prompt_logprobs=0 windows from position 0) equals the transformers
  reference's to 1e-4 relative, fp32, Llama nope and Qwen2 qk_norm, beta on, past L_train;
* c changed in place on a loaded engine equals a fresh engine built with that c and the
  reference past L_train, eager and compiled (torch.compile, inductor on CPU), and TP=2
  equals TP=1 through the CLI;
* fit_beta writes c *and* the mode it fitted in (a ``none`` checkpoint used to keep
  ``none``: its fitted c was never applied), keeps an interrupted sweep, refuses bad input
  before writing anything;
* evaluate's four rows on the engine, and its --base-url mode against drope-server.

    python -m pytest tests/test_measure.py            # the compiled and TP=2 cases are slow
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest

from model_patches.config import DropeConfig
from model_patches.reference import load_reference, reference_window_nll
from recalibration import evaluate, fit_beta
from recalibration.engine import drope_overrides, engine, engine_namespace, set_beta
from recalibration.perplexity import engine_nll, heldout_tokens_for, perplexity, windows

from helpers import KV_CACHE_BYTES, launch_server, stop_server

L = 64
ENGINE = ["--dtype", "float32", "--kv-cache-memory-bytes", str(KV_CACHE_BYTES), "--seed", "0"]


def tokens_for(ckpt, longest=4 * L) -> list[int]:
    return heldout_tokens_for(ckpt, "builtin:essays", 2, longest)


def nll_in_place(ckpt, coefs, mode="log", eager=True, max_model_len=4 * L + 1) -> dict[float, list[float]]:
    """One engine built with the placeholder c (fit_beta's way), then each c set in place."""
    drope = DropeConfig.from_pretrained(ckpt)
    wins = windows(tokens_for(ckpt), 4 * L, 2) + windows(tokens_for(ckpt), 2 * L, 2)
    args = engine_namespace(ENGINE + ([] if eager else ["--no-enforce-eager"]))
    out = {}
    with engine(args, str(ckpt), drope_overrides(drope, mode, max_model_len), max_model_len) as llm:
        for c in coefs:
            set_beta(llm, c, mode)
            out[c] = engine_nll(llm)(wins)
    return out


def nll_fresh(ckpt, coef, mode="log", eager=True, max_model_len=4 * L + 1) -> list[float]:
    """A fresh engine whose c comes from its config (no in-place change)."""
    wins = windows(tokens_for(ckpt), 4 * L, 2) + windows(tokens_for(ckpt), 2 * L, 2)
    args = engine_namespace(ENGINE + ([] if eager else ["--no-enforce-eager"]))
    over = {"drope_beta_coef": coef, "drope_beta_mode": mode, "max_position_embeddings": max_model_len}
    with engine(args, str(ckpt), over, max_model_len) as llm:
        return engine_nll(llm)(wins)


@pytest.mark.parametrize(
    "family,attention_type,coef,mode",
    [
        pytest.param("llama", "nope", 0.4, "log", id="llama-nope-c0.4"),
        pytest.param("qwen2", "qk_norm_nope", 0.3, "log", id="qwen2-qknorm-c0.3"),
        pytest.param("llama", "q_norm_nope", 0.3, "floor", id="llama-qnorm-floor"),
    ],
)
def test_engine_perplexity_equals_the_reference(tiny_checkpoint, family, attention_type, coef, mode):
    ckpt = tiny_checkpoint(family, DropeConfig(train_context=L, attention_type=attention_type))
    tokens = tokens_for(ckpt)
    got = nll_in_place(ckpt, [coef], mode)[coef]
    ref = reference_window_nll(load_reference(ckpt, drope_beta_coef=coef, drope_beta_mode=mode))
    wins = windows(tokens, 4 * L, 2) + windows(tokens, 2 * L, 2)
    want = ref(wins)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert abs(g - w) <= 1e-4 * abs(w), f"window {i} ({len(wins[i])} tokens): engine NLL {g} vs reference {w}"
    # beta is on: at c = 0 the same windows measure something else past L_train
    without = reference_window_nll(load_reference(ckpt))(wins)
    assert all(abs(g - w) > 1e-3 for g, w in zip(got, without, strict=True))


@pytest.mark.parametrize(
    "eager", [pytest.param(True, id="eager"), pytest.param(False, id="compiled", marks=pytest.mark.slow)]
)
def test_c_in_place_equals_a_fresh_engine(tiny_checkpoint, eager):
    """A compiled graph that captured c as a Python constant would keep measuring the first c."""
    ckpt = tiny_checkpoint("llama", DropeConfig(train_context=L, attention_type="qk_norm_nope"), seed=3)
    in_place = nll_in_place(ckpt, [0.5, 0.0, 0.2], eager=eager)
    assert in_place[0.5] != in_place[0.2]
    fresh = nll_fresh(ckpt, 0.2, eager=eager)
    for g, w in zip(in_place[0.2], fresh, strict=True):
        assert abs(g - w) <= 1e-5 * abs(w), (g, w)
    # Both equal the transformers reference past L_train (windows of 4 and 2 x L_train from position 0),
    # beta on and, set in place to c = 0, off (the multiply stays in the graph, by ones).
    tokens = tokens_for(ckpt)
    wins = windows(tokens, 4 * L, 2) + windows(tokens, 2 * L, 2)
    for c in (0.2, 0.0):
        want = reference_window_nll(load_reference(ckpt, drope_beta_coef=c))(wins)
        for g, w in zip(in_place[c], want, strict=True):
            assert abs(g - w) <= 1e-4 * abs(w), (c, g, w)


FIT = ["--data", "builtin:essays", "--lengths", "2x,4x", "--windows", "2", *ENGINE]


def config_of(ckpt) -> dict:
    return json.loads((ckpt / "config.json").read_text())


def test_fit_beta_none_mode_is_fitted_and_written_in_log_mode_and_an_interrupted_sweep_resumes(
    tiny_checkpoint, tmp_path, monkeypatch, capsys
):
    import shutil

    from recalibration import engine as engine_mod

    src = tiny_checkpoint("llama", DropeConfig(train_context=L, beta_mode="none"), seed=5)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(src, ckpt)
    before = (ckpt / "config.json").read_text()
    mode = (ckpt / "config.json").stat().st_mode & 0o777
    argv = [str(ckpt), *FIT, "--coefs", "0.2,0.4,0.6", "--no-refine"]

    # Interrupted (Ctrl-C) while the second c is measured: the first is kept, config.json untouched.
    calls: list[float] = []
    real = engine_mod.set_beta

    def interrupt_second(llm, c, mode):
        calls.append(c)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(llm, c, mode)

    monkeypatch.setattr(engine_mod, "set_beta", interrupt_second)
    assert fit_beta.main(argv) == 130
    assert "interrupted" in capsys.readouterr().err
    assert (ckpt / "config.json").read_text() == before
    partial = json.loads((ckpt / "fit_beta" / "fit_beta.json").read_text())
    assert not partial["complete"] and list(partial["table"]) == ["0.2"]

    # The same command again measures only what is missing ...
    calls.clear()
    monkeypatch.setattr(engine_mod, "set_beta", lambda llm, c, mode: (calls.append(c), real(llm, c, mode)))
    assert fit_beta.main(argv) == 0
    assert calls[:2] == [0.4, 0.6] and 0.2 not in calls  # (then maybe the grid's extension upward)
    assert "reusing 1 value(s)" in capsys.readouterr().out
    result = json.loads((ckpt / "fit_beta" / "fit_beta.json").read_text())
    assert result["complete"] and result["mode"] == "log" and (ckpt / "fit_beta" / "fit_beta.png").exists()

    # ... and writes c with the mode it was fitted in: served from config.json alone, the model
    # measures what the fit measured at that c (with mode none kept, c would never apply).
    cfg = config_of(ckpt)
    assert cfg["drope_beta_mode"] == "log" and cfg["drope_beta_coef"] == result["best_coef"] > 0
    assert (ckpt / "config.json").stat().st_mode & 0o777 == mode  # rewritten, not made private (mkstemp's 0600)
    served = DropeConfig.from_pretrained(ckpt)
    assert served.scales_queries
    tokens = tokens_for(ckpt)
    nll = reference_window_nll(load_reference(ckpt))  # c and mode from the file
    for n in (2 * L, 4 * L):
        want = result["table"][f"{result['best_coef']:g}"][str(n)]
        assert abs(perplexity(nll, windows(tokens, n, 2)) / want - 1) <= 1e-4


@pytest.mark.parametrize(
    "case,extra,match",
    [
        ("rope", [], "plain llama checkpoint with RoPE"),
        ("drope", ["--coefs", "0,-0.1,0.2"], "every c must be a finite number >= 0"),
        ("drope", ["--lengths", "4x", "--max-model-len", "200"], "beyond --max-model-len 200"),
        ("drope", ["--lengths", "100000"], "held-out text has"),
        ("drope", ["--lengths", "1x,2x"], "not past L_train"),
    ],
)
def test_fit_beta_refuses_bad_input_before_writing_anything(tiny_checkpoint, tmp_path, capsys, case, extra, match):
    import shutil

    src = tiny_checkpoint("llama", None if case == "rope" else DropeConfig(train_context=L), max_position_embeddings=L)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(src, ckpt)
    before = sorted(p.name for p in ckpt.iterdir()), (ckpt / "config.json").read_text()
    argv = [str(ckpt), *FIT]
    for flag, value in zip(extra[::2], extra[1::2], strict=True):  # later flags win in argparse
        argv += [flag, value]
    assert fit_beta.main(argv) == 2
    assert match in capsys.readouterr().err
    assert (sorted(p.name for p in ckpt.iterdir()), (ckpt / "config.json").read_text()) == before


@pytest.mark.slow
def test_fit_beta_at_tp2_equals_tp1(tiny_checkpoint, tmp_path):
    """The CLI at --tensor-parallel-size 2 (two worker processes; c set in place on both ranks) against one rank."""
    ckpt = tiny_checkpoint("llama", DropeConfig(train_context=L, attention_type="qk_norm_nope"), seed=9)
    common = [str(ckpt), *FIT, "--coefs", "0,0.4", "--no-refine", "--no-write"]
    assert fit_beta.main([*common, "--out-dir", str(tmp_path / "tp1")]) == 0
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "recalibration.fit_beta",
            *common,
            "--out-dir",
            str(tmp_path / "tp2"),
            "--tensor-parallel-size",
            "2",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    tp1, tp2 = (json.loads((tmp_path / d / "fit_beta.json").read_text())["table"] for d in ("tp1", "tp2"))
    # Both ranks' runs take the same search path (the grid may be extended upward when 0.4 wins).
    assert tp1.keys() == tp2.keys() and {"0", "0.4"} <= tp1.keys()
    for c in tp1:
        for n, p in tp1[c].items():
            assert abs(tp2[c][n] / p - 1) <= 1e-4, (c, n, tp2[c][n], p)
    assert tp1["0"] != tp1["0.4"]


def test_evaluate_on_the_engine_and_through_drope_server(tmp_path):
    """Four rows on the engine; the same DroPE checkpoint measured through drope-server (--base-url) agrees.

    The server runs with ``--beta-mode none`` (end to end: flag, hf_overrides, engine, /v1/models card), so
    its row must be the engine's c = 0 row and not the c = 0.3 one the checkpoint states."""
    from model_patches.convert import convert
    from model_patches.tiny import build_tiny_checkpoint

    parent = build_tiny_checkpoint(tmp_path / "parent", "llama", max_position_embeddings=L, seed=2)
    ckpt = tmp_path / "drope"
    convert(parent, ckpt, attention_type="qk_norm_nope", train_context=L, beta_coef=0.3)
    common = ["--data", "builtin:essays", "--lengths", "1x,2x,4x", "--windows", "2"]
    assert evaluate.main([str(ckpt), "--baseline", str(parent), *common, *ENGINE]) == 0
    result = json.loads((ckpt / "evaluate" / "evaluate.json").read_text())
    ppl = result["perplexity"]
    assert list(ppl) == ["DroPE (c=0.3)", "DroPE (c=0)", "RoPE", "RoPE + YaRN x4"] and result["complete"]
    assert ppl["DroPE (c=0.3)"]["64"] == ppl["DroPE (c=0)"]["64"]  # beta = 1 up to L_train ...
    assert ppl["DroPE (c=0.3)"]["256"] != ppl["DroPE (c=0)"]["256"]  # ... and not past it
    assert ppl["RoPE + YaRN x4"]["256"] != ppl["RoPE"]["256"]  # the YaRN overrides reached the engine
    assert (ckpt / "evaluate" / "evaluate.png").exists()

    proc, base, _ = launch_server(ckpt, tmp_path, "--max-model-len", str(4 * L + 1), "--beta-mode", "none")
    try:
        card = httpx.get(base + "/v1/models").json()["data"][0]["drope"]
        assert (card["beta_mode"], card["beta_coef"]) == ("none", 0.3)
        out = tmp_path / "served"
        assert evaluate.main(["--base-url", base, "--tokenizer", str(ckpt), *common, "--out-dir", str(out)]) == 0
    finally:
        stop_server(proc)
    served = json.loads((out / "evaluate.json").read_text())
    assert served["train_context"] == L  # read from drope-server's /v1/models DroPE card
    (row,) = served["perplexity"].values()
    for n, p in ppl["DroPE (c=0)"].items():
        assert abs(row[n] / p - 1) <= 1e-4, (n, row[n], p)
    assert abs(row["256"] / ppl["DroPE (c=0.3)"]["256"] - 1) > 1e-3
