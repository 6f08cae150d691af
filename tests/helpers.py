"""What several test modules share: engines and servers to drive, prompts, the reference's answers.

One helper module, so no test module imports another (each stays runnable alone and in any order);
conftest.py keeps the environment set-up and the fixtures.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch

KV_CACHE_BYTES = 64 * 2**20
TOL = 1e-4  # vLLM's paged attention vs the transformers reference, float32
N_NEW = 12  # greedy tokens compared after each prompt


@contextlib.contextmanager
def vllm_engine(model_dir, **kwargs):
    """A float32, eager, in-process vLLM engine, torn down on exit so the next can start."""
    from vllm import LLM

    opts = dict(
        dtype="float32",
        enforce_eager=True,
        max_model_len=1024,
        kv_cache_memory_bytes=KV_CACHE_BYTES,
        max_num_batched_tokens=1024,
        enable_prefix_caching=False,
        seed=0,
    )
    opts.update(kwargs)
    llm = LLM(str(model_dir), **opts)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown() if hasattr(llm.llm_engine, "engine_core") else None
        del llm
        gc.collect()


def launch_server(ckpt, log_dir, *args, env=None, module="server"):
    """Start `python -m server` (vLLM flags + ours) on a free port; return (process, base URL, log file) once healthy.

    ``module="vllm.entrypoints.openai.api_server"`` starts plain vLLM's server instead (`vllm serve`)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(log_dir / "server.log", "w+")
    env = {**os.environ, **(env or {})}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the async engine runs in its own process
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            module,
            "--model",
            str(ckpt),
            "--port",
            str(port),
            "--dtype",
            "float32",
            "--kv-cache-memory-bytes",
            str(KV_CACHE_BYTES),
            "--enforce-eager",
            *args,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,  # its own process group, so stop_server can reach the engine processes too
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read()[-4000:]}")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base, log
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(proc, grace_s=0)
    pytest.fail("server did not become healthy in 180 s")


def stop_server(proc, grace_s: float = 90) -> None:
    """SIGTERM (vLLM then stops its engine processes), else SIGKILL to the whole group: a bare kill of the
    API server would orphan its engine core and worker, which keep a core busy for the rest of the suite."""
    if proc.poll() is None and grace_s:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def scrape_metrics(base: str) -> dict[str, float]:
    """A server's /metrics as {sample name: value summed over labels}, parsed by prometheus-client."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(httpx.get(base + "/metrics").text):
        for sample in fam.samples:
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


def prompt(n_tokens: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n_tokens,), generator=g).tolist()


def vllm_run(llm, prompts: list[list[int]], prompt_logprobs: bool = True):
    """-> [(prompt logprobs [n-1], greedy tokens, greedy logprobs, cached tokens)]."""
    from vllm import SamplingParams

    # EOS ignored on both sides: parity is about the numbers, not about where each stops.
    sp = SamplingParams(
        max_tokens=N_NEW, temperature=0.0, logprobs=0, ignore_eos=True, prompt_logprobs=0 if prompt_logprobs else None
    )
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    results = []
    for p, o in zip(prompts, outs, strict=True):
        plp = None
        if prompt_logprobs:
            plp = torch.tensor([d[t].logprob for d, t in zip(o.prompt_logprobs[1:], p[1:], strict=True)])
        c = o.outputs[0]
        glp = torch.tensor([d[t].logprob for d, t in zip(c.logprobs, c.token_ids, strict=True)])
        results.append((plp, list(c.token_ids), glp, o.num_cached_tokens))
    return results


@torch.no_grad()
def reference_run(model, ids: list[int]):
    """Prompt logprobs from one forward; greedy continuation through the KV cache, EOS not special."""
    x = torch.tensor([ids])
    out = model(x, attention_mask=torch.ones_like(x), use_cache=True)
    logp = out.logits[0].log_softmax(-1)
    plp = logp[:-1].gather(-1, x[0, 1:, None])[:, 0]
    toks, glp, past, last = [], [], out.past_key_values, logp[-1]
    for _ in range(N_NEW):
        t = int(last.argmax())
        toks.append(t)
        glp.append(last[t])
        out = model(torch.tensor([[t]]), past_key_values=past, use_cache=True)
        past, last = out.past_key_values, out.logits[0, -1].log_softmax(-1)
    return plp, toks, torch.stack(glp)


def assert_parity(got, want, what: str):
    plp, toks, glp = want
    if got[0] is not None:
        torch.testing.assert_close(got[0], plp, atol=TOL, rtol=0, msg=lambda m: f"{what} prompt logprobs: {m}")
    assert got[1] == toks, f"{what}: greedy tokens differ: vllm {got[1]} ref {toks}"
    torch.testing.assert_close(got[2], glp, atol=TOL, rtol=0, msg=lambda m: f"{what} greedy logprobs: {m}")
