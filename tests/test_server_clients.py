"""Real clients against the real server: lm-evaluation-harness, and a storm of hung-up streams.

    python -m pytest tests/test_server_clients.py        # both are marked slow (about a minute each)

One server on a tiny DroPE checkpoint with room for the load (16 sequences, a
queue of 512): lm-eval's ``local-completions`` backend with ``batch_size 4``
(batched prompts in one /v1/completions request) runs a loglikelihood task and a
generate_until task from local files; then 300 concurrent streamed requests, 30%
of which hang up mid-stream, must leave no 5xx, no request behind and no memory
growth.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from model_patches.config import DropeConfig

from helpers import launch_server, scrape_metrics, stop_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    ckpt = tiny_checkpoint("llama", DropeConfig(train_context=64, beta_coef=0.3), seed=8)
    proc, base, log = launch_server(
        ckpt,
        tmp_path_factory.mktemp("clients"),
        "--served-model-name",
        "tiny",
        "--max-num-seqs",
        "16",
        "--max-queue",
        "512",
    )
    yield {"base": base, "proc": proc, "ckpt": ckpt, "log": log}
    stop_server(proc)


TASKS = {
    "drope_choice": """
task: drope_choice
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list: [{{metric: acc}}]
""",
    "drope_gen": """
task: drope_gen
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs: {{until: ["\\n"], max_gen_toks: 8, do_sample: false}}
metric_list: [{{metric: exact_match}}]
""",
}


def test_lm_eval_local_completions_batched(server, tmp_path):
    rows = [
        {"question": f"Question {i}: which colour?", "choices": ["red", "green", "blue"], "answer": i % 3}
        for i in range(6)
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    gen = tmp_path / "gen.jsonl"
    gen.write_text("".join(json.dumps({"question": r["question"], "answer": "red"}) + "\n" for r in rows))
    for name, spec in TASKS.items():
        (tmp_path / f"{name}.yaml").write_text(spec.format(data=gen if name == "drope_gen" else data))
    before = scrape_metrics(server["base"])
    out = tmp_path / "out"
    model_args = (
        f"model=tiny,base_url={server['base']}/v1/completions,tokenizer={server['ckpt']},"
        "tokenizer_backend=huggingface,tokenized_requests=True,max_retries=1"
    )
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "lm_eval",
            "--model",
            "local-completions",
            "--model_args",
            model_args,
            "--tasks",
            "drope_choice,drope_gen",
            "--include_path",
            str(tmp_path),
            "--batch_size",
            "4",
            "--output_path",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    (results_file,) = out.rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"]
    assert 0.0 <= results["drope_choice"]["acc,none"] <= 1.0
    assert 0.0 <= results["drope_gen"]["exact_match,none"] <= 1.0
    after = scrape_metrics(server["base"])
    # 6 docs x 3 choices scored + 6 generations, each one engine request; sent 4 prompts a request.
    assert after["vllm:request_success_total"] - before.get("vllm:request_success_total", 0) >= 6 * 3 + 6


def _rss(pid: int) -> int:
    p = psutil.Process(pid)
    return sum(q.memory_info().rss for q in [p, *p.children(recursive=True)])


async def _storm(base: str, n: int, hang_up: float, seed: int) -> list[int]:
    rng = random.Random(seed)

    async def one(c: httpx.AsyncClient, i: int) -> int:
        leave_after = rng.randint(0, 3) if rng.random() < hang_up else None
        body = {
            "model": "tiny",
            "prompt": f"request {i} " * rng.randint(1, 8),
            "max_tokens": 32,
            "ignore_eos": True,
            "stream": True,
        }
        async with c.stream("POST", "/v1/completions", json=body) as r:
            seen = 0
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    seen += 1
                    if leave_after is not None and seen > leave_after:
                        break  # hang up: the context manager closes the connection
            return r.status_code

    limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as c:
        return await asyncio.gather(*[one(c, i) for i in range(n)])


def test_storm_of_streams_with_random_disconnects(server):
    base, pid = server["base"], server["proc"].pid
    asyncio.run(_storm(base, 50, 0.3, seed=0))  # warm-up: allocator pools, tokenizer caches
    time.sleep(1)
    rss_before = _rss(pid)
    codes = asyncio.run(_storm(base, 300, 0.3, seed=1))
    assert codes == [200] * 300, sorted(set(codes))
    deadline = time.time() + 30
    while time.time() < deadline:
        m = scrape_metrics(base)
        if m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0:
            break
        time.sleep(0.2)
    assert m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0
    time.sleep(1)
    rss_after = _rss(pid)
    assert rss_after <= 1.10 * rss_before, (rss_before / 2**20, rss_after / 2**20)
    r = httpx.post(base + "/v1/completions", json={"model": "tiny", "prompt": "still ok", "max_tokens": 4}, timeout=30)
    assert r.status_code == 200


@pytest.mark.upstream
def test_tokenising_a_huge_prompt_does_not_stall_other_streams(server):
    """vLLM tokenises in its renderer thread pool: a 2M-byte prompt must not freeze a running stream."""
    base = server["base"]
    huge = "lorem ipsum dolor sit amet " * 80_000  # ~2.2 MB; with the byte tokenizer, ~2.2M tokens

    async def stream_gaps() -> list[float]:
        gaps, last = [], None
        async with httpx.AsyncClient(base_url=base, timeout=120) as c:
            body = {"model": "tiny", "prompt": "x", "max_tokens": 400, "ignore_eos": True, "stream": True}
            async with c.stream("POST", "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        now = time.perf_counter()
                        if last is not None:
                            gaps.append(now - last)
                        last = now
        return gaps

    async def tokenize() -> float:
        await asyncio.sleep(0.2)  # let the stream start
        t0 = time.perf_counter()
        async with httpx.AsyncClient(base_url=base, timeout=120) as c:
            r = await c.post("/tokenize", json={"model": "tiny", "prompt": huge})
        assert r.status_code == 200 and r.json()["count"] >= len(huge)
        return time.perf_counter() - t0

    async def both():
        return await asyncio.gather(stream_gaps(), tokenize())

    gaps, took = asyncio.run(both())
    assert took > 0.3, took  # long enough that a stall would show
    print(f"tokenize {took:.2f} s, longest gap between stream chunks {max(gaps):.3f} s")
    assert max(gaps) < 0.5 * took, (max(gaps), took)
