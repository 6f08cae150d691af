"""The real SmolLM2-135M checkpoint (docs/assets.md): plugin transparency and DroPE conversion.

1. The unconverted checkpoint served with our plugin installed gives exactly
   vLLM's own output (same class, same tokens, same log-probabilities bit for
   bit) as a process where the plugin is switched off (VLLM_PLUGINS="").
2. Converted to DroPE (QK-norm, beta on, L_train forced small so a 256-token
   prompt is at 4x), it loads and generates in vLLM and matches the reference.

Slow (~1-2 min: three engine starts on a 135M model).
    python -m pytest tests/test_smollm2.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from model_patches.assets import smollm2_hf_dir
from model_patches.convert import convert
from model_patches.reference import load_reference

from helpers import assert_parity, reference_run, vllm_engine, vllm_run

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village,"]

RUN = textwrap.dedent("""
    import json, sys
    from vllm import LLM, SamplingParams
    if __name__ == "__main__":
        llm = LLM(sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=256,
                  kv_cache_memory_bytes=128 * 2**20, seed=0)
        model = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
        outs = llm.generate(json.loads(sys.argv[2]), SamplingParams(max_tokens=16, temperature=0, logprobs=2), use_tqdm=False)
        print("RESULT" + json.dumps({
            "cls": type(model).__module__ + "." + type(model).__name__,
            "out": [[o.outputs[0].token_ids, [{str(k): v.logprob for k, v in d.items()} for d in o.outputs[0].logprobs]]
                    for o in outs],
        }))
""")


def run_isolated(model_dir, plugins: str | None):
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    if plugins is None:
        env.pop("VLLM_PLUGINS", None)
    else:
        env["VLLM_PLUGINS"] = plugins
    r = subprocess.run(
        [sys.executable, "-c", RUN, str(model_dir), json.dumps(PROMPTS)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


@pytest.fixture(scope="module")
def smollm2():
    return smollm2_hf_dir()


def test_plain_checkpoint_is_untouched_by_plugin(smollm2):
    with_plugin = run_isolated(smollm2, plugins=None)
    vanilla = run_isolated(smollm2, plugins="")
    assert vanilla["cls"] == with_plugin["cls"] == "vllm.model_executor.models.llama.LlamaForCausalLM"
    assert with_plugin["out"] == vanilla["out"]
    assert any(len(toks) == 16 for toks, _ in vanilla["out"])


def test_converted_smollm2_generates_and_matches_reference(smollm2, tmp_path):
    dst = tmp_path / "smollm2-drope"
    convert(smollm2, dst, attention_type="qk_norm_nope", train_context=64, beta_coef=0.2)
    ref = load_reference(dst)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(dst)
    ids = tok(" ".join(["The quick brown fox jumps over the lazy dog."] * 30))["input_ids"][:256]
    with vllm_engine(dst, max_model_len=512) as llm:
        assert (
            type(llm.llm_engine.model_executor.driver_worker.worker.model_runner.model).__name__
            == "DroPELlamaForCausalLM"
        )
        (got,) = vllm_run(llm, [ids])
    assert len(got[1]) > 0
    assert_parity(got, reference_run(ref, ids), "SmolLM2-135M DroPE at 4x L_train")
