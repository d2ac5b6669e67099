"""GLM-130B's changes to GLM (Zeng et al. 2022, "GLM-130B", §2.1-§3, App. B), each a switch on ``GLMConfig``.

The ops' gradient checks are rows of tests/test_ops_table.py (geglu, rope_1d/2d against the complex rotation,
grad_scale, attention_fp32_softmax). Here: the known answers behind each switch (erf, the FP32-softmax trick in
float32 and float16, EGS's forward and gradient, RoPE's relative positions), the DeepNorm and GeGLU layers against
hand-written NumPy, the 2-D RoPE model against SAT's ``glm130B_model.py`` (tests/fixtures/make_sat130b_fixture.py),
decoding with a cache for every switch, and the bad inputs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import minglm.functional as F
from minglm.tensor import Tensor

# --- the ops ------------------------------------------------------------------------------------------------------


def test_erf_float64_is_exact_to_an_ulp_and_float32_to_4e7():
    x = np.concatenate([np.linspace(-9.0, 9.0, 36001), [0.0, -0.0, 1e-300, 0.84375, 1.25, 1 / 0.35, 6.0, 40.0]])
    want = np.array([math.erf(v) for v in x])
    np.testing.assert_allclose(F._erf(x), want, rtol=0, atol=2.3e-16)
    x32 = x.astype(np.float32)
    got32 = F._erf(x32)
    assert got32.dtype == np.float32
    np.testing.assert_allclose(got32, [math.erf(float(v)) for v in x32], rtol=0, atol=4e-7)
    assert np.isnan(F._erf(np.array([np.nan]))).all()
    assert F._erf(np.array([np.inf, -np.inf])).tolist() == [1.0, -1.0]


def _attn_args(rng, B=2, H=2, T=6, D=4, dtype=np.float32, scale=1.0):
    q, k, v = (rng.standard_normal((B, H, T, D)) * scale for _ in range(3))
    return [Tensor(a.astype(dtype)) for a in (q, k, v)], np.array([2, 4])


def test_fp32_softmax_equals_plain_softmax_in_float32():
    (q, k, v), sep = _attn_args(np.random.default_rng(0), scale=3.0)
    plain = F.scaled_dot_product_attention(q, k, v, sep, impl="plain").numpy()
    for coeff in (1.0, 4.0, 70.0):
        scaled = F.scaled_dot_product_attention(q, k, v, sep, softmax_coeff=coeff).numpy()
        assert scaled.dtype == np.float32
        np.testing.assert_allclose(scaled, plain, rtol=1e-5, atol=1e-6)


def test_fp32_softmax_keeps_float16_scores_finite_where_plain_float16_overflows():
    # q·k/√D between 7e4 and 3e5, above 65504 (float16's largest value), as in a deep layer of a large fp16 model;
    # divided by c = 8 first, the scores stay below 4e4.
    rng = np.random.default_rng(1)
    q, k = (Tensor((rng.uniform(0.5, 1.0, (2, 2, 6, 4)) * 370).astype(np.float16)) for _ in range(2))
    v = Tensor(rng.standard_normal((2, 2, 6, 4)).astype(np.float16))
    sep = np.array([2, 4])
    with np.errstate(over="ignore", invalid="ignore"):
        plain = F.scaled_dot_product_attention(q, k, v, sep, impl="plain").numpy()
        scaled = F.scaled_dot_product_attention(q, k, v, sep, softmax_coeff=8.0).numpy()
    assert not np.isfinite(plain).all(), "the plain float16 path should overflow on these scores"
    assert scaled.dtype == np.float16 and np.isfinite(scaled).all()
    vv = v.numpy()  # each output is a convex combination of the values of its head
    assert (scaled >= vv.min(axis=2, keepdims=True) - 1e-3).all()
    assert (scaled <= vv.max(axis=2, keepdims=True) + 1e-3).all()


def test_grad_scale_keeps_the_forward_and_scales_the_gradient():
    x = Tensor(np.random.default_rng(2).standard_normal((3, 4)), requires_grad=True)
    y = F.grad_scale(x, 0.1)
    np.testing.assert_array_equal(y.numpy(), x.numpy())
    g = np.random.default_rng(3).standard_normal((3, 4))
    y.backward(g)
    np.testing.assert_allclose(x.grad, 0.1 * g, rtol=1e-15)


def test_rope_scores_depend_only_on_the_position_difference():
    """RoPE's point: after rotating q by position m and k by n, q·k is a function of m − n (per head)."""
    rng = np.random.default_rng(4)
    q, k = rng.standard_normal((1, 1, 1, 8)), rng.standard_normal((1, 1, 1, 8))

    def score(m, n):
        rq = F.rope(Tensor(q), *F.rotary_tables([np.array([[m]])], 8, np.float64)).numpy()
        rk = F.rope(Tensor(k), *F.rotary_tables([np.array([[n]])], 8, np.float64)).numpy()
        return float((rq * rk).sum())

    assert score(7, 3) == pytest.approx(score(14, 10), abs=1e-12)
    assert score(7, 3) == pytest.approx(score(4, 0), abs=1e-12)
    assert score(0, 0) == pytest.approx(float((q * k).sum()), abs=1e-12)
    assert abs(score(7, 3) - score(3, 7)) > 1e-3  # the direction matters


def test_rope_refuses_an_odd_head_size():
    with pytest.raises(ValueError, match="even"):
        F.rotary_tables([np.zeros((1, 2), dtype=np.int64)], 7)
    with pytest.raises(ValueError, match="2 chunk"):
        F.rotary_tables([np.zeros((1, 2), dtype=np.int64)] * 2, 6)
