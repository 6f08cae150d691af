"""Cost of resuming the training stream at optimizer step N: seek (the saved stream state, what
--resume does) vs replay (Hugging Face Trainer's default: re-read, re-tokenise and drop the N
consumed steps' batches).

Measured for each N, side by side in one run: seconds from "resume at step N" to the first
training batch, on the smollm2-135m preset's stream (SmolLM2 tokenizer, the packaged essays,
512-token sequences, 2 per step) unless flags say otherwise. The stream's state at step N is
produced beforehand and saved as JSON (as a checkpoint does); that part is not timed.

    .venv/bin/python benchmarks/resume_cost.py [--steps 10,1000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def seek(data, state: str) -> list[int]:
    """What --resume does: load the checkpoint's stream state, take the next batch."""
    data.load_state_dict(json.loads(state))
    return next(iter(data))["input_ids"].tolist()


def replay(data, consumed: int) -> list[int]:
    """Trainer's default (skip_first_batches): produce and drop every consumed sequence."""
    it = iter(data)
    for _ in range(consumed):
        next(it)
    return next(it)["input_ids"].tolist()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", default="10,1000", help="resume points, in optimizer steps")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--sequences-per-step", type=int, default=2, help="micro_batch x grad_accum x ranks")
    p.add_argument("--data", default="builtin:essays")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    from transformers import AutoTokenizer

    from model_patches.assets import smollm2_hf_dir
    from recalibration.config import DataConfig
    from recalibration.data import PackedTrainData

    tok = AutoTokenizer.from_pretrained(smollm2_hf_dir())
    cfg = DataConfig(source=args.data)
    g = args.sequences_per_step

    def dataset() -> PackedTrainData:
        return PackedTrainData(cfg, tok, args.seq_len, seed=0, snapshot_every=g)

    print(f"stream: {args.data}, {args.seq_len}-token sequences, {g} per step; median of {args.repeats}")
    print(f"{'step N':>8} {'sequences':>10} {'seek s':>9} {'replay s':>9} {'replay/seek':>12}")
    for n in (int(s) for s in args.steps.split(",")):
        d = dataset()
        it = iter(d)
        for _ in range(n * g):
            next(it)
        state = json.dumps(d.state_after(n * g))

        times = {}
        for name, fn, arg in (("seek", seek, state), ("replay", replay, n * g)):
            ts, first = [], None
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                first = fn(dataset(), arg)
                ts.append(time.perf_counter() - t0)
            times[name] = (statistics.median(ts), first)
        assert times["seek"][1] == times["replay"][1], "seek and replay disagree on the next batch"
        s, r = times["seek"][0], times["replay"][0]
        print(f"{n:>8} {n * g:>10} {s:>9.4f} {r:>9.3f} {r / s:>11.0f}x")


if __name__ == "__main__":
    main()
