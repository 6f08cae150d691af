"""The training stack: the Hugging Face Trainer, its public arguments and callbacks only.

Same code on one CPU and on N ranks: launched plainly it uses one process (all of a node's GPUs
through nn.DataParallel, as the Trainer does); under ``torchrun`` / ``accelerate launch`` the
Trainer picks up the distributed environment, replicated (DDP) or, for a model sharded at load
time (recalibration/sharding.py), FSDP2.

A checkpoint is the Trainer's (model weights, full even when sharded, and trainer_state.json;
``save_only_model``) completed by ``Checkpoints`` with the rest, in one format for every layout:
the optimizer state through torch.distributed.checkpoint (each rank writes its shard; a resume on
any number of ranks, sharded or not, reshards it), the LR schedule, the RNG, and the data stream's
position. transformers cannot checkpoint the optimizer of a model sharded at load time (its Trainer
refuses unless ``save_only_model``), which is why this one format replaces its optimizer.pt for all.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from .config import RecalibConfig, RecalibConfigError

log = logging.getLogger("drope.recalib")

STAGING = ".staging"
DATA_STATE = "data_state.json"
# Names the Trainer's own resume does not look for (it would try to torch.load an "optimizer*"
# entry next to a "scheduler.pt"): these files are read back here.
OPTIM_STATE = "optim_dcp"
LR_STATE = "lr_schedule.pt"
RNG_STATE = "rng_rank{}.pt"


def training_args(
    cfg: RecalibConfig, run_dir: Path, *, steps: int, bf16: bool, on_gpu: bool, seek: bool, first_run: bool
) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(run_dir / STAGING),  # Checkpoints renames each complete one into run_dir
        max_steps=steps,
        per_device_train_batch_size=cfg.micro_batch,
        per_device_eval_batch_size=cfg.micro_batch,
        gradient_accumulation_steps=cfg.grad_accum,
        gradient_checkpointing=cfg.gradient_checkpointing,
        learning_rate=cfg.lr,
        adam_beta1=cfg.optim.betas[0],
        adam_beta2=cfg.optim.betas[1],
        weight_decay=cfg.optim.weight_decay,
        warmup_steps=math.ceil(cfg.optim.warmup_ratio * steps),
        lr_scheduler_type=cfg.optim.schedule,
        max_grad_norm=cfg.optim.grad_clip,
        bf16=bf16,  # autocast; the weights stay fp32 (master weights)
        seed=cfg.seed,
        data_seed=cfg.seed,
        save_strategy="steps",
        save_steps=cfg.save_every,
        save_only_model=True,  # Checkpoints saves the rest
        eval_strategy="steps" if cfg.eval_every else "no",
        eval_steps=cfg.eval_every or None,
        logging_steps=cfg.log_every,
        report_to=[],
        use_cpu=not on_gpu,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=not sys.stderr.isatty(),
        ignore_data_skip=seek,  # the stream seeks by itself; no replay
        # Held-out loss before training, from inside train(): a trainer.evaluate() before train()
        # prepares the model unwrapped, and train() then runs multi-process without DDP (ranks drift apart).
        eval_on_start=first_run,
    )


class Checkpoints(TrainerCallback):
    """Atomic, resumable checkpoints. The Trainer writes each into <run_dir>/.staging (its output_dir);
    on_save adds the optimizer, LR schedule, RNG and data position, waits for every rank and renames
    it into run_dir, so a run killed mid-write never leaves a checkpoint that --resume would pick.
    Every global batch passes through rank 0's stream (accelerate dispatches an IterableDataset's
    batches from rank 0), so that stream's position is the run's."""

    def __init__(
        self,
        run_dir: Path,
        data: Any,
        keep: int | None,
        resume_from: str | None = None,
        data_start: tuple[int, int] = (0, 0),
    ):
        self.run_dir, self.data, self.keep, self.resume_from = run_dir, data, keep, resume_from
        self.data_start = data_start
        """(optimizer step, stream sequences) this run started from: the run may go on with another number of ranks."""

    @staticmethod
    def sequences_per_step(args: TrainingArguments) -> int:
        # train_batch_size: per device x GPUs of a single process (nn.DataParallel)
        return args.train_batch_size * args.gradient_accumulation_steps * args.world_size

    def sequences_consumed(self, args: TrainingArguments, step: int) -> int:
        step0, seq0 = self.data_start
        return seq0 + (step - step0) * self.sequences_per_step(args)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kw):
        if args.should_save:
            shutil.rmtree(args.output_dir, ignore_errors=True)  # what a killed save left
        if self.resume_from:
            ckpt = Path(self.resume_from)
            load_optimizer(model, optimizer, ckpt / OPTIM_STATE)
            lr_scheduler.load_state_dict(torch.load(ckpt / LR_STATE, weights_only=True))
            rng = ckpt / RNG_STATE.format(args.process_index)
            if rng.exists():  # absent when this rank did not exist in the saving run
                set_rng_state(torch.load(rng, weights_only=True))

    def on_save(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kw):
        name = f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        staged = Path(args.output_dir) / name
        staged.mkdir(parents=True, exist_ok=True)  # under DDP only rank 0 wrote the model
        save_optimizer(model, optimizer, staged / OPTIM_STATE)  # collective: every rank its shard
        torch.save(rng_state(), staged / RNG_STATE.format(args.process_index))
        if args.should_save:
            torch.save(lr_scheduler.state_dict(), staged / LR_STATE)
            stream = self.data.state_after(self.sequences_consumed(args, state.global_step))
            (staged / DATA_STATE).write_text(json.dumps({"step": state.global_step, "stream": stream}))
        barrier()  # every rank's files are in place
        if args.should_save:
            final = self.run_dir / name
            if final.exists():
                shutil.rmtree(final)
            os.replace(staged, final)  # atomic within one filesystem
            rotate_checkpoints(output_dir=str(self.run_dir), save_total_limit=self.keep)


def check_resumable(checkpoint: Path) -> None:
    """Refuse, before training starts, a checkpoint that lacks what this callback adds."""
    missing = [n for n in (OPTIM_STATE, LR_STATE, DATA_STATE) if not (checkpoint / n).exists()]
    if missing:
        raise RecalibConfigError(
            f"--resume: {checkpoint} lacks {', '.join(missing)} (written by an older "
            "recalibration.run?); start again with --overwrite"
        )


def save_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
    with _one_process_quietly():
        dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=str(path), no_dist=not _distributed())


def load_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    opt = getattr(optimizer, "optimizer", optimizer)
    # The state as this run lays it out (its shards under FSDP), initialised, for DCP to fill from the files.
    state = {"optim": get_optimizer_state_dict(model, opt)}
    with _one_process_quietly():
        dcp.load(state, checkpoint_id=str(path), no_dist=not _distributed())
    set_optimizer_state_dict(model, opt, state["optim"])


def rng_state() -> dict[str, Any]:
    # Only torch's generators: the training step draws from nothing else (the data stream has its own seeded order).
    return {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})}


def set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["cpu"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


@contextlib.contextmanager
def _one_process_quietly() -> Iterator[None]:
    # Without a process group DCP warns, at every save and load, that it assumes a single process: it is one.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def barrier() -> None:
    if _distributed():
        torch.distributed.barrier()


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
            log.info(
                "step %d/%d  loss %.4f  lr %.2e  %.0f tok/s",
                state.global_step,
                state.max_steps,
                logs["loss"],
                logs.get("learning_rate", float("nan")),
                tps,
            )
        if "eval_loss" in logs:
            log.info("step %d  held-out loss %.4f", state.global_step, logs["eval_loss"])
