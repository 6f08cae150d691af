"""The real server in a subprocess, driven with the official openai client as a user would.

One server on a tiny DroPE checkpoint (L_train 64, beta c = 0.3, max context
8 x 64 = 512) with an API key, 2 concurrent sequences, a queue of 1 and a 64 KiB
body limit, so every error path is reachable. Every error is followed by a
successful request: the server must stay healthy. The last test sends SIGTERM.

    python -m pytest tests/test_server.py
"""

from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
import openai
import pytest
import torch
from conftest import launch_server as launch
from conftest import scrape_metrics
from test_vllm_parity import prompt, reference_run

from model_patches.config import DropeConfig
from model_patches.reference import load_reference

KEY = "test-key-123"
L = 64


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    ckpt = tiny_checkpoint("llama", DropeConfig(train_context=L, beta_coef=0.3, attention_type="qk_norm_nope"), seed=21)
    proc, base, log = launch(ckpt, tmp_path_factory.mktemp("server"), "--served-model-name", "tiny-drope",
                             "--api-key", KEY, "--max-num-seqs", "2", "--max-queue", "1", "--max-body", "64KiB",
                             "--shutdown-grace", "5")
    yield {"base": base, "proc": proc, "ckpt": ckpt, "log": log}
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server["base"] + "/v1", api_key=KEY, max_retries=0)


def post(server, path, body=None, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server["base"] + path, json=body, headers=headers, timeout=30, **kw)


def assert_healthy(client):
    r = client.completions.create(model="tiny-drope", prompt="ok", max_tokens=2, temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop")


def metric_samples(server) -> dict[str, float]:
    return scrape_metrics(server["base"])


def test_models_card_carries_drope_metadata(client):
    (card,) = client.models.list().data
    assert card.id == "tiny-drope"
    extra = card.model_extra
    assert extra["max_model_len"] == 8 * L
    assert extra["drope"]["train_context"] == L and extra["drope"]["beta_coef"] == 0.3
    assert extra["drope"]["attention_type"] == "qk_norm_nope"


def test_completion_stream_equals_whole_and_usage_adds_up(client):
    kw = dict(model="tiny-drope", prompt="The quick brown fox", max_tokens=24, temperature=0)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == whole.choices[0].finish_reason
    u = whole.usage
    assert u.prompt_tokens == len("The quick brown fox".encode()) and u.completion_tokens == 24
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert chunks[-1].usage.total_tokens == u.total_tokens


def test_chat_stream_equals_whole(client):
    kw = dict(model="tiny-drope", messages=[{"role": "user", "content": "Say something."}], max_tokens=20, temperature=0)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content
    assert sum(1 for c in chunks if c.choices[0].finish_reason) == 1
    assert whole.usage.completion_tokens == 20
    lp = client.chat.completions.create(logprobs=True, top_logprobs=3, **kw).choices[0].logprobs.content
    assert len(lp) == 20 and all(len(t.top_logprobs) == 3 for t in lp)


def test_sampling_fields_are_honoured(client):
    base = dict(model="tiny-drope", prompt="abc", max_tokens=16)
    a = client.completions.create(temperature=1.0, seed=7, **base).choices[0].text
    b = client.completions.create(temperature=1.0, seed=7, **base).choices[0].text
    assert a == b  # same seed, same sample
    r = client.completions.create(temperature=0.8, top_p=0.9, extra_body={"top_k": 20}, n=3, seed=1, **base)
    assert sorted(c.index for c in r.choices) == [0, 1, 2] and r.usage.completion_tokens == 48
    r = client.completions.create(temperature=0, logprobs=2, echo=True, **base)
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith("abc") and len(lp.tokens) == 3 + 16 and lp.token_logprobs[0] is None


def test_long_prompt_past_train_context_matches_reference(client, server):
    """s = 200 / 64 > 3: the server's greedy answer is the transformers reference's."""
    ids = prompt(200, seed=33)
    r = client.completions.create(model="tiny-drope", prompt=ids, max_tokens=12, temperature=0, logprobs=0,
                                  extra_body={"return_token_ids": True})
    ref = load_reference(server["ckpt"])
    _, toks, glp = reference_run(ref, ids)
    assert r.choices[0].model_extra["token_ids"] == toks
    got = torch.tensor(r.choices[0].logprobs.token_logprobs)
    torch.testing.assert_close(got, glp.float(), atol=1e-4, rtol=0)


def test_error_envelopes_and_server_stays_healthy(server, client):
    cases = [
        (lambda: post(server, "/v1/completions", {"model": "tiny-drope", "prompt": "x" * 500, "max_tokens": 100}),
         400, "maximum context length is 512"),
        (lambda: httpx.post(server["base"] + "/v1/completions", content=b"{not json",
                            headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}),
         400, "not valid JSON"),
        (lambda: post(server, "/v1/completions", {"model": "tiny-drope", "prompt": "x", "max_tokens": "many"}), 400, "max_tokens"),
        (lambda: post(server, "/v1/completions", {"model": "tiny-drope", "prompt": "x", "temperature": -1}), 400, "temperature"),
        (lambda: post(server, "/v1/completions", {"model": "tiny-drope", "prompt": [5, 10**9]}), 400, "out of range"),
        (lambda: post(server, "/v1/completions", {"model": "tiny-drope", "prompt": "x", "stop": ["a", ""]}), 400, "stop"),
        (lambda: post(server, "/v1/completions", {"model": "tiny-drope", "prompt": ""}), 400, "empty"),
        (lambda: post(server, "/v1/completions", {"model": "tiny-drope", "prompt": "x", "echo": True, "stream": True}),
         400, "echo"),
        (lambda: post(server, "/v1/chat/completions", {"model": "tiny-drope", "messages": []}), 400, "messages"),
        (lambda: post(server, "/v1/completions", {"model": "gpt-4", "prompt": "x"}), 404, "does not exist"),
        (lambda: post(server, "/v1/completions", {"model": "tiny-drope", "prompt": "x"}, key=None), 401, "API key"),
        (lambda: post(server, "/v1/completions", {"model": "tiny-drope", "prompt": "x"}, key="wrong"), 401, "API key"),
        (lambda: post(server, "/v1/completions", {"model": "tiny-drope", "prompt": "y" * 100_000}), 413, "limit"),
        (lambda: post(server, "/v1/nothing-here", {}), 404, "Not Found"),
    ]
    for call, status, text in cases:
        r = call()
        assert r.status_code == status, (status, r.text)
        err = r.json()["error"]
        assert text in err["message"] and set(err) == {"message", "type", "param", "code"}
        assert_healthy(client)


def test_no_client_input_produces_a_500(server, client):
    """Every field of both endpoints, set to values of every wrong kind: 200 or a 4xx, never a 500."""
    odd = [None, -1, 0, 10**12, 1e308, -0.5, "text", "", [], [1, -2], {}, {"a": 1}, True]
    templates = {
        "/v1/completions": {"model": "tiny-drope", "prompt": "hi", "max_tokens": 4},
        "/v1/chat/completions": {"model": "tiny-drope", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    }
    fields = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n",
              "logprobs", "top_logprobs", "echo", "stream", "stream_options", "presence_penalty", "ignore_eos"]
    for path, template in templates.items():
        for field in fields:
            for value in odd:
                r = post(server, path, {**template, field: value})
                assert r.status_code < 500, (path, field, value, r.text[:300])
                if r.status_code != 200:
                    assert "error" in r.json()
    assert_healthy(client)


def test_api_key_required_on_v1_but_not_on_health(server, client):
    assert httpx.get(server["base"] + "/v1/models").status_code == 401
    assert httpx.get(server["base"] + "/health").status_code == 200
    assert client.models.list().data[0].id == "tiny-drope"


def test_full_queue_answers_429_with_retry_after(server, client):
    async def one(c):
        return await c.post("/v1/completions", json={"model": "tiny-drope", "prompt": "q", "max_tokens": 400,
                                                     "temperature": 0, "ignore_eos": True})

    async def burst():
        async with httpx.AsyncClient(base_url=server["base"], timeout=60,
                                     headers={"Authorization": f"Bearer {KEY}"}) as c:
            return await asyncio.gather(*[one(c) for _ in range(8)])

    rs = asyncio.run(burst())
    codes = sorted(r.status_code for r in rs)
    assert codes.count(200) >= 3 and codes.count(429) >= 1, codes  # 2 running + 1 queued admitted
    busy = next(r for r in rs if r.status_code == 429)
    assert busy.headers["Retry-After"] == "1" and busy.json()["error"]["code"] == "queue_full"
    assert_healthy(client)


def test_client_disconnect_aborts_the_request(server, client):
    before = metric_samples(server)
    with httpx.stream("POST", server["base"] + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "tiny-drope", "prompt": "z", "max_tokens": 450, "stream": True, "ignore_eos": True},
                      timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # one token in, hang up
    deadline = time.time() + 15
    while time.time() < deadline:
        m = metric_samples(server)
        if m["drope:num_requests_in_flight"] == 0 and m["vllm:num_requests_running"] == 0:
            break
        time.sleep(0.2)
    assert m["drope:num_requests_in_flight"] == 0 and m["vllm:num_requests_running"] == 0
    assert m["drope:requests_aborted_total"] >= before.get("drope:requests_aborted_total", 0) + 1
    assert_healthy(client)


def test_metrics_parse_and_counters_move(server, client):
    before = metric_samples(server)
    client.completions.create(model="tiny-drope", prompt="count me", max_tokens=5, temperature=0)
    after = metric_samples(server)
    for name in ("vllm:prompt_tokens_total", "vllm:generation_tokens_total", "drope:prompt_tokens_total",
                 "vllm:time_to_first_token_seconds_count", "vllm:e2e_request_latency_seconds_count",
                 "drope:extension_factor_count"):
        assert after[name] > before.get(name, 0), name
    assert after["drope:generation_tokens_total"] - before["drope:generation_tokens_total"] == 5
    # Streamed requests count too, with or without include_usage.
    list(client.completions.create(model="tiny-drope", prompt="count me", max_tokens=7, temperature=0, stream=True))
    streamed = metric_samples(server)
    assert streamed["drope:generation_tokens_total"] - after["drope:generation_tokens_total"] == 7
    assert streamed["drope:prompt_tokens_total"] - after["drope:prompt_tokens_total"] == len(b"count me")
    for name in ("vllm:inter_token_latency_seconds_count", "vllm:kv_cache_usage_perc", "vllm:num_requests_waiting"):
        assert name in after, name


def test_tokenize_roundtrip(server):
    r = post(server, "/tokenize", {"prompt": "héllo"}).json()
    assert r["count"] == len("héllo".encode()) and r["max_model_len"] == 8 * L
    assert post(server, "/detokenize", {"tokens": r["tokens"]}).json()["prompt"] == "héllo"
    chat = post(server, "/tokenize", {"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > 2
    assert post(server, "/tokenize", {}).status_code == 400


def test_sigterm_shuts_down_cleanly(server):
    proc = server["proc"]
    proc.send_signal(signal.SIGTERM)
    # uvicorn shuts down gracefully, then re-raises the signal so the exit status says SIGTERM.
    assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    server["log"].seek(0)
    log = server["log"].read()
    assert "shutting down the engine" in log and "Finished server process" in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]


def test_rope_parent_with_yarn_through_the_same_server(tiny_checkpoint, tmp_path):
    """The A/B path: a plain Llama served by vLLM's own class with the user's YaRN scaling."""
    from conftest import vllm_engine
    from test_vllm_parity import vllm_run

    ckpt = tiny_checkpoint("llama", None, seed=4, max_position_embeddings=128)
    # transformers 5 convention: max_position_embeddings is the extended length.
    yarn = {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
                                "rope_theta": 10000.0}, "max_position_embeddings": 512}
    proc, base, log = launch(ckpt, tmp_path, "--hf-overrides", json.dumps(yarn), "--max-model-len", "512")
    try:
        card = httpx.get(base + "/v1/models").json()["data"][0]
        assert card["drope"] is None and card["max_model_len"] == 512
        ids = prompt(400, seed=5)
        r = httpx.post(base + "/v1/completions", json={"model": str(ckpt), "prompt": ids, "max_tokens": 8,
                                                       "temperature": 0, "return_token_ids": True}, timeout=60)
        assert r.status_code == 200, r.text
        served = r.json()["choices"][0]["token_ids"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    with vllm_engine(ckpt, max_model_len=512, hf_overrides=yarn) as llm:
        (offline,) = vllm_run(llm, [ids], prompt_logprobs=False)
    assert served == offline[1][:8]
    # And YaRN really is in effect: without it the same prompt is refused (128-token model).
    with pytest.raises(Exception, match="max_model_len|max_position_embeddings|maximum"):
        with vllm_engine(ckpt, max_model_len=512):
            pass
