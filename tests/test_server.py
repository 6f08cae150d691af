"""The real server in a subprocess, driven with the official openai client as a user would.

One server on a tiny DroPE checkpoint (L_train 64, beta c = 0.3, qk_norm_nope)
with an API key, 2 concurrent sequences, a queue of 2 and a 64 KiB body limit,
so every error path is reachable; its context is raised to 4096 (64 x L_train)
so a long generation outlives a client that hangs up. Every error is followed
by a successful request: the server must stay healthy. The tests share that
server but not its state, so they pass alone and in any order (the CI run shuffles
them); SIGTERM is sent to a server of its own. Tests marked ``upstream`` check vLLM's own
behaviour through our stack (``-m "not upstream"`` leaves them out).

    python -m pytest tests/test_server.py
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest
import torch

from model_patches.config import DropeConfig
from model_patches.reference import load_reference

from helpers import launch_server as launch
from helpers import prompt, reference_run, scrape_metrics, stop_server, vllm_engine, vllm_run

KEY = "test-key-123"
L = 64
CTX = 4096


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    ckpt = tiny_checkpoint("llama", DropeConfig(train_context=L, beta_coef=0.3, attention_type="qk_norm_nope"), seed=21)
    # A random model would pad JSON with whitespace forever; compact JSON is vLLM's own switch.
    proc, base, log = launch(
        ckpt,
        tmp_path_factory.mktemp("server"),
        "--served-model-name",
        "tiny-drope",
        "--api-key",
        KEY,
        "--max-num-seqs",
        "2",
        "--max-queue",
        "2",
        "--max-body",
        "64KiB",
        "--max-model-len",
        str(CTX),
        "--structured-outputs-config",
        '{"backend": "xgrammar", "disable_any_whitespace": true}',
    )
    yield {"base": base, "proc": proc, "ckpt": ckpt, "log": log}
    stop_server(proc)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server["base"] + "/v1", api_key=KEY, max_retries=0)


def post(server, path, body=None, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server["base"] + path, json=body, headers=headers, timeout=30, **kw)


def assert_healthy(client):
    r = client.completions.create(model="tiny-drope", prompt="ok", max_tokens=2, temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop")


def greedy(client, text, n=8):
    return client.completions.create(model="tiny-drope", prompt=text, max_tokens=n, temperature=0).choices[0].text


def test_models_card_reports_what_the_engine_built(client):
    (card,) = client.models.list().data
    assert card.id == "tiny-drope"
    extra = card.model_extra
    assert extra["max_model_len"] == CTX
    drope = extra["drope"]
    assert (drope["train_context"], drope["beta_coef"], drope["beta_mode"]) == (L, 0.3, "log")
    assert drope["attention_type"] == "qk_norm_nope" and drope["max_extension"] == CTX / L


@pytest.mark.upstream
def test_completion_stream_equals_whole_and_usage_adds_up(client):
    kw = dict(model="tiny-drope", prompt="The quick brown fox", max_tokens=24, temperature=0)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == whole.choices[0].finish_reason
    u = whole.usage
    assert u.prompt_tokens == len(b"The quick brown fox") and u.completion_tokens == 24  # byte tokenizer
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert chunks[-1].usage.total_tokens == u.total_tokens


@pytest.mark.upstream
def test_chat_stream_equals_whole(client):
    kw = dict(
        model="tiny-drope", messages=[{"role": "user", "content": "Say something."}], max_tokens=20, temperature=0
    )
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert sum(1 for c in chunks if c.choices and c.choices[0].finish_reason) == 1
    assert whole.usage.completion_tokens == 20
    lp = client.chat.completions.create(logprobs=True, top_logprobs=3, **kw).choices[0].logprobs.content
    assert len(lp) == 20 and all(len(t.top_logprobs) == 3 for t in lp)


@pytest.mark.upstream
def test_sampling_fields_are_honoured(client):
    base = dict(model="tiny-drope", prompt="abc", max_tokens=16)
    a = client.completions.create(temperature=1.0, seed=7, **base).choices[0].text
    b = client.completions.create(temperature=1.0, seed=7, **base).choices[0].text
    assert a == b  # same seed, same sample
    r = client.completions.create(temperature=0.8, top_p=0.9, extra_body={"top_k": 20}, n=3, seed=1, **base)
    assert sorted(c.index for c in r.choices) == [0, 1, 2] and r.usage.completion_tokens == 48
    r = client.completions.create(temperature=0, logprobs=2, echo=True, **base)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == "abc" + greedy(client, "abc", 16)
    assert len(lp.tokens) == 3 + 16 and lp.token_logprobs[0] is None


@pytest.mark.upstream
def test_batched_prompts_equal_one_by_one(client):
    prompts = ["alpha", "a longer second prompt", "3", "the fourth one"]
    r = client.completions.create(model="tiny-drope", prompt=prompts, max_tokens=8, temperature=0)
    assert [c.index for c in sorted(r.choices, key=lambda c: c.index)] == [0, 1, 2, 3]
    batched = [c.text for c in sorted(r.choices, key=lambda c: c.index)]
    assert batched == [greedy(client, p) for p in prompts]
    assert len(set(batched)) > 1  # the answers really are per prompt


@pytest.mark.upstream
def test_logit_bias_forces_a_token(server, client):
    (q,) = post(server, "/tokenize", {"model": "tiny-drope", "prompt": "Q"}).json()["tokens"]
    free = greedy(client, "ab", 5)
    forced = (
        client.completions.create(
            model="tiny-drope", prompt="ab", max_tokens=5, temperature=0, logit_bias={str(q): 100}
        )
        .choices[0]
        .text
    )
    assert forced == "QQQQQ" and free != forced


@pytest.mark.upstream
def test_json_schema_response_format_validates(client):
    schema = {
        "type": "object",
        "properties": {
            "answer": {"type": "string", "enum": ["yes", "no"]},
            "n": {"type": "integer", "minimum": 0, "maximum": 9},
        },
        "required": ["answer", "n"],
        "additionalProperties": False,
    }
    r = client.chat.completions.create(
        model="tiny-drope",
        messages=[{"role": "user", "content": "yes or no?"}],
        max_tokens=60,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
    )
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    # Unknown fields are refused, not silently ignored? vLLM ignores them (and logs a warning);
    # what matters to a client asking for JSON mode is that it is honoured, checked above.


@pytest.mark.upstream
def test_structured_choice(client):
    for p in ("pick one:", "another prompt", "x"):
        r = client.completions.create(
            model="tiny-drope",
            prompt=p,
            max_tokens=10,
            temperature=0,
            extra_body={"structured_outputs": {"choice": ["alpha", "beta", "gamma"]}},
        )
        assert r.choices[0].text in ("alpha", "beta", "gamma")


@pytest.mark.upstream
def test_responses_and_messages_apis_equal_chat(server, client):
    msgs = [{"role": "user", "content": "Say hi"}]
    chat = client.chat.completions.create(model="tiny-drope", messages=msgs, max_tokens=12, temperature=0)
    text = chat.choices[0].message.content
    resp = client.responses.create(model="tiny-drope", input=msgs, max_output_tokens=12, temperature=0)
    assert resp.output_text == text
    m = post(server, "/v1/messages", {"model": "tiny-drope", "messages": msgs, "max_tokens": 12, "temperature": 0})
    assert m.status_code == 200, m.text
    assert "".join(b["text"] for b in m.json()["content"] if b["type"] == "text") == text


def test_long_prompt_past_train_context_matches_reference(client, server):
    """s = 200 / 64 > 3: the server's greedy answer is the transformers reference's."""
    ids = prompt(200, seed=33)
    r = client.completions.create(
        model="tiny-drope", prompt=ids, max_tokens=12, temperature=0, logprobs=0, extra_body={"return_token_ids": True}
    )
    ref = load_reference(server["ckpt"])
    _, toks, glp = reference_run(ref, ids)
    assert r.choices[0].model_extra["token_ids"] == toks
    got = torch.tensor(r.choices[0].logprobs.token_logprobs)
    torch.testing.assert_close(got, glp.float(), atol=1e-4, rtol=0)


def test_error_envelopes_and_server_stays_healthy(server, client):
    cases = [
        # vLLM's wording: "... maximum context length is 4096 tokens ..." with both numbers.
        (
            lambda: post(server, "/v1/completions", {"model": "tiny-drope", "prompt": "x" * 5000, "max_tokens": 100}),
            400,
            "4096",
        ),
        (
            lambda: httpx.post(
                server["base"] + "/v1/completions",
                content=b"{not json",
                headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
            ),
            400,
            "JSON",
        ),
        (
            lambda: post(server, "/v1/completions", {"model": "tiny-drope", "prompt": "x", "max_tokens": "many"}),
            400,
            "max_tokens",
        ),
        (
            lambda: post(server, "/v1/completions", {"model": "tiny-drope", "prompt": "x", "temperature": -1}),
            400,
            "temperature",
        ),
        (lambda: post(server, "/v1/completions", {"model": "tiny-drope", "prompt": [5, 10**9]}), 400, "out of vocab"),
        (lambda: post(server, "/v1/chat/completions", {"model": "tiny-drope", "messages": "hello"}), 400, "messages"),
        (lambda: post(server, "/v1/completions", {"model": "gpt-4", "prompt": "x"}), 404, "does not exist"),
        (lambda: post(server, "/v1/completions", {"model": "tiny-drope", "prompt": "x"}, key=None), 401, "API key"),
        (lambda: post(server, "/v1/completions", {"model": "tiny-drope", "prompt": "x"}, key="wrong"), 401, "API key"),
        (lambda: post(server, "/tokenize", {"prompt": "x"}, key=None), 401, "API key"),
        (lambda: post(server, "/detokenize", {"tokens": [70]}, key="wrong"), 401, "API key"),
        (lambda: post(server, "/v1/completions", {"model": "tiny-drope", "prompt": "y" * 100_000}), 413, "limit"),
        (
            lambda: httpx.post(
                server["base"] + "/v1/completions",
                content=(b"z" * 1024 for _ in range(100)),
                headers={"Authorization": f"Bearer {KEY}"},
            ),
            413,
            "limit",
        ),  # chunked, no length
        (lambda: post(server, "/v1/nothing-here", {}), 404, "Not Found"),
    ]
    for call, status, text in cases:
        r = call()
        assert r.status_code == status, (status, r.text)
        err = r.json()["error"]
        assert text in err["message"], (text, err)
        assert set(err) == {"message", "type", "param", "code"}
        assert_healthy(client)


def test_no_client_input_produces_a_500(server, client):
    """Every field of both endpoints, set to values of every wrong kind: 200 or a 4xx, never a 500."""
    odd = [None, -1, 0, 10**12, 1e308, -0.5, "text", "", [], [1, -2], {}, {"a": 1}, True]
    templates = {
        "/v1/completions": {"model": "tiny-drope", "prompt": "hi", "max_tokens": 4},
        "/v1/chat/completions": {
            "model": "tiny-drope",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
        },
    }
    fields = [
        "model",
        "prompt",
        "messages",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "stop",
        "n",
        "logprobs",
        "top_logprobs",
        "echo",
        "stream",
        "stream_options",
        "presence_penalty",
        "ignore_eos",
        "logit_bias",
        "response_format",
        "min_p",
        "repetition_penalty",
        "min_tokens",
        "stop_token_ids",
    ]
    cases = [(path, field, value) for path in templates for field in fields for value in odd]

    def send(case):
        path, field, value = case
        return post(server, path, {**templates[path], field: value})

    # Three at a time: within the server's admission limit (2 running + 2 queued), so no 429 in the way.
    with ThreadPoolExecutor(3) as pool:
        for case, r in zip(cases, pool.map(send, cases), strict=True):
            assert r.status_code < 500, (*case, r.text[:300])
            if r.status_code != 200:
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}, case
    assert_healthy(client)


def test_api_key_guards_everything_but_health_and_metrics(server, client):
    for path in ("/v1/models", "/version2", "/tokenize"):
        assert httpx.get(server["base"] + path).status_code == 401
    assert httpx.get(server["base"] + "/health").status_code == 200
    assert httpx.get(server["base"] + "/metrics").status_code == 200
    assert client.models.list().data[0].id == "tiny-drope"


def test_full_queue_answers_429_with_retry_after(server, client):
    async def one(c, stream):
        return await c.post(
            "/v1/completions",
            json={
                "model": "tiny-drope",
                "prompt": "q",
                "max_tokens": 400,
                "temperature": 0,
                "ignore_eos": True,
                "stream": stream,
            },
        )

    async def burst(stream):
        async with httpx.AsyncClient(
            base_url=server["base"], timeout=60, headers={"Authorization": f"Bearer {KEY}"}
        ) as c:
            return await asyncio.gather(*[one(c, stream) for _ in range(8)])

    for stream in (False, True):  # vLLM reports a full queue as 503, or as the first event of a 200 stream
        rs = asyncio.run(burst(stream))
        codes = sorted(r.status_code for r in rs)
        assert codes.count(200) >= 4 and codes.count(429) >= 1 and set(codes) <= {200, 429}, codes
        busy = next(r for r in rs if r.status_code == 429)
        assert busy.headers["Retry-After"] == "1" and busy.json()["error"]["code"] == "queue_full"
        assert all("error" not in r.text for r in rs if r.status_code == 200)
    assert scrape_metrics(server["base"])["vllm:admission_rejections_total"] >= 2
    assert_healthy(client)
    server["log"].seek(0)
    assert "QueueOverflowError" not in server["log"].read()  # turned-away requests are not logged as tracebacks


def _wait_idle(server, seconds):
    deadline = time.time() + seconds
    while True:
        m = scrape_metrics(server["base"])
        if (m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0) or time.time() > deadline:
            return m
        time.sleep(0.1)


@pytest.mark.parametrize(
    "path,body,stream",
    [
        ("/v1/completions", {"prompt": "z"}, True),
        ("/v1/completions", {"prompt": "z"}, False),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "z"}]}, False),
        ("/v1/responses", {"input": "z"}, False),
    ],
)
def test_client_disconnect_aborts_the_request(server, client, path, body, stream):
    """A client that hangs up (streamed or not) frees its sequence within 2 s; generation stops."""
    _wait_idle(server, 10)
    limit = {"max_output_tokens": CTX - 64} if path == "/v1/responses" else {"max_tokens": CTX - 64}
    req = {"model": "tiny-drope", "ignore_eos": True, "stream": stream, **body, **limit}
    headers = {"Authorization": f"Bearer {KEY}"}
    if stream:
        with httpx.stream("POST", server["base"] + path, headers=headers, json=req, timeout=30) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break  # one token in, hang up
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server["base"] + path, headers=headers, json=req, timeout=1.0)
    t0 = time.time()
    m = _wait_idle(server, 2.0)
    assert m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0, time.time() - t0
    tokens = m["vllm:generation_tokens_total"]
    time.sleep(0.5)
    assert scrape_metrics(server["base"])["vllm:generation_tokens_total"] == tokens  # nothing still generating
    assert_healthy(client)


def test_metrics_parse_and_counters_move(server, client):
    before = scrape_metrics(server["base"])
    ids = prompt(200, seed=3)  # s = 200 / 64
    client.completions.create(model="tiny-drope", prompt=ids, max_tokens=5, temperature=0)
    after = scrape_metrics(server["base"])
    for name in (
        "vllm:prompt_tokens_total",
        "vllm:time_to_first_token_seconds_count",
        "vllm:e2e_request_latency_seconds_count",
    ):
        assert after[name] > before.get(name, 0), name
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] == 5
    assert after["drope:extension_factor_count"] == before["drope:extension_factor_count"] + 1
    assert after["drope:extension_factor_sum"] - before["drope:extension_factor_sum"] == pytest.approx(200 / L)
    rejected = after.get("drope:requests_rejected_total", 0)
    assert rejected == before.get("drope:requests_rejected_total", 0)  # a served request is not a rejection
    assert post(server, "/v1/models", key="wrong").status_code == 401
    assert scrape_metrics(server["base"])["drope:requests_rejected_total"] == rejected + 1
    for name in ("vllm:inter_token_latency_seconds_count", "vllm:kv_cache_usage_perc", "vllm:num_requests_waiting"):
        assert name in after, name
    # No drope:* series repeats a vllm:* one.
    assert not [n for n in after if n.startswith("drope:") and n.replace("drope:", "vllm:") in after]


@pytest.mark.upstream
def test_tokenize_roundtrip(server):
    r = post(server, "/tokenize", {"model": "tiny-drope", "prompt": "héllo", "add_special_tokens": False}).json()
    assert r["count"] == len("héllo".encode()) and r["max_model_len"] == CTX
    assert post(server, "/detokenize", {"model": "tiny-drope", "tokens": r["tokens"]}).json()["prompt"] == "héllo"
    chat = post(server, "/tokenize", {"model": "tiny-drope", "messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > 2
    assert post(server, "/tokenize", {}).status_code == 400


def sigterm_mid_stream(proc, base, model, log) -> None:
    """SIGTERM one token into a 300-token stream: drope-server's --shutdown-timeout default (30 s; vLLM's 0
    aborts) lets the stream finish whole, then the process exits with no traceback of ours."""
    req = {"model": model, "prompt": "z", "max_tokens": 300, "ignore_eos": True, "stream": True}
    req["stream_options"] = {"include_usage": True}
    usage, finish = None, None
    try:
        with httpx.stream("POST", base + "/v1/completions", json=req, timeout=60) as r:
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                if usage is None and finish is None and proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
                finish = next((c["finish_reason"] for c in chunk["choices"] if c["finish_reason"]), finish)
        assert (usage and usage["completion_tokens"], finish) == (300, "length")
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        stop_server(proc)  # a no-op when the drain above worked
    log.seek(0)
    text = log.read()
    assert "mode=drain" in text and "shutting down FastAPI HTTP server" in text, text[-3000:]
    # vLLM 0.32's output handler logs the stopped engine as EngineDeadError once at
    # shutdown; no other traceback (our code above all) may appear.
    blocks = text.split("Traceback (most recent call last)")[1:]
    assert all("EngineDeadError" in b.split("Traceback")[0] for b in blocks), text[-3000:]
    assert "/server/" not in text


def test_rope_parent_with_yarn_through_the_same_server_then_sigterm_drains_it(tiny_checkpoint, tmp_path):
    """The A/B path: a plain Llama served by vLLM's own class with YaRN, which really is applied.

    Prompt log-probabilities from the server equal offline vLLM with the same rope
    scaling and differ from the unscaled model on the same (in-range) prompt. This
    server (its own, so the shared one serves the other tests in any order) is then
    stopped the way an orchestrator stops it: SIGTERM during a stream.
    """
    ckpt = tiny_checkpoint("llama", None, seed=4, max_position_embeddings=128)
    # transformers 5 convention: max_position_embeddings is the extended length.
    yarn = {
        "rope_parameters": {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 128,
            "rope_theta": 10000.0,
        },
        "max_position_embeddings": 512,
    }
    ids = prompt(100, seed=5)
    proc, base, log = launch(ckpt, tmp_path, "--hf-overrides", json.dumps(yarn), "--max-model-len", "512")
    try:
        card = httpx.get(base + "/v1/models").json()["data"][0]
        assert card["drope"] is None and card["max_model_len"] == 512
        r = httpx.post(
            base + "/v1/completions",
            json={"model": str(ckpt), "prompt": ids, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        served = [next(iter(d.values()))["logprob"] for d in r.json()["choices"][0]["prompt_logprobs"][1:]]
    finally:
        sigterm_mid_stream(proc, base, str(ckpt), log)
    with vllm_engine(ckpt, max_model_len=512, hf_overrides=yarn) as llm:
        ((yarn_lp, _, _, _),) = vllm_run(llm, [ids])
    with vllm_engine(ckpt, max_model_len=128) as llm:
        ((plain_lp, _, _, _),) = vllm_run(llm, [ids])
    torch.testing.assert_close(torch.tensor(served), yarn_lp.float(), atol=1e-4, rtol=0)
    assert (yarn_lp - plain_lp).abs().max() > 1e-2  # YaRN changes the model, so the check above means something
