"""FSDP for recalibration: the model sharded at load time by transformers, on every device type.

accelerate enables its FSDP only for accelerator devices (``AcceleratorState``: a CPU run becomes
plain data parallel), so it cannot give one code path for CPU and GPU. transformers can:
``from_pretrained(distributed_config=DistributedConfig(fsdp_size=N))`` applies torch's FSDP2
(``fully_shard``: each decoder layer a unit, freed after its forward; the final norm and head a unit
kept until backward; the rest at the root) on the device mesh of the running process group (gloo on
CPU, NCCL on GPU), and the Trainer then trains that model without wrapping it again. Each rank holds
a dim-0 slice of every parameter, with its gradient and AdamW state; bf16 gathers weights in bf16
and keeps the fp32 shards as master weights.

What the Trainer does not do for such a model, the rest of this package does: it saves the sharded
optimizer state with the checkpoints (trainer.Checkpoints) and, here, lets its resume load full
weights into the shards (``accept_full_weights``).

``plan`` is the sharding that will be applied, computed from the model's own FSDP plan on a
meta-device copy (no weights read): parameters per rank, exactly, and the memory per rank, partly
estimated. ``recalibration.run --dry-run [RANKS]`` prints it and stops.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

GB = 1e9


@dataclass(frozen=True)
class Plan:
    fsdp: bool
    world_size: int
    model: str
    total: int
    per_rank: list[int]
    """Parameters each rank holds (FSDP: its dim-0 slice of every parameter; otherwise all)."""
    units: list[tuple[str, int, bool]] = field(default_factory=list)
    """FSDP units: (module name(s), parameters, freed after forward)."""
    memory: dict[str, float] = field(default_factory=dict)
    """Bytes on the busiest rank, by kind; activations are an estimate."""

    @property
    def sharded(self) -> bool:
        return self.fsdp and self.world_size > 1

    def describe(self) -> str:
        how = (
            f"FSDP2, fully sharded over {self.world_size} ranks"
            if self.sharded
            else f"replicated on {self.world_size} ranks (DDP)"
            if self.world_size > 1
            else "one process"
        )
        lines = [
            "",
            "=" * 24 + " sharding plan " + "=" * 25,
            f"model           : {self.model}, {self.total:,} parameters",
            f"layout          : {how}",
        ]
        if self.sharded:
            groups: dict[tuple[str, int, bool], int] = {}
            for name, n, free in self.units:
                key = (re.sub(r"\.\d+(?=\.|$)", ".*", name), n, free)
                groups[key] = groups.get(key, 0) + 1
            for (name, n, free), count in groups.items():
                lines.append(
                    f"  unit          : {f'{count} x ' if count > 1 else ''}{name}: {n:,} parameters"
                    f"{', freed after forward' if free else ', kept until backward'}"
                )
        ranks = self.per_rank if len(set(self.per_rank)) > 1 else self.per_rank[:1]
        lines.append(
            f"parameters/rank : {' / '.join(f'{n:,}' for n in ranks)}"
            f"{'' if len(ranks) > 1 else ' on every rank'} ({self.per_rank[0] / self.total:.1%} of the model)"
        )
        lines.append("memory (rank 0) :")
        for kind, b in [*self.memory.items(), ("total", sum(self.memory.values()))]:
            lines.append(f"  {kind:<52}{b / GB:8.2f} GB" if b >= GB / 10 else f"  {kind:<52}{b / 1e6:8.2f} MB")
        lines.append("=" * 64)
        return "\n".join(lines)


def meta_model(config: Any) -> nn.Module:
    """The model without weights (meta device): its structure and FSDP plan, for any size."""
    from transformers import AutoModelForCausalLM

    import model_patches.reference  # noqa: F401  (registers the DroPE classes)

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def plan(
    model: nn.Module,
    *,
    fsdp: bool,
    world_size: int,
    bf16: bool,
    micro_batch: int,
    seq_len: int,
    gradient_checkpointing: bool,
) -> Plan:
    """What each rank will hold. ``model`` may be on the meta device."""
    params = list({id(p): p for p in model.parameters()}.values())
    total = sum(p.numel() for p in params)
    shard = fsdp and world_size > 1
    per_rank = (
        [
            sum(_rows(p, world_size, r) * (p.numel() // p.shape[0] if p.dim() else 1) for p in params)
            for r in range(world_size)
        ]
        if shard
        else [total] * world_size
    )
    units = _units(model) if shard else []
    act = 2 if bf16 else 4
    mine = per_rank[0]
    memory = {"weights (fp32 master)": 4.0 * mine, "gradients (fp32)": 4.0 * mine, "AdamW state (2 x fp32)": 8.0 * mine}
    if shard:  # a freed unit and the next one (prefetched) at a time, kept units throughout, all in compute dtype
        free = max((n for _, n, f in units if f), default=0)
        kept = sum(n for _, n, f in units if not f) + total - sum(n for _, n, _ in units)
        memory[f"gathered weights ({'bf16' if bf16 else 'fp32'})"] = act * (2 * free + kept)
        memory["unsharded gradient of one unit (fp32)"] = 4.0 * free
    c = model.config
    h, kv = c.hidden_size, c.num_key_value_heads * getattr(c, "head_dim", c.hidden_size // c.num_attention_heads)
    tokens = micro_batch * seq_len
    # Saved for backward per token and layer: norm inputs and outputs, q, k, v, attention output,
    # gate, up, act(gate), their product (SDPA keeps no score matrix): 6h + 2kv + 4I elements.
    layer = tokens * (6 * h + 2 * kv + 4 * c.intermediate_size) * act
    layers = (c.num_hidden_layers * tokens * h * act + layer) if gradient_checkpointing else c.num_hidden_layers * layer
    memory[
        f"activations (estimate, {micro_batch} x {seq_len} tokens{', recomputed' if gradient_checkpointing else ''})"
    ] = layers + tokens * c.vocab_size * (act + 8)
    return Plan(
        fsdp=fsdp,
        world_size=world_size,
        model=type(model).__name__,
        total=total,
        per_rank=per_rank,
        units=units,
        memory=memory,
    )


def _rows(p: torch.Tensor, world_size: int, rank: int) -> int:
    """Rows of p's dim 0 on rank: FSDP2 shards dim 0 like torch.chunk (ceil-sized chunks, the last ones short)."""
    if p.dim() == 0:
        return 1 if rank == 0 else 0
    chunk = math.ceil(p.shape[0] / world_size)
    return max(0, min(chunk, p.shape[0] - rank * chunk))


def _units(model: nn.Module) -> list[tuple[str, int, bool]]:
    """The modules transformers shards one by one: the model's ``fsdp_plan`` ("free_full_weight": freed
    after forward; "keep_full_weight": kept), with tied input/output embeddings one kept unit."""
    rules = dict(model.fsdp_plan)
    if getattr(model.config, "tie_word_embeddings", False):
        emb = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
        rules.pop(emb, None)
    units = []
    for name, module in model.named_modules():
        rule = rules.get(name) or rules.get(re.sub(r"\.\d+(?=\.|$)", ".*", name))
        if rule:
            units.append((name, sum(p.numel() for p in module.parameters()), rule == "free_full_weight"))
    return units


def load_sharded(path: Any, *, world_size: int, bf16: bool) -> nn.Module:
    """The checkpoint at path in fp32, each rank reading and holding only its shards."""
    from transformers import AutoModelForCausalLM, DistributedConfig

    import model_patches.reference  # noqa: F401  (registers the DroPE classes)

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, distributed_config=DistributedConfig(fsdp_size=world_size, fsdp_mixed_precision=bf16)
    )
    accept_full_weights(model)
    return model


def accept_full_weights(model: nn.Module) -> None:
    """Let ``model.load_state_dict`` take full tensors: the Trainer resumes that way (every rank loads the
    checkpoint's model.safetensors), and FSDP2's DTensor parameters refuse a plain tensor (``copy_``). A
    load pre-hook (public nn.Module API) cuts each rank's slice out first, without communication."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    def cut(module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
        for name, p in module.named_parameters():
            full = state_dict.get(prefix + name)
            if isinstance(p, DTensor) and isinstance(full, torch.Tensor) and not isinstance(full, DTensor):
                state_dict[prefix + name] = distribute_tensor(
                    full.to(p.device, p.dtype), p.device_mesh, p.placements, src_data_rank=None
                )

    model.register_load_state_dict_pre_hook(cut)


def local_parameters(model: nn.Module) -> int:
    """Parameters this rank holds (its shards under FSDP)."""
    from torch.distributed.tensor import DTensor

    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in model.parameters())
