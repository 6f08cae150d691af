"""FullWidthRMSNorm under simulated tensor parallelism: shards + one all-reduced scalar = the full norm.

No GPUs here, so the ranks are simulated in one process: each rank's module is
built with patched rank / world size, loads its shard of the full weight through
its weight_loader, and the all-reduce is replaced by the true sum over ranks.
Includes the case of fewer KV heads than ranks (replicated heads).

    python -m pytest tests/test_tp_norm.py
"""

import pytest
import torch

import model_patches.layers as layers
from transformers.models.llama.modeling_llama import LlamaRMSNorm


@pytest.mark.parametrize("heads,tp", [(8, 1), (8, 2), (8, 4), (2, 4), (1, 2)])
def test_sharded_norm_equals_full_norm(monkeypatch, heads, tp):
    head_dim, eps, T = 16, 1e-5, 5
    torch.manual_seed(0)
    x = torch.randn(T, heads * head_dim)
    weight = 1 + 0.3 * torch.randn(heads * head_dim)
    ref = LlamaRMSNorm(heads * head_dim, eps)
    ref.weight.data.copy_(weight)
    want = ref(x)

    # How vLLM's QKVParallelLinear lays heads out: rank r holds block r // replicas.
    local_heads = max(1, heads // tp)
    replicas = max(1, tp // heads)
    shards = [x[:, (r // replicas) * local_heads * head_dim:((r // replicas) + 1) * local_heads * head_dim] for r in range(tp)]
    total = sum(s.pow(2).sum(-1, keepdim=True) for s in shards)  # what the all-reduce returns

    outs = []
    for r in range(tp):
        monkeypatch.setattr(layers, "get_tensor_model_parallel_world_size", lambda: tp)
        monkeypatch.setattr(layers, "get_tensor_model_parallel_rank", lambda r=r: r)
        monkeypatch.setattr(layers, "tensor_model_parallel_all_reduce", lambda t: total)
        norm = layers.FullWidthRMSNorm(heads, head_dim, eps)
        norm.weight_loader(norm.weight, weight)
        outs.append(norm(shards[r]))
    got = torch.cat([outs[r] for r in range(0, tp, replicas)], dim=-1)  # one copy of each block
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for r in range(tp):  # replicas agree
        torch.testing.assert_close(outs[r], outs[(r // replicas) * replicas])
