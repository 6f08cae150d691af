"""beta as pure maths (model_patches/beta.py): no vLLM, no model.

python -m pytest tests/test_beta.py
"""

import math

import pytest
import torch

from model_patches.beta import beta_of_s, query_scale, scale_queries

L = 4096


def test_zero_coef_is_identity_everywhere():
    p = torch.tensor([0, L - 1, L, 10 * L, 10**9])
    assert torch.equal(query_scale(p, L, 0.0), torch.ones(5))


def test_one_below_and_at_train_context():
    # positions 0 .. L-1 are the first L tokens: s = (p+1)/L <= 1, beta = 1 exactly.
    p = torch.arange(L)
    assert torch.equal(query_scale(p, L, 0.412), torch.ones(L))


def test_log_above_train_context():
    p = torch.tensor([L, 2 * L - 1, 4 * L - 1, 16 * L - 1])
    want = torch.tensor([1 + 0.412 * math.log((x + 1) / L) for x in p.tolist()])
    torch.testing.assert_close(query_scale(p, L, 0.412), want, rtol=1e-6, atol=0)
    assert query_scale(torch.tensor([2 * L - 1]), L, 0.1).item() == pytest.approx(1 + 0.1 * math.log(2))


def test_very_large_positions_stay_finite_and_exact_enough():
    p = torch.tensor([10**7, 10**9, 2**31 - 1], dtype=torch.int64)
    got = query_scale(p, L, 0.103)
    want = torch.tensor([1 + 0.103 * math.log((x + 1) / L) for x in p.tolist()])
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_float32_whatever_the_position_dtype():
    for dt in (torch.int32, torch.int64, torch.float32):
        assert query_scale(torch.tensor([5, 9000], dtype=dt), L, 0.3).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scale_queries_keeps_dtype_and_broadcasts_over_heads(dtype):
    q = torch.ones(3, 8, dtype=dtype)  # vLLM layout [T, H*D]
    p = torch.tensor([0, 2 * L - 1, 8 * L - 1])
    out = scale_queries(q, p, L, 0.5, "log")
    assert out.dtype == dtype and out.shape == q.shape
    want = query_scale(p, L, 0.5)[:, None].expand(3, 8).to(dtype)
    assert torch.equal(out, want)
    # HF layout [B, S, H*D] with positions [B, S]
    out = scale_queries(torch.ones(2, 3, 8, dtype=dtype), p.expand(2, 3), L, 0.5, "log")
    assert torch.equal(out[1], want)


def test_floor_mode_is_vllm_llama4_code():
    """Checked against vLLM's own Llama-4 NoPE temperature, called for real, and against hand values."""
    from types import SimpleNamespace

    from vllm.model_executor.models.llama4 import Llama4Attention

    p = torch.tensor([0, L - 2, L - 1, 2 * L - 1, 3 * L, 100 * L])
    layer = SimpleNamespace(floor_scale=float(L), attn_scale=0.2)  # what Llama4Attention reads from its config
    vllm_scale = Llama4Attention._get_attn_scale(layer, p.float())[:, 0]
    torch.testing.assert_close(query_scale(p, L, 0.2, "floor"), vllm_scale)
    # By hand: beta = 1 + 0.2 ln(floor((p + 1) / 64) + 1)
    hand = torch.tensor(
        [1.0, 1.0, 1.0 + 0.2 * math.log(2), 1.0 + 0.2 * math.log(3), 1.0 + 0.2 * math.log(4), 1.0 + 0.2 * math.log(101)]
    )
    torch.testing.assert_close(query_scale(p, L, 0.2, "floor"), hand)


def test_none_mode_and_bad_mode():
    assert torch.equal(query_scale(torch.tensor([10 * L]), L, 1.0, "none"), torch.ones(1))
    with pytest.raises(ValueError, match="beta mode"):
        query_scale(torch.tensor([1]), L, 1.0, "cubic")


def test_scalar_form_matches_tensor_form():
    for s in (0.5, 1.0, 2.0, 8.0):
        assert beta_of_s(s, 0.412) == pytest.approx(query_scale(torch.tensor([s * L - 1]), L, 0.412).item(), rel=1e-6)


def test_table_lookup_equals_direct_formula():
    from model_patches.beta import query_scale_table

    table = query_scale_table(8 * 64, 64, 0.3, "log")
    p = torch.tensor([0, 63, 64, 200, 8 * 64 - 1])
    assert torch.equal(table[p], query_scale(p, 64, 0.3, "log"))
