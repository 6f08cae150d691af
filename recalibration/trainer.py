"""The training stack: Hugging Face Trainer with atomic checkpoints and a tokens/s log.

Same code on one CPU and on N GPUs: launched plainly it uses one process (all of a node's
GPUs through nn.DataParallel, as the Trainer does); under
``accelerate launch`` / ``torchrun`` the Trainer picks up the distributed
environment (FSDP through recalibration/fsdp.yaml).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Any

from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

log = logging.getLogger("drope.recalib")

STAGING = ".staging"
DATA_STATE = "data_state.json"


class AtomicCheckpointTrainer(Trainer):
    """Checkpoints are written to <output>/.staging/checkpoint-N and renamed into place when
    complete, so a run killed mid-write never leaves a checkpoint-N that --resume would pick.
    Each checkpoint also holds the training stream's position (data_state.json, when the
    dataset has ``state_after``), so resuming seeks there instead of replaying the data."""

    data_start: tuple[int, int] = (0, 0)
    """(optimizer step, stream sequences) this run started from; run.py sets it on resume."""

    def sequences_per_step(self) -> int:
        a = self.args  # train_batch_size: per device x GPUs of a single process (nn.DataParallel)
        return a.train_batch_size * a.gradient_accumulation_steps * a.world_size

    def sequences_consumed(self) -> int:
        # Counted from the resume point: the run may continue on another number of ranks.
        step0, seq0 = self.data_start
        return seq0 + (self.state.global_step - step0) * self.sequences_per_step()

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        run_dir = self._get_output_dir(trial=trial)
        staging = os.path.join(run_dir, STAGING)
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        self._get_output_dir = lambda trial=None: staging  # type: ignore[method-assign]
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir  # back to the class method
        # Under FSDP every rank writes its shard into staging: rename only once all are done.
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            if hasattr(self.train_dataset, "state_after"):
                # Every global batch passes through rank 0's stream (accelerate dispatches an
                # IterableDataset's batches from rank 0), so its position is the run's.
                state = self.train_dataset.state_after(self.sequences_consumed())
                with open(os.path.join(staging, name, DATA_STATE), "w") as f:
                    json.dump({"step": self.state.global_step, "stream": state}, f)
            final = os.path.join(run_dir, name)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(os.path.join(staging, name), final)  # atomic within one filesystem
            from transformers.trainer_utils import rotate_checkpoints

            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit, use_mtime=False)


class ProgressLog(TrainerCallback):
    """loss, lr and training tokens/s in the log."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self.t0: float | None = None
        self.step0 = 0
        self.last: dict[str, float] = {}

    def on_train_begin(self, args, state, control, **kw):
        self.t0, self.step0 = time.perf_counter(), state.global_step

    def on_log(self, args, state, control, logs=None, **kw):
        if not logs or self.t0 is None:
            return
        steps = state.global_step - self.step0
        tps = steps * self.tokens_per_step / max(time.perf_counter() - self.t0, 1e-9)
        logs["tokens_per_s"] = round(tps, 1)
        self.last.update({k: v for k, v in logs.items() if isinstance(v, (int, float))})
        if "loss" in logs:
            log.info("step %d/%d  loss %.4f  lr %.2e  %.0f tok/s", state.global_step, state.max_steps,
                     logs["loss"], logs.get("learning_rate", float("nan")), tps)
        if "eval_loss" in logs:
            log.info("step %d  held-out loss %.4f", state.global_step, logs["eval_loss"])
