"""The DroPE effect measured through drope-server, on the micro checkpoints that live in the repository.

benchmarks/long_context.py made them (model_patches/micro/README.md): a 2-layer Llama pretrained
with RoPE at L_train = 128 on loadtest.micro's lookup task, and its DroPE version (RoPE dropped,
QK-norm, recalibrated for 20% of the pretraining steps). On the benchmark's trials (BENCHMARKS.md,
three training seeds) DroPE kept ~1.0 accuracy out to 8x L_train, RoPE as is fell to 0.67 / 0.40 /
0.28 at 2x / 4x / 8x, and RoPE + YaRN x8 held 1.0 to 4x and fell to 0.93 at 8x. This test serves the
shipped pair (seed 1) and scores the first 200 of the same trials (greedy, float32: deterministic)
at 4x and 8x; seed 1 scored DroPE 1.000 / 1.000 and RoPE + YaRN 0.940 at 8x. It asserts that
ordering with margins. What it catches, measured: the same weights served with rotary embeddings
applied (as a plain Llama) score 0.29 / 0.14 at 4x / 8x, so positional rotation reaching DroPE's
attention, or a served path that loses the DroPE classes, fails here, which parity tests cannot see
(both sides of a parity test share our code). What it does not: this model does not need beta or its
QK-norm at these lengths (served with the QK-norm dropped, or with c = 1 from 16 tokens on, it still
scores 1.0 at 8x), so beta and the norm are covered by the parity tests only.

    python -m pytest tests/test_micro_long_context.py      # slow: two servers, ~1.5 minutes on 2 cores
"""

from __future__ import annotations

import json

import pytest

from loadtest.micro import EVAL_SEED_BASE, Task, accuracy, score_trials, trials
from model_patches.assets import micro_dir
from recalibration.engine import yarn_overrides

from helpers import launch_server, stop_server

pytestmark = pytest.mark.slow
L_TRAIN, N = 128, 200
TASK = Task(kind="lookup", keys=32, values=4, filler=64, pairs=8, rate=20.0)  # benchmarks/long_context.py's


def score(tmp_path, ckpt, lengths, *args) -> list[dict]:
    ids = {w: i for i, w in enumerate(TASK.vocab())}
    work = tmp_path / f"{ckpt.name}-{len(list(tmp_path.iterdir()))}"  # one log directory per server
    work.mkdir()
    proc, base, _ = launch_server(ckpt, work, "--max-model-len", str(8 * L_TRAIN + 1), *args)
    try:
        return [
            r for L in lengths for r in score_trials(base, str(ckpt), trials(TASK, ids, L, 500, EVAL_SEED_BASE + L)[:N])
        ]
    finally:
        stop_server(proc)


def test_drope_retrieves_past_l_train_where_rope_and_yarn_do_not(tmp_path):
    drope, rope = micro_dir("micro-drope"), micro_dir("micro-rope")
    base_cfg = json.loads((rope / "config.json").read_text())
    longest = 8 * L_TRAIN
    got_drope = score(tmp_path, drope, [4 * L_TRAIN, longest])
    yarn = yarn_overrides(base_cfg, longest, L_TRAIN, longest + 1)
    got_yarn = score(tmp_path, rope, [longest], "--hf-overrides", json.dumps(yarn))
    acc = {
        "drope 4x": accuracy(got_drope, 4 * L_TRAIN),
        "drope 8x": accuracy(got_drope, longest),
        "yarn 8x": accuracy(got_yarn, longest),
    }
    assert acc["drope 4x"] >= 0.98 and acc["drope 8x"] >= 0.98, acc  # measured 1.000 and 1.000
    assert acc["yarn 8x"] <= acc["drope 8x"] - 0.03, acc  # measured 0.940 vs 1.000
