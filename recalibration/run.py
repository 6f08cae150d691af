"""Recalibrate a pretrained RoPE model into a DroPE checkpoint the server loads as is.

    python -m recalibration.run --preset tiny                                  # CPU, about a minute
    python -m recalibration.run --preset smollm2-135m --max-steps 400          # CPU, ~40 min (5.7 s a step)
    python -m recalibration.run --preset tiny --resume                         # continue after a crash
    accelerate launch --config_file recalibration/fsdp.yaml -m recalibration.run --preset llama2-7b-gpu

Steps: convert the base checkpoint (RoPE removed, QK-norm weights at 1 if the
variant has them), train the transformers reference model at the base's own
context length with AdamW + warmup + cosine decay, checkpoint atomically every
--save-every steps, evaluate held-out loss, and write <output>/final: a DroPE
checkpoint with tokenizer that ``drope-server --model <output>/final`` serves.
Fit beta afterwards with ``python -m recalibration.fit_beta <output>/final``.

Any config field can be set with --set key=value (dotted for data.* and optim.*),
or from a JSON file with --config; the resolved config is saved as
<output>/recalib_config.json.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
from argparse import Namespace, RawDescriptionHelpFormatter
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any

from .config import PRESETS, RecalibConfig, RecalibConfigError, cli_flags, preset

log = logging.getLogger("drope.recalib")
CONFIG_NAME = "recalib_config.json"


def resolve_base(base: str) -> Path:
    """A local directory, the packaged SmolLM2, a tiny random model, or a hub id (downloaded)."""
    if base == "tiny":
        from model_patches.assets import cache_root
        from model_patches.tiny import build_tiny_checkpoint

        d = cache_root() / "tiny-rope-base"  # seeded: the same model every time
        if not (d / "config.json").exists():
            # Built aside and renamed into place: under torchrun every rank may get here at once.
            tmp = d.with_name(f"{d.name}.{os.getpid()}")
            build_tiny_checkpoint(tmp, "llama", hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                                  max_position_embeddings=128, seed=0)
            try:
                os.replace(tmp, d)
            except OSError:  # another rank won the race with the same model
                shutil.rmtree(tmp, ignore_errors=True)
        return d
    if base == "smollm2-135m-instruct":
        from model_patches.assets import smollm2_hf_dir

        return smollm2_hf_dir()
    if Path(base).expanduser().is_dir():
        return Path(base).expanduser()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(base, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as e:
        raise RecalibConfigError(f"base {base!r} is not a local directory and could not be downloaded: {e}") from None


def prepare_output(cfg: RecalibConfig, resume: bool, overwrite: bool, write: bool = True) -> Path:
    """Refuse an output directory that holds something else; with write, clear and create it.
    write=False only checks, so every rank of a multi-process run reaches the same verdict."""
    out = Path(cfg.output_dir)
    saved = out / CONFIG_NAME
    if resume:
        if not saved.exists():
            raise RecalibConfigError(f"--resume: {out} holds no run ({CONFIG_NAME} missing)")
        old = RecalibConfig.from_dict(json.loads(saved.read_text()))
        if _identity(old) != _identity(cfg):
            raise RecalibConfigError(f"--resume: {out} holds a different run; its config is {saved}")
        return out
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            if not saved.exists():
                what = "other files"
            elif _identity(RecalibConfig.from_dict(json.loads(saved.read_text()))) == _identity(cfg):
                what = "this run"
            else:
                what = "a different run"
            raise RecalibConfigError(f"{out} already holds {what}; pass --resume to continue it or --overwrite to replace it")
        if write:
            shutil.rmtree(out)
    if write:
        out.mkdir(parents=True, exist_ok=True)
    return out


def _identity(cfg: RecalibConfig) -> dict[str, Any]:
    # What must match to continue a run: everything but the length of training.
    d = cfg.to_dict()
    for k in ("max_steps", "token_budget", "save_every", "save_total_limit", "eval_every", "log_every"):
        d.pop(k)
    return d


def train(cfg: RecalibConfig, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    import torch
    from accelerate import PartialState
    from transformers import AutoTokenizer, TrainingArguments, set_seed
    from transformers.trainer_utils import get_last_checkpoint

    from model_patches.config import DropeConfig, is_drope_config, read_config_json
    from model_patches.convert import convert
    from model_patches.reference import load_reference

    from .data import PackedTrainData, check_data, heldout_tokens, pack
    from .trainer import DATA_STATE, AtomicCheckpointTrainer, ProgressLog

    # Everything that can be wrong with the inputs is checked before the output directory is touched.
    base = resolve_base(cfg.base)
    base_cfg = read_config_json(base)
    seq_len = cfg.seq_len or (DropeConfig.from_hf_config(base_cfg).train_context if is_drope_config(base_cfg)
                              else base_cfg.get("max_position_embeddings"))
    if not seq_len:
        raise RecalibConfigError(f"{base} states no context length; pass --seq-len")
    tokenizer = AutoTokenizer.from_pretrained(base)
    data_info = check_data(cfg.data, tokenizer, seq_len)
    on_gpu = torch.cuda.is_available()
    # Under torchrun / accelerate launch every rank runs this; only rank 0 writes, after all agree.
    dist = PartialState(cpu=not on_gpu)
    out = prepare_output(cfg, resume, overwrite, write=False)
    dist.wait_for_everyone()
    init = base if is_drope_config(base_cfg) or cfg.keep_rope else out / "init"
    if dist.is_main_process:
        prepare_output(cfg, resume, overwrite)
        cfg.save(out / CONFIG_NAME)
        if not (init / "config.json").exists():
            convert(base, init, attention_type=cfg.attention_type, train_context=seq_len, overwrite=True)
    dist.wait_for_everyone()
    if dist.num_processes > 1 and not on_gpu and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        log.warning("FSDP config on CPU: accelerate runs it as plain data parallel (DDP, gloo); "
                    "it enables FSDP for accelerator devices only")

    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and on_gpu)
    set_seed(cfg.seed)
    # fp32 master weights always: bf16 runs under autocast (Trainer bf16=True, or FSDP's mixed
    # precision), so updates smaller than bf16's resolution are not rounded away.
    model = load_reference(init, dtype=torch.float32)
    model.train()
    world_size = dist.num_processes
    steps = cfg.steps(seq_len, world_size)
    tokens_per_step = cfg.tokens_per_step(seq_len, world_size)
    held = heldout_tokens(cfg.data, tokenizer)
    # Global batches, so the held-out set is the same for any number of ranks.
    eval_seqs = list(pack(iter([held]), seq_len))[: cfg.eval_batches * cfg.micro_batch * world_size]
    eval_data = [{"input_ids": torch.tensor(s), "labels": torch.tensor(s)} for s in eval_seqs]
    ckpt_dir = out / "checkpoints"
    last = get_last_checkpoint(str(ckpt_dir)) if resume and ckpt_dir.exists() else None
    saved_data = Path(last) / DATA_STATE if last else None
    seek = bool(saved_data and saved_data.exists())

    args = TrainingArguments(
        output_dir=str(ckpt_dir),
        max_steps=steps,
        per_device_train_batch_size=cfg.micro_batch,
        per_device_eval_batch_size=cfg.micro_batch,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        adam_beta1=cfg.optim.betas[0],
        adam_beta2=cfg.optim.betas[1],
        weight_decay=cfg.optim.weight_decay,
        warmup_steps=math.ceil(cfg.optim.warmup_ratio * steps),
        lr_scheduler_type=cfg.optim.schedule,
        max_grad_norm=cfg.optim.grad_clip,
        bf16=bf16,
        seed=cfg.seed,
        data_seed=cfg.seed,
        save_strategy="steps",
        save_steps=cfg.save_every,
        save_total_limit=cfg.save_total_limit,
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
        eval_on_start=last is None,
    )
    train_data = PackedTrainData(cfg.data, tokenizer, seq_len, cfg.seed)
    progress = ProgressLog(tokens_per_step)
    trainer = AtomicCheckpointTrainer(
        model=model, args=args, train_dataset=train_data, eval_dataset=eval_data, callbacks=[progress],
    )
    # Snapshot the stream at every optimizer step's boundary, so a checkpoint can record where it is.
    train_data.snapshot_every = trainer.sequences_per_step()
    if seek:
        saved = json.loads(saved_data.read_text())
        train_data.load_state_dict(saved["stream"])
        trainer.data_start = (saved["step"], train_data.start.sequences)
    if resume and not last:
        log.info("resuming from the start (no complete checkpoint yet)")
    elif resume:
        log.info("resuming from %s; data: %s", last,
                 f"seeking to sequence {train_data.start.sequences} (epoch {train_data.start.epoch})" if seek
                 else "replaying the consumed batches (the checkpoint records no stream position)")
    result = trainer.train(resume_from_checkpoint=last)
    final_eval = trainer.evaluate()["eval_loss"]
    first_eval = next((h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h), None)

    final = out / "final"
    trainer.save_model(str(final))  # every rank: under FSDP the full weights are gathered to rank 0
    summary = {
        "steps": trainer.state.global_step, "seq_len": seq_len, "tokens_trained": trainer.sequences_consumed() * seq_len,
        "train_loss": result.training_loss, "heldout_loss_start": first_eval, "heldout_loss_end": final_eval,
        "heldout_ppl_end": math.exp(final_eval), "tokens_per_s": progress.last.get("tokens_per_s"),
        "final_checkpoint": str(final), "world_size": world_size,
        "loss_curve": [[h["step"], h["loss"]] for h in trainer.state.log_history if "loss" in h], **data_info,
    }
    if dist.is_main_process:
        tokenizer.save_pretrained(str(final))
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def format_summary(cfg: RecalibConfig, s: dict[str, Any]) -> str:
    start = f"{s['heldout_loss_start']:.4f} -> " if s.get("heldout_loss_start") is not None else ""
    return "\n".join([
        "", "=" * 18 + " recalibration summary " + "=" * 18,
        f"base            : {cfg.base} ({'RoPE kept' if cfg.keep_rope else cfg.attention_type}, L = {s['seq_len']})",
        f"steps / tokens  : {s['steps']} / {s['tokens_trained']:,}",
        f"held-out loss   : {start}{s['heldout_loss_end']:.4f} (ppl {s['heldout_ppl_end']:.2f})",
        f"speed           : {s['tokens_per_s'] or float('nan'):.0f} training tokens/s",
        f"checkpoint      : {s['final_checkpoint']}",
        *([] if cfg.keep_rope else
          [f"next            : python -m recalibration.fit_beta {s['final_checkpoint']} --data {cfg.data.source}"]),
        "=" * 59,
    ])


# ---------------- command line: generated from the config's fields ----------------

@dataclass
class RunOptions:
    """Options of the command, not of the run's config."""

    preset: str = field(default="tiny", metadata={"choices": sorted(PRESETS), "help": "starting config (default: tiny)"})
    config: str | None = field(default=None, metadata={"help": "JSON file with a full config (overrides the preset)"})
    set: str | None = field(default=None, metadata={
        "action": "append", "metavar": "KEY=VALUE",
        "help": "any other field, e.g. --set optim.weight_decay=0.05 --set data.heldout_docs=4 (JSON values)"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --output-dir from its latest checkpoint"})
    overwrite: bool = field(default=False, metadata={"help": "replace whatever --output-dir holds"})


def build_parser() -> Any:
    """One option per config field that has a flag (config.doc(..., flag=...)), absent = the preset's value."""
    from transformers import HfArgumentParser

    flags = make_dataclass("ConfigFlags", [
        (name, typ | None, field(default=None, metadata={**meta, **({"nargs": "?", "const": True} if typ is bool else {})}))
        for name, _, typ, meta in cli_flags()])
    return HfArgumentParser([RunOptions, flags], prog="python -m recalibration.run", description=__doc__,
                            formatter_class=RawDescriptionHelpFormatter)


def config_from_args(args: Namespace) -> RecalibConfig:
    if args.config:
        cfg = RecalibConfig.from_dict(json.loads(Path(args.config).read_text()))
    else:
        kw = {k: v for k, v in (("base", args.base), ("output_dir", args.output_dir), ("source", args.data)) if v}
        cfg = preset(args.preset, **kw)
    over: dict[str, Any] = {key: getattr(args, name) for name, key, _, _ in cli_flags()}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise RecalibConfigError(f"--set wants KEY=VALUE, got {item!r}")
        try:
            over[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            over[key.strip()] = value
    return cfg.with_overrides(over)


def main(argv: list[str] | None = None) -> int:
    rank0 = int(os.environ.get("RANK", "0")) == 0  # torchrun / accelerate launch: one log, one summary
    logging.basicConfig(level=logging.INFO if rank0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        summary = train(cfg, resume=args.resume, overwrite=args.overwrite)
    except (RecalibConfigError, FileNotFoundError) as e:
        print(f"recalibration.run: error: {e}", file=sys.stderr)
        return 2
    if rank0:
        print(format_summary(cfg, summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
