"""The one vLLM layer DroPE adds: RMSNorm over a whole q / k projection, tensor-parallel.

Sakana's QK-norm normalises the flattened q_proj (k_proj) output of a token over
*all* heads, with one weight vector of length heads * head_dim. Under tensor
parallelism each rank holds only its heads, so the mean square must be summed
across ranks. We all-reduce one scalar per token (the local sum of squares)
instead of all-gathering q as vLLM's OLMoE does: [T, 1] floats on the wire
instead of [T, H*D]; with both norms, q's and k's scalars go in one all-reduce
(``full_width_qk_norm``).

When KV heads are replicated (fewer KV heads than ranks) every head appears the
same number of times across ranks, so dividing the all-reduced sum by
local_width * tp_size still gives the mean over the true width.
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.distributed import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_reduce,
)
from vllm.model_executor.utils import set_weight_attrs


class FullWidthRMSNorm(nn.Module):
    def __init__(self, total_heads: int, head_dim: int, eps: float):
        super().__init__()
        self.tp_size = get_tensor_model_parallel_world_size()
        self.tp_rank = get_tensor_model_parallel_rank()
        # Heads on this rank, and which contiguous block of the full weight they are
        # (QKVParallelLinear's sharding: replicated KV heads share a block).
        local_heads = max(1, total_heads // self.tp_size)
        replicas = max(1, self.tp_size // total_heads)
        self.shard = self.tp_rank // replicas
        self.local_width = local_heads * head_dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(self.local_width))
        set_weight_attrs(self.weight, {"weight_loader": self.weight_loader})

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        start = self.shard * self.local_width
        param.data.copy_(loaded[start : start + self.local_width])

    def sum_of_squares(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, local_width] -> [T, 1] float32, this rank's part of the sum
        return x.to(torch.float32).pow(2).sum(dim=-1, keepdim=True)

    def normalize(self, x: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
        # sq: [T, 1], summed over all ranks
        var = sq / (self.local_width * self.tp_size)
        # Cast before the weight multiply, as transformers' LlamaRMSNorm does.
        return self.weight * (x.to(torch.float32) * torch.rsqrt(var + self.eps)).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sq = self.sum_of_squares(x)
        if self.tp_size > 1:
            sq = tensor_model_parallel_all_reduce(sq)
        return self.normalize(x, sq)


def full_width_qk_norm(
    q: torch.Tensor, k: torch.Tensor, q_norm: FullWidthRMSNorm | None, k_norm: FullWidthRMSNorm | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k normalised; with both norms under TP, one all-reduce per layer instead of two.

    The all-reduce is latency-bound at these sizes ([T, 1] floats each), so the two
    statistics travel together as one [T, 2] tensor.
    """
    if q_norm is None or k_norm is None or q_norm.tp_size == 1:
        return (q if q_norm is None else q_norm(q)), (k if k_norm is None else k_norm(k))
    sq = tensor_model_parallel_all_reduce(torch.cat([q_norm.sum_of_squares(q), k_norm.sum_of_squares(k)], dim=-1))
    return q_norm.normalize(q, sq[:, :1]), k_norm.normalize(k, sq[:, 1:])
