"""loadtest.bench (vLLM's benchmark engine on our prose prompts) against a real server on a tiny model
(RULER: test_ruler.py).

    python -m pytest tests/test_loadtest.py
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import io
import json
import os
import signal
import threading
import time

import numpy as np
import pytest

from loadtest import bench
from loadtest.endpoint import EndpointError, connect
from model_patches.config import DropeConfig

from helpers import launch_server, scrape_metrics, stop_server


@pytest.fixture(scope="module")
def tiny_server(tiny_checkpoint, tmp_path_factory):
    ckpt = tiny_checkpoint("llama", DropeConfig(train_context=256, beta_coef=0.2), seed=8)
    proc, base, _ = launch_server(
        ckpt, tmp_path_factory.mktemp("lt"), "--served-model-name", "tiny", "--max-model-len", "2048"
    )
    yield base, ckpt
    stop_server(proc)


def counter_deltas(before: dict, after: dict) -> dict[str, float]:
    names = ("vllm:request_success_total", "vllm:prompt_tokens_total", "vllm:generation_tokens_total")
    return {n.split(":")[1]: after.get(n, 0) - before.get(n, 0) for n in names}


@pytest.fixture(scope="module")
def bench_run(tiny_server, tmp_path_factory):
    """One CLI run, with vLLM's benchmark() wrapped to keep what it returns itself:
    (results JSON, stdout, server counter deltas, benchmark()'s own results)."""
    from vllm.benchmarks import serve

    base, _ = tiny_server
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    theirs, real = [], serve.benchmark

    async def keep(**kw):
        theirs.append(await real(**kw))
        return theirs[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(serve, "benchmark", keep)
        before, stdout = scrape_metrics(base), io.StringIO()
        with contextlib.redirect_stdout(stdout):
            rc = bench.main(
                [
                    "--base-url",
                    base,
                    "--input-len",
                    "96",
                    "--output-len",
                    "12",
                    "--num-prompts",
                    "12",
                    "--max-concurrency",
                    "4",
                    "--request-rate",
                    "50",
                    "--num-warmups",
                    "2",
                    "--quiet",
                    "--out",
                    str(out),
                    "--goodput",
                    "ttft:60000",
                    "e2el:60000",
                ]
            )
        deltas = counter_deltas(before, scrape_metrics(base))
    assert rc == 0
    return json.loads(out.read_text()), stdout.getvalue(), deltas, theirs, out


def recomputed(r: dict):
    """vLLM's calculate_metrics on a run's recorded outputs, as stored in the results JSON."""
    from vllm.benchmarks.lib.endpoint_request_func import RequestFuncOutput
    from vllm.benchmarks.serve import calculate_metrics

    outputs = [RequestFuncOutput(**s) for s in r["samples"]]
    metrics, _ = calculate_metrics([], outputs, r["duration"], None, bench.PERCENTILES, r["goodput_slo_ms"] or {})
    return metrics


def assert_summary_is(r: dict, metrics) -> None:
    for key, value in vars(metrics).items():
        got = r[key]
        if key.startswith("percentiles_"):
            got = [tuple(x) for x in got]
        assert got == value, key  # the same floats, summed in the same order: no tolerance


def test_summary_is_vllms_own_metrics_of_the_same_outputs(bench_run):
    """The summary (JSON and table) is what vLLM's benchmark() computed for the run, and what its
    calculate_metrics gives on the outputs the JSON records; the 2 warm-ups are in neither."""
    record, stdout, _, theirs, _ = bench_run
    r, (v,) = record["results"]["server1"], theirs
    assert len(r["samples"]) == 12 and r["completed"] == v["completed"] == 12
    assert_summary_is(r, recomputed(r))
    keys = {
        "failed": "failed",
        "total_input": "total_input_tokens",
        "total_output": "total_output_tokens",
        "request_throughput": "request_throughput",
        "request_goodput": "request_goodput",
        "output_throughput": "output_throughput",
        "total_token_throughput": "total_token_throughput",
        "max_output_tokens_per_s": "max_output_tokens_per_s",
    }
    assert {k: r[k] for k in keys} == {k: v[t] for k, t in keys.items()}
    table = {line[:30].strip(): line[30:].split() for line in stdout.splitlines()}
    for m in bench.METRICS:
        assert (r[f"mean_{m}_ms"], r[f"median_{m}_ms"], r[f"std_{m}_ms"]) == (
            v[f"mean_{m}_ms"],
            v[f"median_{m}_ms"],
            v[f"std_{m}_ms"],
        ), m
        for stat in ("mean", "p50", "p90", "p99"):
            want = v[f"{stat}_{m}_ms"]
            assert bench.stat(r, m, stat) == want, (m, stat)
            assert table[f"{m.upper()} {stat} (ms)"] == [f"{want:.2f}"], (m, stat)
    assert table["request throughput (req/s)"] == [f"{v['request_throughput']:.2f}"]


def test_bench_end_to_end_counts_match_the_server(bench_run):
    """Exact prompt lengths in the server's tokens: its own counters see 12 requests of 96 + 12 tokens,
    plus vLLM's 2 warm-ups (the first prompt again)."""
    record, stdout, deltas, _, out = bench_run
    r = record["results"]["server1"]
    assert deltas == {"request_success_total": 14, "prompt_tokens_total": 14 * 96, "generation_tokens_total": 14 * 12}
    assert (r["completed"], r["failed"], r["total_input"], r["total_output"]) == (12, 0, 12 * 96, 12 * 12)
    assert 0 < r["median_ttft_ms"] <= r["median_e2el_ms"] and r["mean_tpot_ms"] > 0
    assert r["request_goodput"] == r["request_throughput"]  # a minute's SLO: every request is good
    assert record["command"].startswith("python -m loadtest.bench --base-url") and record["versions"]["vllm"]
    assert r["card"]["id"] == "tiny" and r["card"]["max_model_len"] == 2048
    assert out.with_suffix(".cdf.png").stat().st_size > 1000
    assert "TTFT p99 (ms)" in stdout and "output throughput (tok/s)" in stdout


def test_same_flags_drive_vllms_benchmark_as_vllm_bench_serve_does(tiny_server, monkeypatch):
    """No tolerance: for the same flags, bench calls vLLM's benchmark() with the arguments and the arrival
    RNG state `vllm bench serve` (its main_async) calls it with, and with its random dataset's lengths.
    This replaces running both tools at once and allowing 10%: they are one function now.
    By design different: the request function (vLLM's, recorded), the tokenizer (the server's), the prompts
    (prose, not random tokens) and the percentiles (the table's)."""
    import random

    from vllm.benchmarks import serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    base, ckpt = tiny_server
    calls, signature = [], inspect.signature(serve.benchmark)

    class Called(Exception):
        pass

    async def spy(**kw):
        args = signature.bind(**kw)
        args.apply_defaults()
        calls.append((args.arguments, np.random.get_state()[1].copy(), random.getstate()))
        raise Called

    monkeypatch.setattr(serve, "benchmark", spy)
    flags = [
        "--input-len",
        "64",
        "--output-len",
        "8",
        "--random-range-ratio",
        "0.5",
        "--num-prompts",
        "6",
        "--max-concurrency",
        "2",
        "--request-rate",
        "5",
        "--burstiness",
        "0.5",
        "--temperature",
        "0",
        "--num-warmups",
        "1",
        "--seed",
        "3",
        "--goodput",
        "ttft:1000",
        "tpot:50",
    ]
    parser = FlexibleArgumentParser()
    serve.add_cli_args(parser)
    args = parser.parse_args(
        ["--base-url", base, "--model", "tiny", "--tokenizer", str(ckpt), "--dataset-name", "random", *flags]
    )
    try:
        with pytest.raises(Called):
            bench.main(["--base-url", base, *flags])
        with pytest.raises(Called), contextlib.redirect_stdout(io.StringIO()):
            asyncio.run(serve.main_async(args))
    finally:
        gc.unfreeze()  # main_async froze the heap
    (ours, our_np, our_random), (theirs, their_np, their_random) = calls
    assert (our_np == their_np).all() and our_random == their_random
    by_design = {"endpoint_type", "tokenizer", "input_requests", "selected_percentile_metrics", "selected_percentiles"}
    assert {k: v for k, v in ours.items() if k not in by_design} == {
        k: v for k, v in theirs.items() if k not in by_design
    }
    # Output lengths are drawn after the input lengths from the same seeded generator: equal lists mean the
    # same draws. (vLLM's random prompts then miss their drawn lengths by a few tokens after decoding and
    # re-encoding; prose windows hit them.)
    out_lens = [[r.expected_output_len for r in x["input_requests"]] for x in (ours, theirs)]
    assert out_lens[0] == out_lens[1] and len(set(out_lens[0])) > 1  # the range ratio does vary them
    assert ours["endpoint_type"].startswith("loadtest-openai-")


def test_compare_sends_the_same_requests_to_both(tiny_server, tmp_path, capsys):
    base, _ = tiny_server
    out = tmp_path / "ab.json"
    before = scrape_metrics(base)
    rc = bench.main(
        [
            "--base-url",
            base,
            "--compare",
            base,
            "--model2",
            "tiny",
            "--endpoint",
            "chat",
            "--input-len",
            "64",
            "--output-len",
            "8",
            "--range-ratio",
            "0.5",
            "--num-prompts",
            "4",
            "--num-warmups",
            "0",
            "--quiet",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    deltas = counter_deltas(before, scrape_metrics(base))
    runs = json.loads(out.read_text())["results"]
    assert sorted(runs) == ["server1", "server2"]
    one, two = runs["server1"], runs["server2"]
    assert one["completed"] == two["completed"] == 4
    assert [s["prompt_len"] for s in one["samples"]] == [s["prompt_len"] for s in two["samples"]]
    assert deltas["request_success_total"] == 8 and deltas["prompt_tokens_total"] == 2 * one["total_input"]
    text = capsys.readouterr().out
    assert "ratio 2/1" in text and "server 2:" in text


def test_ctrl_c_summarises_what_finished(tiny_server, tmp_path, capsys):
    """SIGINT once three requests are done: bench stops at once (400 requests at 8/s would take 50 s),
    skips the second server, and summarises the finished ones as vLLM would; requests in flight count
    as failed, requests never sent do not count."""
    base, _ = tiny_server
    out = tmp_path / "partial.json"
    start = scrape_metrics(base).get("vllm:request_success_total", 0)

    def interrupt():
        deadline = time.time() + 60
        while time.time() < deadline and scrape_metrics(base).get("vllm:request_success_total", 0) < start + 3:
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=interrupt, daemon=True)
    t0 = time.time()
    thread.start()
    try:
        rc = bench.main(
            [
                "--base-url",
                base,
                "--compare",
                base,
                "--input-len",
                "32",
                "--output-len",
                "8",
                "--num-prompts",
                "400",
                "--request-rate",
                "8",
                "--num-warmups",
                "0",
                "--quiet",
                "--out",
                str(out),
            ]
        )
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C was not handled")
    thread.join()
    assert rc == 0 and time.time() - t0 < 40
    runs = json.loads(out.read_text())["results"]
    assert list(runs) == ["server1"]
    r = runs["server1"]
    assert r["interrupted"] and r["completed"] >= 3 and r["completed"] + r["failed"] < 400
    assert all(s["error"] == bench.CANCELLED for s in r["samples"] if not s["success"])
    assert_summary_is(r, recomputed(r))
    captured = capsys.readouterr()
    assert "interrupted: partial results" in captured.err and "TTFT p99 (ms)" in captured.out


def test_duration_caps_the_requests_at_the_rate():
    assert bench.Spec(num_requests=100, duration=2.5, request_rate=4).count == 10
    assert bench.Spec(num_requests=6, duration=2.5, request_rate=4).count == 6
    with pytest.raises(EndpointError, match="finite rate"):
        bench.Spec(duration=2.5)


def test_bench_clear_errors(tiny_server, capsys):
    base, _ = tiny_server
    assert bench.main(["--base-url", "http://127.0.0.1:9", "--num-requests", "1"]) == 2
    assert "cannot reach" in capsys.readouterr().err
    assert bench.main(["--base-url", base, "--model", "gpt-4", "--num-requests", "1"]) == 2
    assert "does not serve 'gpt-4'" in capsys.readouterr().err
    assert bench.main(["--base-url", base, "--input-len", "4000", "--num-requests", "1"]) == 2
    assert "advertises max_model_len 2048" in capsys.readouterr().err
    assert bench.main(["--base-url", base, "--goodput", "latency:5", "--num-requests", "1"]) == 2
    assert "Invalid metric name" in capsys.readouterr().err
    assert bench.main(["--base-url", base, "--range-ratio", "1.5", "--num-requests", "1"]) == 2
    assert "[0, 1)" in capsys.readouterr().err


def test_connect_lists_served_models(tiny_server):
    base, _ = tiny_server
    ep = connect(base, None)
    assert ep.model == "tiny" and ep.max_model_len == 2048
    with pytest.raises(EndpointError, match="serves"):
        connect(base, "other")
