"""loadtest.bench against a real server on a tiny model, plus its pure parts (RULER: test_ruler.py).

    python -m pytest tests/test_loadtest.py
"""

from __future__ import annotations

import json
import random
import signal

import numpy as np
import pytest
from conftest import launch_server, scrape_metrics

from loadtest import bench
from loadtest.endpoint import EndpointError, connect
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
                     "--max-concurrency", "4", "--request-rate", "50", "--warmup", "0", "--quiet", "--out", str(out),
                     "--goodput", "ttft:60000", "e2el:60000"])
    assert rc == 0
    after = scrape_metrics(base)
    res = json.loads(out.read_text())["results"]
    (r,) = res.values()
    assert r["completed"] == 12 and r["failed"] == 0
    assert after["vllm:request_success_total"] - before.get("vllm:request_success_total", 0) == 12
    assert after["vllm:prompt_tokens_total"] - before.get("vllm:prompt_tokens_total", 0) == r["input_tokens"] == 12 * 96
    assert after["vllm:generation_tokens_total"] - before.get("vllm:generation_tokens_total", 0) == r["output_tokens"] == 12 * 12
    assert 0 < r["ttft_s"]["p50"] <= r["e2el_s"]["p50"] and r["tpot_s"]["mean"] > 0
    assert r["request_goodput"] == r["request_throughput"]  # a minute's SLO: every request is good
    assert out.with_suffix(".cdf.png").stat().st_size > 1000
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


def test_connect_lists_served_models(tiny_server):
    base, _ = tiny_server
    ep = connect(base, None)
    assert ep.model == "tiny" and ep.max_model_len == 2048
    with pytest.raises(EndpointError, match="serves"):
        connect(base, "other")


def _vllm_metrics(results, input_lens, wall, goodput):
    from vllm.benchmarks.lib.endpoint_request_func import RequestFuncOutput
    from vllm.benchmarks.serve import calculate_metrics

    outs = [RequestFuncOutput(success=r.ok, latency=r.latency, output_tokens=r.output_tokens, ttft=r.ttft or 0.0,
                              itl=list(r.itl), prompt_len=r.prompt_tokens or n, start_time=float(i), error=r.error or "")
            for i, (r, n) in enumerate(zip(results, input_lens, strict=True))]
    metrics, _ = calculate_metrics([], outs, wall, None, [50.0, 90.0, 99.0], goodput)
    return metrics


def test_summary_equals_vllm_calculate_metrics():
    """Same per-request outputs through our summary and vLLM's own calculate_metrics: every number agrees.
    The outputs cover what separates the definitions: one-token and zero-usage requests (TPOT, goodput),
    failures, and SLOs that each cut a different subset."""
    from loadtest.endpoint import StreamResult

    rng = random.Random(4)
    results, input_lens = [], []
    for i in range(60):
        n_out = [0, 1, 2, 17, 40][i % 5]
        ttft = rng.uniform(0.01, 0.2)
        itl = [rng.uniform(0.002, 0.03) for _ in range(max(0, n_out - 1))]
        ok = i % 11 != 3
        results.append(StreamResult(ok=ok, error=None if ok else "HTTP 500", ttft=ttft if ok else None,
                                    latency=ttft + sum(itl) if ok else 0.0, itl=itl if ok else [],
                                    output_tokens=n_out if ok else 0, prompt_tokens=rng.choice([0, 90, 128])))
        input_lens.append(128)
    goodput = {"ttft": 150.0, "tpot": 20.0, "e2el": 600.0}
    ours = bench.summarize(results, input_lens, 9.5, goodput)
    ref = _vllm_metrics(results, input_lens, 9.5, goodput)
    assert (ours["completed"], ours["failed"]) == (ref.completed, ref.failed)
    assert (ours["input_tokens"], ours["output_tokens"]) == (ref.total_input, ref.total_output)
    for key in ("request_throughput", "request_goodput", "output_throughput", "total_token_throughput"):
        assert ours[key] == pytest.approx(getattr(ref, key), rel=1e-12), key
    assert 0 < ref.request_goodput < ref.request_throughput  # the SLOs do cut
    for metric in ("ttft", "tpot", "itl", "e2el"):
        assert ours[f"{metric}_s"]["mean"] * 1000 == pytest.approx(getattr(ref, f"mean_{metric}_ms"), rel=1e-9)
        assert ours[f"{metric}_s"]["p50"] * 1000 == pytest.approx(getattr(ref, f"median_{metric}_ms"), rel=1e-9)
        for q, v in getattr(ref, f"percentiles_{metric}_ms"):
            assert ours[f"{metric}_s"][f"p{int(q)}"] * 1000 == pytest.approx(v, rel=1e-9), (metric, q)


def test_bench_agrees_with_vllm_bench_serve_on_one_server(tiny_server):
    """Both tools at once, on one server and one event loop, each with its own random prompts from vLLM's
    sampler (lengths 256-768 in, 16-48 out, EOS ignored, greedy) and concurrency 2: their requests share the
    engine's batches, so load from other jobs on the machine hits both alike. Every mean within 10% of vLLM's.
    Lengths vary because with all requests alike the four streams run in lock-step and whichever client
    sends its next request first is scheduled first: run-level TTFT biases of up to 17% (measured with
    benchmarks/bench_vs_vllm.py, BENCHMARKS.md)."""
    import asyncio
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_vs_vllm import run_both

    base, ckpt = tiny_server
    n = 192
    ours, theirs = asyncio.run(run_both(base, ckpt, num_prompts=n, concurrency=2, input_len=512, output_len=32,
                                        range_ratio=0.5))
    assert ours["completed"] == n and ours["failed"] == 0 and theirs["completed"] == n
    pairs = {f"{m} mean (ms)": (ours[f"{m}_s"]["mean"] * 1000, theirs[f"mean_{m}_ms"])
             for m in ("ttft", "tpot", "itl", "e2el")}
    for key in ("request_throughput", "output_throughput"):
        pairs[key] = (ours[key], theirs[key])
    report = {k: f"ours {a:.3f} vllm {b:.3f} ratio {a / b:.3f}" for k, (a, b) in pairs.items()}
    print(json.dumps(report, indent=1))
    for a, b in pairs.values():
        assert a == pytest.approx(b, rel=0.10), report


def test_bench_keeps_connections_alive(tiny_server):
    """A proxy counts the TCP connections bench opens: one per concurrent stream, as vLLM's client.
    Leaving a stream unread after [DONE] made httpx close the connection, so every request paid a new
    connection set-up inside its TTFT."""
    import asyncio
    from urllib.parse import urlsplit

    base, _ = tiny_server
    target = urlsplit(base)
    accepted = 0

    async def pipe(reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def handle(client_r, client_w):
        nonlocal accepted
        accepted += 1
        try:
            server_r, server_w = await asyncio.open_connection(target.hostname, target.port)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(pipe(client_r, server_w), pipe(server_r, client_w), return_exceptions=True)

    async def go():
        proxy = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = proxy.sockets[0].getsockname()[1]
        ep = await asyncio.to_thread(connect, f"http://127.0.0.1:{port}/v1", None)
        opened_by_connect = accepted
        spec = bench.Spec(input_len=16, output_len=4, num_requests=12, max_concurrency=2, warmup=2, seed=0)
        rows = [([1 + i] * 16, 16, 4) for i in range(12)]
        try:
            res = await bench.run_load(ep, spec, rows, progress=False)
        finally:
            proxy.close()
            await proxy.wait_closed()
        return res, accepted - opened_by_connect

    res, opened = asyncio.run(asyncio.wait_for(go(), 120))
    assert res["completed"] == 12 and res["failed"] == 0
    assert opened <= 2, f"{opened} connections for 14 requests at concurrency 2"


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_sse_events_split_on_lf_or_crlf_across_reads(newline):
    """Servers on sse-starlette end SSE lines with CRLF; a CR and its LF may arrive in different reads."""
    import asyncio

    import httpx

    from loadtest.endpoint import Endpoint, stream_request

    events = [{"choices": [{"index": 0, "text": t}]} for t in ("a", "b", "c")]
    events.append({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}})
    raw = "".join(f"data: {json.dumps(e)}{newline}{newline}" for e in events) + f"data: [DONE]{newline}{newline}"
    cut = raw.index("\r") + 1 if "\r" in raw else 7  # a read boundary between CR and LF

    async def body():
        for part in (raw[:cut], raw[cut:]):
            yield part.encode()

    async def go():
        transport = httpx.MockTransport(lambda request: httpx.Response(200, content=body()))
        async with httpx.AsyncClient(transport=transport) as client:
            return await stream_request(client, Endpoint("http://x/v1", "m", None, None), "completions", [1, 2], 3)

    r = asyncio.run(go())
    assert r.ok and r.text == "abc" and len(r.itl) == 2 and (r.prompt_tokens, r.output_tokens) == (5, 3), r


@pytest.mark.parametrize("after_done", ["more bytes", "broken connection", "stays open"])
def test_a_stream_is_complete_at_done_whatever_follows(after_done, monkeypatch):
    """The rest of the body is read after [DONE] (so httpx keeps the connection), but what comes there
    cannot fail or stall a complete answer: other servers and proxies may send more, drop the connection
    without the chunked terminator, or keep it open."""
    import asyncio

    import httpx

    from loadtest import endpoint

    monkeypatch.setattr(endpoint, "DRAIN_S", 0.2)
    events = [{"choices": [{"index": 0, "text": t}]} for t in ("a", "b")]
    raw = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"

    async def body():
        yield raw.encode()
        if after_done == "more bytes":
            yield b": ping\n\ndata: {not json}\n\n"
        elif after_done == "broken connection":
            raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")
        else:
            await asyncio.sleep(3600)

    async def go():
        transport = httpx.MockTransport(lambda request: httpx.Response(200, content=body()))
        async with httpx.AsyncClient(transport=transport) as client:
            ep = endpoint.Endpoint("http://x/v1", "m", None, None)
            return await asyncio.wait_for(endpoint.stream_request(client, ep, "completions", [1, 2], 2), 10)

    r = asyncio.run(go())
    assert r.ok and r.text == "ab" and len(r.itl) == 1, r
