"""beta: the length-dependent attention-logit scale of DroPE, as pure maths.

    beta(s) = 1 + c * ln(s),  s = (p + 1) / L_train,  beta = 1 for s <= 1

Scaling the *query* of the token at absolute position p by beta((p+1)/L_train)
multiplies every logit that token computes, leaves the KV cache untouched and so
keeps chunked prefill and prefix caching exact. The ``floor`` mode is vLLM's
Llama-4 NoPE temperature, ``1 + c * ln(floor((p+1)/L) + 1)``, kept so the two
can be compared on the same checkpoint.

No vLLM import: the vLLM patches (a per-position table, changed in place by
fit_beta) and the transformers reference call these functions, and they are
tested on their own.
"""

from __future__ import annotations

import math

import torch


def beta_of_s(s: float, coef: float) -> float:
    """Scalar beta at extension factor s (the formula as the paper writes it; tests check the tensor forms against it)."""
    return 1.0 + coef * math.log(s) if s > 1.0 else 1.0


def query_scale(positions: torch.Tensor, train_context: int, coef: float, mode: str = "log") -> torch.Tensor:
    """Per-token query multiplier, float32, same shape as ``positions``.

    positions: integer absolute positions p, any shape (vLLM: [T]; HF: [B, S]).
    Computed in float32 whatever the model dtype: beta - 1 is small and a bf16
    beta would quantise it to steps of ~0.008.
    """
    # s: [...] float32; p + 1 because position p is the (p+1)-th token.
    s = (positions.to(torch.float32) + 1.0) / float(train_context)
    if mode == "log":
        return 1.0 + coef * torch.log(s.clamp_min(1.0))
    if mode == "floor":
        return 1.0 + coef * torch.log(torch.floor(s) + 1.0)
    if mode == "none":
        return torch.ones_like(s)
    raise ValueError(f"unknown beta mode {mode!r}")


def query_scale_table(n_positions: int, train_context: int, coef: float, mode: str = "log") -> torch.Tensor:
    """beta for positions 0 .. n-1: [n] float32, on the default device.

    The vLLM path indexes this table with each step's positions, as RoPE indexes
    its cos/sin cache: one gather per layer instead of recomputing a log.
    """
    return query_scale(torch.arange(n_positions), train_context, coef, mode)


def apply_query_scale(q: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """q * beta in float32, broadcasting beta over q's trailing dims; keeps q's dtype.

    q: [*beta.shape, ...] - vLLM: q [T, H*D], beta [T]; HF: q [B, S, H*D], beta [B, S].
    """
    beta = beta.reshape(*beta.shape, *([1] * (q.dim() - beta.dim())))
    return (q.to(torch.float32) * beta).to(q.dtype)


def scale_queries(q: torch.Tensor, positions: torch.Tensor, train_context: int, coef: float, mode: str) -> torch.Tensor:
    """q * beta(positions): the direct form the transformers reference uses."""
    return apply_query_scale(q, query_scale(positions, train_context, coef, mode))
