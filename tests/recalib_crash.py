"""Test-only launcher: `python tests/recalib_crash.py WHEN STEP ARGS...` runs recalibration.run
(under torchrun or accelerate launch too) and dies like kill -9 (exit 137) at checkpoint STEP.

  after-save:       every rank, once checkpoint-STEP is complete and renamed into place;
  rank1-after-save: rank 1 alone, once checkpoint-STEP is in place (torchrun then stops the others);
  in-save:          with checkpoint-STEP complete in .staging but before the rename;
  none:             no crash.

With RECORD_BATCHES=DIR, each rank appends the token rows of every micro-batch it trains on to
DIR/rank<R>.jsonl as {"step": optimizer step, "rows": [...]}.

The hooks wrap public methods only: our Checkpoints.on_save callback and Trainer.training_step.
"""

from __future__ import annotations

import json
import os
import sys
import time

from transformers import Trainer

from recalibration import trainer
from recalibration.run import main

RANK = int(os.environ.get("RANK", "0"))


def crash_at(when: str, step: int) -> None:
    name = f"checkpoint-{step}"
    if when == "in-save":
        real_replace = os.replace

        def replace(src, dst, *a, **kw):
            if os.path.basename(src) == name and trainer.STAGING in str(src):
                os._exit(137)
            return real_replace(src, dst, *a, **kw)

        os.replace = replace
    elif when in ("after-save", "rank1-after-save"):
        real_on_save = trainer.Checkpoints.on_save

        def on_save(self, args, state, control, **kw):
            real_on_save(self, args, state, control, **kw)
            if state.global_step == step and (when == "after-save" or RANK == 1):
                while not (self.run_dir / name).is_dir():  # rank 0 renames it into place after the barrier
                    time.sleep(0.05)
                os._exit(137)

        trainer.Checkpoints.on_save = on_save


def record_batches(directory: str) -> None:
    real_step = Trainer.training_step
    os.makedirs(directory, exist_ok=True)

    def training_step(self, model, inputs, *a, **kw):
        with open(os.path.join(directory, f"rank{RANK}.jsonl"), "a") as f:
            f.write(json.dumps({"step": self.state.global_step, "rows": inputs["input_ids"].tolist()}) + "\n")
        return real_step(self, model, inputs, *a, **kw)

    Trainer.training_step = training_step


if __name__ == "__main__":
    crash_at(sys.argv[1], int(sys.argv[2]))
    if os.environ.get("RECORD_BATCHES"):
        record_batches(os.environ["RECORD_BATCHES"])
    sys.exit(main(sys.argv[3:]))
