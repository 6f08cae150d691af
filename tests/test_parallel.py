"""Real tensor parallelism on CPU: the DroPE classes at TP=2 and TP=4 equal one rank.

vLLM-CPU runs one worker process per rank when each rank is bound to cores
(VLLM_CPU_OMP_THREADS_BIND="0|1" for two ranks, "0|1|0|1" for four on a 2-core
machine). Each layout runs in a subprocess (so the binding and the process layout
stay out of the test process) or behind `drope-server --tensor-parallel-size 2`
(which binds the ranks by itself), and its prompt and greedy log-probabilities are
compared with an in-process single-rank engine on the same checkpoint, past L_train
with beta on, for plain and full-width QK-norm attention. TP=4 on a model with
2 KV heads replicates the KV heads and the k_norm shards.

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

from model_patches.config import DropeConfig

from helpers import launch_server, prompt, stop_server, vllm_engine

pytestmark = pytest.mark.slow
L = 64
TOL = 1e-4
N_NEW = 8
SAMPLING = dict(max_tokens=N_NEW, temperature=0.0, logprobs=0, prompt_logprobs=0, ignore_eos=True)

RUN = textwrap.dedent("""
    import json, sys
    from vllm import LLM, SamplingParams
    ckpt, tp, prompts, sampling = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4])
    if __name__ == "__main__":
        llm = LLM(ckpt, dtype="float32", enforce_eager=True, max_model_len=512, kv_cache_memory_bytes=64 << 20,
                  tensor_parallel_size=tp, distributed_executor_backend="mp", seed=0)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(**sampling), use_tqdm=False)
        print("RESULT " + json.dumps([
            {"prompt": [d[t].logprob for d, t in zip(o.prompt_logprobs[1:], p[1:])],
             "tokens": list(o.outputs[0].token_ids),
             "greedy": [d[t].logprob for d, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]}
            for p, o in zip(prompts, outs)]))
""")


def one_rank(ckpt, prompts) -> list[dict]:
    """The reference: a single-rank engine in the test process (no worker processes to start)."""
    from vllm import SamplingParams

    with vllm_engine(ckpt, max_model_len=512) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(**SAMPLING), use_tqdm=False)
    return [
        {
            "prompt": [d[t].logprob for d, t in zip(o.prompt_logprobs[1:], p[1:], strict=True)],
            "tokens": list(o.outputs[0].token_ids),
            "greedy": [d[t].logprob for d, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids, strict=True)],
        }
        for p, o in zip(prompts, outs, strict=True)
    ]


def engine_tp(ckpt, tp: int, prompts, tmp_path) -> list[dict]:
    """Offline `LLM(tensor_parallel_size=tp)` in a subprocess, ranks bound to the two cores in turn."""
    script = tmp_path / "run_engine.py"
    script.write_text(RUN)
    env = {
        **os.environ,
        "VLLM_CPU_OMP_THREADS_BIND": "|".join(str(r % 2) for r in range(tp)),
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
    }
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    r = subprocess.run(
        [sys.executable, str(script), str(ckpt), str(tp), json.dumps(prompts), json.dumps(SAMPLING)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and lines, (tp, r.stdout[-2000:], r.stderr[-4000:])
    return json.loads(lines[-1][len("RESULT ") :])


def server_tp2(ckpt, prompts, tmp_path) -> list[dict]:
    """The same requests through `drope-server --tensor-parallel-size 2`, which binds the two ranks to the two
    cores by itself (no VLLM_CPU_* set)."""
    proc, base, log = launch_server(ckpt, tmp_path, "--tensor-parallel-size", "2", "--max-model-len", "512")
    try:
        out = []
        for ids in prompts:
            r = httpx.post(
                base + "/v1/completions",
                json={"model": str(ckpt), "prompt": ids, "return_token_ids": True, **SAMPLING},
                timeout=120,
            )
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            out.append(
                {
                    "prompt": [
                        d[str(t)]["logprob"] for d, t in zip(choice["prompt_logprobs"][1:], ids[1:], strict=True)
                    ],
                    "tokens": choice["token_ids"],
                    "greedy": choice["logprobs"]["token_logprobs"],
                }
            )
        log.seek(0)
        if not any(k.startswith("VLLM_CPU_") for k in os.environ):  # the user's own layout would win
            assert "VLLM_CPU_OMP_THREADS_BIND='0|1'" in log.read()
        return out
    finally:
        stop_server(proc)


def assert_same(got: list[dict], want: list[dict], what: str) -> None:
    for g, w in zip(got, want, strict=True):
        assert g["tokens"] == w["tokens"], f"{what}: greedy tokens differ"
        for key in ("prompt", "greedy"):
            torch.testing.assert_close(
                torch.tensor(g[key]),
                torch.tensor(w[key]),
                atol=TOL,
                rtol=0,
                msg=lambda m, key=key: f"{what} {key} logprobs: {m}",
            )


CASES = [
    pytest.param("llama", "qk_norm_nope", [("server", 2), ("engine", 4)], id="llama-qknorm-server-tp2-engine-tp4"),
    pytest.param("qwen2", "nope", [("engine", 2)], id="qwen2-nope-engine-tp2"),
]


@pytest.mark.parametrize("family,attention_type,layouts", CASES)
def test_parallel_layouts_equal_one_rank(tiny_checkpoint, tmp_path, family, attention_type, layouts):
    # 4 heads / 2 KV heads: TP=4 replicates each KV head (and its k_norm shard) on two ranks.
    ckpt = tiny_checkpoint(
        family, DropeConfig(train_context=L, beta_coef=0.4, attention_type=attention_type), seed=17, num_layers=2
    )
    prompts = [prompt(n, seed=n) for n in (L // 2, 3 * L)]  # inside and past L_train
    want = one_rank(ckpt, prompts)
    for how, tp in layouts:
        got = server_tp2(ckpt, prompts, tmp_path) if how == "server" else engine_tp(ckpt, tp, prompts, tmp_path)
        assert_same(got, want, f"{family}/{attention_type} {how} TP={tp}")
