"""The full-width QK-norm under tensor parallelism, without starting ranks: one all-reduce per layer.

Rank 0 of a TP=2 layout is built in-process with the TP queries patched; the
all-reduce is replaced by "add rank 1's share", computed from rank 1's inputs.
The real TP=2 / TP=4 layouts are compared with one rank in test_parallel.py (slow).
"""

from __future__ import annotations

import torch

from model_patches import layers

T, HEAD_DIM, EPS = 5, 8, 1e-6


def test_q_and_k_statistics_travel_in_one_all_reduce(monkeypatch):
    """Fails if q and k are reduced separately (two calls) or if a statistic is split wrong."""
    monkeypatch.setattr(layers, "get_tensor_model_parallel_world_size", lambda: 2)
    monkeypatch.setattr(layers, "get_tensor_model_parallel_rank", lambda: 0)
    g = torch.Generator().manual_seed(0)
    q_full, k_full = torch.randn(T, 4 * HEAD_DIM, generator=g), torch.randn(T, 2 * HEAD_DIM, generator=g) * 3
    wq, wk = torch.rand(4 * HEAD_DIM, generator=g) + 0.5, torch.rand(2 * HEAD_DIM, generator=g) + 0.5
    q_norm, k_norm = layers.FullWidthRMSNorm(4, HEAD_DIM, EPS), layers.FullWidthRMSNorm(2, HEAD_DIM, EPS)
    q_norm.weight_loader(q_norm.weight, wq)
    k_norm.weight_loader(k_norm.weight, wk)
    (q0, q1), (k0, k1) = q_full.chunk(2, dim=-1), k_full.chunk(2, dim=-1)

    rank1_share = torch.cat([q1.pow(2).sum(-1, keepdim=True), k1.pow(2).sum(-1, keepdim=True)], dim=-1)
    calls = []

    def all_reduce(t):
        calls.append(tuple(t.shape))
        return t + rank1_share

    monkeypatch.setattr(layers, "tensor_model_parallel_all_reduce", all_reduce)
    q, k = layers.full_width_qk_norm(q0, k0, q_norm, k_norm)
    assert calls == [(T, 2)]

    def rms_norm(x, w):  # one rank holding the whole width
        return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)

    torch.testing.assert_close(q, rms_norm(q_full, wq)[:, : 2 * HEAD_DIM])
    torch.testing.assert_close(k, rms_norm(k_full, wk)[:, :HEAD_DIM])
