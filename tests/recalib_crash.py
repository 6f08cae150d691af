"""Test-only launcher: `python tests/recalib_crash.py {after-save|in-save} STEP ARGS...` runs
recalibration.run and dies like kill -9 (exit 137) at checkpoint STEP.

  after-save: once checkpoint-STEP is complete and renamed into place;
  in-save:    with checkpoint-STEP complete in .staging but before the rename.
"""

from __future__ import annotations

import os
import sys

from recalibration import trainer
from recalibration.run import main


def crash_at(when: str, step: int) -> None:
    name = f"checkpoint-{step}"
    if when == "in-save":
        real_replace = os.replace

        def replace(src, dst, *a, **kw):
            if os.path.basename(src) == name and trainer.STAGING in str(src):
                os._exit(137)
            return real_replace(src, dst, *a, **kw)

        os.replace = replace
    else:
        real_save = trainer.AtomicCheckpointTrainer._save_checkpoint

        def save(self, model, trial):
            real_save(self, model, trial)
            if self.state.global_step == step:
                os._exit(137)

        trainer.AtomicCheckpointTrainer._save_checkpoint = save


if __name__ == "__main__":
    crash_at(sys.argv[1], int(sys.argv[2]))
    sys.exit(main(sys.argv[3:]))
