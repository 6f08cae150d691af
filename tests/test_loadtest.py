"""loadtest.bench and loadtest.niah against a real server on a tiny model, plus their pure parts.

    python -m pytest tests/test_loadtest.py
"""

from __future__ import annotations

import json
import random
import signal

import numpy as np
import pytest
from conftest import launch_server, scrape_metrics

from loadtest import bench, niah
from loadtest.endpoint import EndpointError, connect
from loadtest.text import TokenCorpus
from model_patches.config import DropeConfig


@pytest.fixture(scope="module")
def tiny_server(tiny_checkpoint, tmp_path_factory):
    ckpt = tiny_checkpoint("llama", DropeConfig(train_context=256, beta_coef=0.2), seed=8)
    proc, base, _ = launch_server(ckpt, tmp_path_factory.mktemp("lt"), "--served-model-name", "tiny",
                                  "--max-model-len", "2048")
    yield base, ckpt
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)


def test_bench_counts_match_server_metrics(tiny_server, tmp_path, capsys):
    base, _ = tiny_server
    before = scrape_metrics(base)
    out = tmp_path / "bench.json"
    rc = bench.main(["--base-url", base, "--input-len", "96", "--output-len", "12", "--num-requests", "12",
                     "--max-concurrency", "4", "--request-rate", "50", "--warmup", "0", "--quiet", "--out", str(out)])
    assert rc == 0
    after = scrape_metrics(base)
    res = json.loads(out.read_text())["results"]
    (r,) = res.values()
    assert r["completed"] == 12 and r["failed"] == 0
    assert after["vllm:request_success_total"] - before.get("vllm:request_success_total", 0) == 12
    assert after["vllm:prompt_tokens_total"] - before.get("vllm:prompt_tokens_total", 0) == r["input_tokens"] == 12 * 96
    assert after["vllm:generation_tokens_total"] - before.get("vllm:generation_tokens_total", 0) == r["output_tokens"] == 12 * 12
    assert 0 < r["ttft_s"]["p50"] <= r["e2el_s"]["p50"] and r["tpot_s"]["mean"] > 0
    text = capsys.readouterr().out
    assert "TTFT p99 (ms)" in text and "output throughput (tok/s)" in text


def test_bench_compare_prints_ratios(tiny_server, capsys):
    base, _ = tiny_server
    rc = bench.main(["--base-url", base, "--compare", base, "--endpoint", "chat", "--input-len", "64",
                     "--output-len", "8", "--num-requests", "4", "--warmup", "1", "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "ratio 2/1" in text and "server 2:" in text


def test_bench_clear_errors(tiny_server, capsys):
    base, _ = tiny_server
    assert bench.main(["--base-url", "http://127.0.0.1:9", "--num-requests", "1"]) == 2
    assert "cannot reach" in capsys.readouterr().err
    assert bench.main(["--base-url", base, "--model", "gpt-4", "--num-requests", "1"]) == 2
    assert "does not serve 'gpt-4'" in capsys.readouterr().err
    assert bench.main(["--base-url", base, "--input-len", "4000", "--num-requests", "1"]) == 2
    assert "advertises max_model_len 2048" in capsys.readouterr().err


def test_percentiles_match_numpy():
    xs = [random.Random(1).random() for _ in range(101)]
    got = bench.percentiles(xs)
    for q in (50, 90, 99):
        assert got[f"p{q}"] == pytest.approx(float(np.percentile(xs, q)))
    assert got["mean"] == pytest.approx(float(np.mean(xs)))


@pytest.fixture(scope="module", params=["bytes", "smollm2"])
def corpus(request, tiny_checkpoint):
    from transformers import AutoTokenizer

    if request.param == "bytes":
        tok = AutoTokenizer.from_pretrained(tiny_checkpoint("llama", None))
    else:
        from model_patches.assets import smollm2_hf_dir

        tok = AutoTokenizer.from_pretrained(smollm2_hf_dir())
    return TokenCorpus(tok)


@pytest.mark.parametrize("variant", niah.VARIANTS)
@pytest.mark.parametrize("length,depth", [(1200, 0.0), (2000, 0.5), (3000, 1.0), (1500, 0.3)])
def test_niah_prompt_is_exact_and_needles_sit_at_their_depths(corpus, variant, length, depth):
    t = niah.build_trial(corpus, variant, length, depth, seed=3)
    tok = corpus.tokenizer
    assert len(t.prompt_ids) == length
    text = tok.decode(t.prompt_ids)
    n_needles = 1 if variant == "single" else niah.N_MULTI
    assert text.count("One of the special magic numbers for") == n_needles
    for v in t.expected:
        assert v in text
    head = len(tok.encode(niah.INSTRUCTION, add_special_tokens=True))
    tail = len(tok.encode(t.question, add_special_tokens=False))
    lens = [len(tok.encode(" " + n + " ", add_special_tokens=False)) for n in t.needles]
    for i, pos in enumerate(t.needle_token_positions):
        assert t.prompt_ids[pos:pos + lens[i]] == tok.encode(" " + t.needles[i] + " ", add_special_tokens=False)
    assert len(set(t.needle_token_positions)) == n_needles
    # The needle asked about (needle 0, whose value is expected first) sits at the requested depth of the
    # context between instruction and question, measured in the prompt: up to a sentence snap (< 64
    # tokens) and the other needles' lengths away. Depth 1.0 means the end, not the start.
    span = length - head - tail
    at = (t.needle_token_positions[0] - head) / span
    slack = (64 + sum(lens)) / span
    assert abs(at - depth) <= slack, (at, depth)
    assert t.expected[0] in t.needles[0]
    # Tokenizing the decoded text agrees with the ids (no hidden merges across needle seams, within a few tokens).
    assert abs(len(tok.encode(text, add_special_tokens=False)) - length) <= 8


def test_niah_scoring():
    assert niah.score(" 4132801.", ["4132801"])
    assert niah.score("The numbers are 1111111, 2222222 and 3333333.", ["3333333", "1111111"])
    assert not niah.score("The number is 41328011.", ["4132801"])  # not a whole 7-digit number
    assert not niah.score("1111111 and 2222222", ["1111111", "3333333"])  # one missing fails multi variants
    assert not niah.score("", ["1234567"])


def test_niah_end_to_end_with_compare(tiny_server, tmp_path, capsys):
    base, _ = tiny_server
    rc = niah.main(["--base-url", base, "--compare", base, "--lengths", "1100", "--depths", "0,1",
                    "--variants", "single,multivalue", "--max-tokens", "8", "--out-dir", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())
    trials = res["server1"]["trials"]
    assert len(trials) == 4 and all(t["error"] is None for t in trials)
    # A random-weight model answers noise: the scorer must say so, not pass it.
    assert all(t["correct"] == niah.score(t["answer"], t["expected"]) for t in trials)
    assert (tmp_path / "server1" / "heatmap_single.png").stat().st_size > 1000
    assert "diff 2-1" in capsys.readouterr().out
    assert niah.main(["--base-url", base, "--lengths", "4000", "--out-dir", str(tmp_path)]) == 2
    assert niah.main(["--base-url", base, "--variants", "haystack", "--out-dir", str(tmp_path)]) == 2


def test_connect_lists_served_models(tiny_server):
    base, _ = tiny_server
    ep = connect(base, None)
    assert ep.model == "tiny" and ep.max_model_len == 2048
    with pytest.raises(EndpointError, match="serves"):
        connect(base, "other")
