"""Recalibrate a pretrained RoPE model into a DroPE checkpoint the server loads as is.

    python -m recalibration.run --preset tiny                              # CPU, about a minute
    python -m recalibration.run --preset smollm2-135m --max-steps 400      # CPU, ~40 min (5.7 s a step)
    python -m recalibration.run --preset tiny --resume                     # continue after a crash
    torchrun --standalone --nproc_per_node 2 -m recalibration.run --preset tiny --fsdp   # 2 ranks, sharded
    accelerate launch --config_file recalibration/fsdp.yaml -m recalibration.run --preset llama2-7b-gpu
    python -m recalibration.run --preset llama2-7b-gpu --dry-run 8         # its sharding plan on 8 GPUs

Steps: convert the base checkpoint (RoPE removed, QK-norm weights at 1 if the
variant has them), train the transformers reference model at the base's own
context length with AdamW + warmup + cosine decay, checkpoint atomically every
--save-every steps, evaluate held-out loss, and write <output>/final: a DroPE
checkpoint with tokenizer that ``drope-server --model <output>/final`` serves.
Fit beta afterwards with ``python -m recalibration.fit_beta <output>/final``.

Several ranks (torchrun or accelerate launch) train data parallel; with --fsdp (or an
accelerate FSDP config) parameters, gradients and optimizer state are sharded over them
(FSDP2, the same code on CPU and GPU). The sharding plan and memory per rank are logged
before training; --dry-run prints them and stops.

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

from model_patches.config import DropeConfigError

from .config import PRESETS, RecalibConfig, RecalibConfigError, cli_flags, preset

log = logging.getLogger("drope.recalib")
CONFIG_NAME = "recalib_config.json"


def resolve_base(base: str, *, weights: bool = True) -> Path:
    """A local directory, the packaged SmolLM2, a tiny random model, or a hub id (downloaded; without
    weights=True only its config and tokenizer, enough for a dry run)."""
    if base == "tiny":
        from model_patches.assets import cache_root
        from model_patches.tiny import build_tiny_checkpoint

        d = cache_root() / "tiny-rope-base"  # seeded: the same model every time
        if not (d / "config.json").exists():
            # Built aside and renamed into place: under torchrun every rank may get here at once.
            tmp = d.with_name(f"{d.name}.{os.getpid()}")
            build_tiny_checkpoint(
                tmp,
                "llama",
                hidden_size=128,
                num_layers=4,
                num_heads=4,
                num_kv_heads=2,
                max_position_embeddings=128,
                seed=0,
            )
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

        files = ["*.json", "*.model", "*.txt", "*.jinja", *(["*.safetensors"] if weights else [])]
        return Path(snapshot_download(base, allow_patterns=files))
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
            raise RecalibConfigError(
                f"{out} already holds {what}; pass --resume to continue it or --overwrite to replace it"
            )
        if write:
            shutil.rmtree(out)
    if write:
        out.mkdir(parents=True, exist_ok=True)
    return out


def _identity(cfg: RecalibConfig) -> dict[str, Any]:
    # What must match to continue a run: everything but the length of training and the layout over ranks.
    d = cfg.to_dict()
    for k in (
        "max_steps",
        "token_budget",
        "save_every",
        "save_total_limit",
        "eval_every",
        "log_every",
        "fsdp",
        "gradient_checkpointing",
    ):
        d.pop(k)
    return d


@dataclass(frozen=True)
class Layout:
    """How this process takes part in the run, settled once from the config and the launcher."""

    world_size: int
    on_gpu: bool
    fsdp: bool
    """Shard over the ranks (FSDP2): --fsdp, or an accelerate FSDP config."""
    bf16: bool

    @property
    def kind(self) -> str:
        return "fsdp" if self.fsdp and self.world_size > 1 else "ddp" if self.world_size > 1 else "single"


@dataclass(frozen=True)
class Inputs:
    base: Path
    seq_len: int
    tokenizer: Any
    model_config: Any
    """The model that will be trained (DroPE-converted unless keep_rope), for the sharding plan."""
    data_info: dict[str, int]


def train(
    cfg: RecalibConfig, resume: bool = False, overwrite: bool = False, dry_run: int | None = None
) -> dict[str, Any]:
    """One recalibration run; with dry_run=N (0: the launcher's world size) only its checks and plan."""
    layout = settle_layout(cfg, world_size=dry_run or None)
    inputs = check_inputs(cfg, weights=dry_run is None)
    plan = sharding_plan(cfg, layout, inputs)
    if dry_run is not None:
        prepare_output(cfg, resume, overwrite, write=False)
        return {"dry_run": True, "world_size": layout.world_size, "layout": layout.kind, "plan": plan}
    if int(os.environ.get("RANK", "0")) == 0:
        log.info("%s", plan.describe())
    dist, out, init = prepare_run_dir(cfg, layout, inputs, resume, overwrite)
    model, params = load_model(cfg, init, layout)
    facts = report_layout(layout, plan, params)
    trainer, ckpts, progress = build_trainer(cfg, layout, inputs, model, out, resume)
    result = trainer.train(resume_from_checkpoint=ckpts.resume_from)
    return finish(inputs, trainer, ckpts, progress, result, out, dist, facts)


def settle_layout(cfg: RecalibConfig, world_size: int | None = None) -> Layout:
    """World size, device, FSDP and precision; the launcher's environment made to agree with them."""
    import torch

    on_gpu = torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true")
    # accelerate launch with an FSDP config asks for FSDP by this variable. The sharding is ours
    # (sharding.py, on every device type), so accelerate must not apply its own on GPUs as well
    # (nor transformers its accelerate-FSDP loading, which leaves the weights on rank 0 only).
    fsdp = os.environ.pop("ACCELERATE_USE_FSDP", "false").lower() == "true" or cfg.fsdp
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and on_gpu)
    # --precision decides: a launcher's mixed_precision (accelerate config) would otherwise turn
    # on autocast behind it (TrainingArguments reads this variable when bf16 is off).
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launcher != "no" and not (launcher == "bf16" and bf16):
        log.warning(
            "accelerate's mixed_precision %r is overridden by --precision %s (%s)",
            launcher,
            cfg.precision,
            "bf16" if bf16 else "fp32",
        )
    os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16" if bf16 else "no"
    return Layout(world_size=world_size or int(os.environ.get("WORLD_SIZE", "1")), on_gpu=on_gpu, fsdp=fsdp, bf16=bf16)


def check_inputs(cfg: RecalibConfig, weights: bool = True) -> Inputs:
    """Everything that can be wrong with the inputs, checked before the output directory is touched."""
    from transformers import AutoConfig, AutoTokenizer

    import model_patches.reference  # noqa: F401  (registers the DroPE configs with AutoConfig)
    from model_patches.config import FAMILIES, PARENT_TO_DROPE, DropeConfig, is_drope_config, read_config_json

    from .data import check_data

    base = resolve_base(cfg.base, weights=weights)
    base_cfg = read_config_json(base)
    drope = is_drope_config(base_cfg)
    seq_len = cfg.seq_len or (
        DropeConfig.from_hf_config(base_cfg).train_context if drope else base_cfg.get("max_position_embeddings")
    )
    if not seq_len:
        raise RecalibConfigError(f"{base} states no context length; pass --seq-len")
    tokenizer = AutoTokenizer.from_pretrained(base)
    data_info = check_data(cfg.data, tokenizer, seq_len)
    if drope or cfg.keep_rope:
        model_config = AutoConfig.from_pretrained(base)
    else:  # what convert() will write, so that the plan needs no weights
        parent = base_cfg.get("model_type")
        if parent not in PARENT_TO_DROPE:
            raise RecalibConfigError(
                f"model_type {parent!r} cannot be converted to DroPE; expected one of "
                f"{', '.join(sorted(PARENT_TO_DROPE))}"
            )
        model_type = PARENT_TO_DROPE[parent]
        drope_fields = DropeConfig(train_context=seq_len, attention_type=cfg.attention_type).to_hf_fields()
        model_config = AutoConfig.for_model(
            **{**base_cfg, "model_type": model_type, "architectures": [FAMILIES[model_type][0]], **drope_fields}
        )
    return Inputs(base=base, seq_len=seq_len, tokenizer=tokenizer, model_config=model_config, data_info=data_info)


def sharding_plan(cfg: RecalibConfig, layout: Layout, inputs: Inputs) -> Any:
    from . import sharding

    return sharding.plan(
        sharding.meta_model(inputs.model_config),
        fsdp=layout.fsdp,
        world_size=layout.world_size,
        bf16=layout.bf16,
        micro_batch=cfg.micro_batch,
        seq_len=inputs.seq_len,
        gradient_checkpointing=cfg.gradient_checkpointing,
    )


def prepare_run_dir(
    cfg: RecalibConfig, layout: Layout, inputs: Inputs, resume: bool, overwrite: bool
) -> tuple[Any, Path, Path]:
    """The output directory checked by every rank, then written by rank 0 (config, converted init)."""
    from accelerate import PartialState

    from model_patches.config import is_drope_config, read_config_json
    from model_patches.convert import convert

    # Under torchrun / accelerate launch every rank runs this; only rank 0 writes, after all agree.
    dist = PartialState(cpu=not layout.on_gpu)
    out = prepare_output(cfg, resume, overwrite, write=False)
    dist.wait_for_everyone()
    init = inputs.base if is_drope_config(read_config_json(inputs.base)) or cfg.keep_rope else out / "init"
    if dist.is_main_process:
        prepare_output(cfg, resume, overwrite)
        cfg.save(out / CONFIG_NAME)
        if not (init / "config.json").exists():
            convert(inputs.base, init, attention_type=cfg.attention_type, train_context=inputs.seq_len, overwrite=True)
    dist.wait_for_everyone()
    return dist, out, init


def load_model(cfg: RecalibConfig, init: Path, layout: Layout) -> tuple[Any, list[int]]:
    """fp32 master weights (bf16 runs under autocast, and FSDP gathers in bf16), sharded under FSDP;
    and the parameters each rank holds."""
    import torch
    from accelerate.utils import gather_object
    from transformers import set_seed

    from model_patches.reference import load_reference

    from . import sharding

    set_seed(cfg.seed)
    if layout.kind == "fsdp":
        model = sharding.load_sharded(init, world_size=layout.world_size, bf16=layout.bf16)
    else:
        model = load_reference(init, dtype=torch.float32)
    model.train()
    return model, gather_object([sharding.local_parameters(model)])


def report_layout(layout: Layout, plan: Any, params: list[int]) -> dict[str, Any]:
    """Say how the model is laid out over the ranks, measured; the summary's record of it."""
    if layout.kind == "fsdp":
        log.info(
            "model sharded (FSDP2) over %d ranks: %s of %s parameters per rank%s",
            layout.world_size,
            " / ".join(f"{n:,}" for n in params),
            f"{plan.total:,}",
            "" if params == plan.per_rank else f" (the plan said {plan.per_rank})",
        )
    return {
        "world_size": layout.world_size,
        "layout": layout.kind,
        "parameters": plan.total,
        "parameters_per_rank": params,
        "parameters_per_rank_planned": plan.per_rank,
    }


def build_trainer(
    cfg: RecalibConfig, layout: Layout, inputs: Inputs, model: Any, out: Path, resume: bool
) -> tuple[Any, Any, Any]:
    import torch
    from transformers import Trainer
    from transformers.trainer_utils import get_last_checkpoint

    from .data import PackedTrainData, heldout_tokens, pack
    from .trainer import DATA_STATE, Checkpoints, ProgressLog, check_resumable, training_args

    seq_len, world = inputs.seq_len, layout.world_size
    steps = cfg.steps(seq_len, world)
    ckpt_dir = out / "checkpoints"
    last = get_last_checkpoint(str(ckpt_dir)) if resume and ckpt_dir.exists() else None
    train_data = PackedTrainData(cfg.data, inputs.tokenizer, seq_len, cfg.seed)
    data_start = (0, 0)
    if last:
        check_resumable(Path(last))
        saved = json.loads((Path(last) / DATA_STATE).read_text())
        train_data.load_state_dict(saved["stream"])
        data_start = (saved["step"], train_data.start.sequences)
        log.info(
            "resuming from %s; data: seeking to sequence %d (epoch %d)",
            last,
            train_data.start.sequences,
            train_data.start.epoch,
        )
    elif resume:
        log.info("resuming from the start (no complete checkpoint yet)")
    # Held-out sequences in global batches, so the held-out set is the same for any number of ranks.
    held = heldout_tokens(cfg.data, inputs.tokenizer)
    eval_seqs = list(pack(iter([held]), seq_len))[: cfg.eval_batches * cfg.micro_batch * world]
    eval_data = [{"input_ids": torch.tensor(s), "labels": torch.tensor(s)} for s in eval_seqs]
    args = training_args(
        cfg,
        ckpt_dir,
        steps=steps,
        bf16=layout.bf16,
        on_gpu=layout.on_gpu,
        seek=last is not None,
        first_run=last is None,
    )
    ckpts = Checkpoints(ckpt_dir, train_data, cfg.save_total_limit, resume_from=last, data_start=data_start)
    progress = ProgressLog(cfg.tokens_per_step(seq_len, world))
    trainer = Trainer(
        model=model, args=args, train_dataset=train_data, eval_dataset=eval_data, callbacks=[ckpts, progress]
    )
    # Snapshot the stream at every optimizer step's boundary, so a checkpoint can record where it is.
    train_data.snapshot_every = ckpts.sequences_per_step(args)
    return trainer, ckpts, progress


def finish(
    inputs: Inputs, trainer: Any, ckpts: Any, progress: Any, result: Any, out: Path, dist: Any, facts: dict[str, Any]
) -> dict[str, Any]:
    """Held-out loss, final/ (full weights and tokenizer: what the server loads) and summary.json."""
    final_eval = trainer.evaluate()["eval_loss"]
    first_eval = next((h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h), None)
    final = out / "final"
    trainer.save_model(str(final))  # every rank: sharded weights are gathered to rank 0
    summary = {
        "steps": trainer.state.global_step,
        "seq_len": inputs.seq_len,
        "tokens_trained": ckpts.sequences_consumed(trainer.args, trainer.state.global_step) * inputs.seq_len,
        "train_loss": result.training_loss,
        "heldout_loss_start": first_eval,
        "heldout_loss_end": final_eval,
        "heldout_ppl_end": math.exp(final_eval),
        "tokens_per_s": progress.last.get("tokens_per_s"),
        "final_checkpoint": str(final),
        **facts,
        "loss_curve": [[h["step"], h["loss"]] for h in trainer.state.log_history if "loss" in h],
        **inputs.data_info,
    }
    if dist.is_main_process:
        inputs.tokenizer.save_pretrained(str(final))
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def format_summary(cfg: RecalibConfig, s: dict[str, Any]) -> str:
    if s.get("dry_run"):
        return s["plan"].describe()
    start = f"{s['heldout_loss_start']:.4f} -> " if s.get("heldout_loss_start") is not None else ""
    ranks = {
        "single": "1 process",
        "ddp": f"{s['world_size']} ranks, replicated (DDP)",
        "fsdp": f"{s['world_size']} ranks, sharded (FSDP2): {s['parameters_per_rank'][0]:,} of "
        f"{s['parameters']:,} parameters on rank 0",
    }[s["layout"]]
    return "\n".join(
        [
            "",
            "=" * 18 + " recalibration summary " + "=" * 18,
            f"base            : {cfg.base} ({'RoPE kept' if cfg.keep_rope else cfg.attention_type}, L = {s['seq_len']})",
            f"layout          : {ranks}",
            f"steps / tokens  : {s['steps']} / {s['tokens_trained']:,}",
            f"held-out loss   : {start}{s['heldout_loss_end']:.4f} (ppl {s['heldout_ppl_end']:.2f})",
            f"speed           : {s['tokens_per_s'] or float('nan'):.0f} training tokens/s",
            f"checkpoint      : {s['final_checkpoint']}",
            *(
                []
                if cfg.keep_rope
                else [
                    f"next            : python -m recalibration.fit_beta {s['final_checkpoint']} --data {cfg.data.source}"
                ]
            ),
            "=" * 59,
        ]
    )


# ---------------- command line: generated from the config's fields ----------------


@dataclass
class RunOptions:
    """Options of the command, not of the run's config."""

    preset: str = field(
        default="tiny", metadata={"choices": sorted(PRESETS), "help": "starting config (default: tiny)"}
    )
    config: str | None = field(default=None, metadata={"help": "JSON file with a full config (overrides the preset)"})
    set: str | None = field(
        default=None,
        metadata={
            "action": "append",
            "metavar": "KEY=VALUE",
            "help": "any other field, e.g. --set optim.weight_decay=0.05 --set data.heldout_docs=4 (JSON values)",
        },
    )
    resume: bool = field(
        default=False, metadata={"help": "continue the run in --output-dir from its latest checkpoint"}
    )
    overwrite: bool = field(default=False, metadata={"help": "replace whatever --output-dir holds"})
    dry_run: int | None = field(
        default=None,
        metadata={
            "nargs": "?",
            "const": 0,
            "metavar": "RANKS",
            "help": "check everything, print the sharding plan and memory per rank for RANKS ranks (default: the "
            "launcher's), write nothing, stop",
        },
    )


def build_parser() -> Any:
    """One option per config field that has a flag (config.doc(..., flag=...)), absent = the preset's value."""
    from transformers import HfArgumentParser

    flags = make_dataclass(
        "ConfigFlags",
        [
            (
                name,
                typ | None,
                field(default=None, metadata={**meta, **({"nargs": "?", "const": True} if typ is bool else {})}),
            )
            for name, _, typ, meta in cli_flags()
        ],
    )
    return HfArgumentParser(
        [RunOptions, flags],
        prog="python -m recalibration.run",
        description=__doc__,
        formatter_class=RawDescriptionHelpFormatter,
    )


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
    from .launch import accelerate_cpu_launch, relaunch

    rank0 = int(os.environ.get("RANK", "0")) == 0  # torchrun / accelerate launch: one log, one summary
    logging.basicConfig(
        level=logging.INFO if rank0 else logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        cpu_launch = accelerate_cpu_launch()
        if cpu_launch and args.dry_run is None:
            relaunch(cpu_launch)  # does not return
        dry_run = cpu_launch.ranks if cpu_launch and args.dry_run == 0 else args.dry_run
        summary = train(cfg, resume=args.resume, overwrite=args.overwrite, dry_run=dry_run)
    except (RecalibConfigError, DropeConfigError, FileNotFoundError) as e:
        print(f"recalibration.run: error: {e}", file=sys.stderr)
        return 2
    if rank0:
        print(format_summary(cfg, summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
