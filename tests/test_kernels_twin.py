"""The NumPy twin of the fused attention kernel against plain masked attention (docs/mask.md).

Forward (o, lse) and backward (dq, dk, dv) must match the dense reference for random shapes, tile sizes and sep,
including T not a multiple of the tile, sep = 0 and sep = T, and the optional ``lengths``. The twin must never hold
a T×T array, and the reference's backward must match central differences.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minglm import kernels
from minglm.kernels import twin
from minglm.kernels.reference import glm_mask, reference_attention


def _inputs(rng, B, H, T, D, dtype):
    return tuple(rng.standard_normal((B, H, T, D)).astype(dtype) for _ in range(4))  # q, k, v, do


def _compare(q, k, v, do, sep, block_q, block_k, tol, lengths=None, scale=None):
    o_ref, lse_ref, backward = reference_attention(q, k, v, sep, scale=scale, lengths=lengths)
    grads_ref = backward(do)
    o, lse = twin.flash_attention_forward(q, k, v, sep, scale, block_q=block_q, block_k=block_k, lengths=lengths)
    grads = twin.flash_attention_backward(
        q, k, v, o, lse, do, sep, scale, block_q=block_q, block_k=block_k, lengths=lengths
    )
    assert o.dtype == q.dtype and lse.dtype == q.dtype
    assert lse.shape == q.shape[:3]
    np.testing.assert_allclose(o, o_ref, atol=tol, rtol=tol, err_msg="o")
    np.testing.assert_allclose(lse, lse_ref, atol=tol, rtol=tol, err_msg="lse")
    for name, g, g_ref in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert g.dtype == q.dtype and g.shape == q.shape, name
        np.testing.assert_allclose(g, g_ref, atol=tol, rtol=tol, err_msg=name)


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 4),
    H=st.integers(1, 3),
    T=st.integers(1, 70),
    D=st.sampled_from([1, 4, 8, 16]),
    block_q=st.sampled_from([1, 8, 16, 64, 256]),
    block_k=st.sampled_from([1, 8, 32, 64, 256]),
    seed=st.integers(0, 2**31 - 1),
)
def test_twin_matches_reference_float64(B, H, T, D, block_q, block_k, seed):
    rng = np.random.default_rng(seed)
    q, k, v, do = _inputs(rng, B, H, T, D, np.float64)
    sep = rng.integers(0, T + 1, size=B)
    _compare(q, k, v, do, sep, block_q, block_k, tol=1e-12)


@pytest.mark.parametrize("sep_kind", ["zero", "full", "random"])
@pytest.mark.parametrize("T,block_q,block_k", [(100, 32, 64), (64, 64, 64), (130, 256, 256), (257, 64, 128)])
def test_twin_matches_reference_float32(sep_kind, T, block_q, block_k):
    rng = np.random.default_rng(T + block_q)
    B, H, D = 3, 2, 32
    q, k, v, do = _inputs(rng, B, H, T, D, np.float32)
    sep = {"zero": np.zeros(B, int), "full": np.full(B, T), "random": rng.integers(0, T + 1, size=B)}[sep_kind]
    _compare(q, k, v, do, sep, block_q, block_k, tol=2e-5)


@pytest.mark.parametrize("sep_value", [0, 5, 40])
def test_sep_edge_cases_are_causal_or_bidirectional(sep_value):
    """sep = 0 is plain causal attention; sep = T is full bidirectional attention."""
    rng = np.random.default_rng(1)
    T = 40
    q, k, v, do = _inputs(rng, 2, 2, T, 8, np.float64)
    sep = np.full(2, sep_value)
    o, _ = twin.flash_attention_forward(q, k, v, sep, block_q=16, block_k=16)
    s = np.einsum("bhid,bhjd->bhij", q, k) / np.sqrt(8.0)
    visible = np.tril(np.ones((T, T), bool)) | (np.arange(T)[None, :] < sep_value)
    s = np.where(visible, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(o, p @ v, atol=1e-12)


def test_lengths_make_pad_rows_absent():
    """With lengths, real rows are unchanged, pad rows give 0 and finite lse, and pads get no gradient."""
    rng = np.random.default_rng(2)
    B, H, T, D = 4, 2, 75, 8
    q, k, v, do = _inputs(rng, B, H, T, D, np.float64)
    sep = np.array([0, 10, 30, 75])
    lengths = np.array([50, 10, 60, 75])
    _compare(q, k, v, do, sep, 16, 32, tol=1e-12, lengths=lengths)
    o_full, lse_full = twin.flash_attention_forward(q, k, v, sep, block_q=16, block_k=32)
    o, lse = twin.flash_attention_forward(q, k, v, sep, block_q=16, block_k=32, lengths=lengths)
    real = np.arange(T)[None, :] < lengths[:, None]  # (B, T)
    np.testing.assert_allclose(o[real[:, None, :].repeat(H, 1)], o_full[real[:, None, :].repeat(H, 1)], atol=1e-12)
    assert np.isfinite(o).all() and np.isfinite(lse).all()
    assert (o[~real[:, None, :].repeat(H, 1)] == 0).all()
    dq, dk, dv = twin.flash_attention_backward(q, k, v, o, lse, do, sep, block_q=16, block_k=32, lengths=lengths)
    pad = ~real[:, None, :, None]
    assert (dq * pad == 0).all() and (dk * pad == 0).all() and (dv * pad == 0).all()


def test_float32_stays_float32_and_scale_is_used():
    rng = np.random.default_rng(3)
    q, k, v, do = _inputs(rng, 2, 2, 33, 16, np.float32)
    sep = np.array([3, 20])
    _compare(q, k, v, do, sep, 8, 16, tol=2e-5, scale=0.3)
    o, lse = kernels.flash_attention_forward(q, k, v, sep, 0.3)
    dq, dk, dv = kernels.flash_attention_backward(q, k, v, o, lse, do, sep, 0.3)
    assert {a.dtype for a in (o, lse, dq, dk, dv)} == {np.dtype(np.float32)}


def test_future_keys_past_sep_do_not_matter():
    """Property of the mask: changing keys/values j >= max(sep, i + 1) leaves query rows <= i unchanged."""
    rng = np.random.default_rng(4)
    B, H, T, D = 3, 2, 50, 8
    q, k, v, _ = _inputs(rng, B, H, T, D, np.float64)
    sep = np.array([0, 12, 25])
    o, _ = twin.flash_attention_forward(q, k, v, sep, block_q=16, block_k=16)
    cut = 30  # rows <= 29 never see keys >= 30 for these sep values
    k2, v2 = k.copy(), v.copy()
    k2[:, :, cut:] = rng.standard_normal(k2[:, :, cut:].shape)
    v2[:, :, cut:] = rng.standard_normal(v2[:, :, cut:].shape)
    o2, _ = twin.flash_attention_forward(q, k2, v2, sep, block_q=16, block_k=16)
    np.testing.assert_array_equal(o[:, :, :cut], o2[:, :, :cut])
    assert not np.allclose(o[:, :, cut:], o2[:, :, cut:])


def test_glm_mask_matches_figure_2():
    """docs/figure2.md §5: 10×10, sep = 5."""
    expected = np.zeros((10, 10), bool)
    expected[:5, :5] = True
    for r in range(5, 10):
        expected[r, : r + 1] = True
    np.testing.assert_array_equal(glm_mask(np, np.array([5]), 10)[0, 0], expected)


def test_reference_backward_matches_central_differences():
    rng = np.random.default_rng(5)
    q, k, v, do = _inputs(rng, 2, 1, 7, 3, np.float64)
    sep = np.array([3, 0])
    lengths = np.array([6, 7])
    _, _, backward = reference_attention(q, k, v, sep, lengths=lengths)
    analytic = backward(do)
    eps = 1e-6
    for idx_in, x in enumerate((q, k, v)):
        numeric = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            args_p = [q.copy(), k.copy(), v.copy()]
            args_m = [q.copy(), k.copy(), v.copy()]
            args_p[idx_in][idx] += eps
            args_m[idx_in][idx] -= eps
            fp = (reference_attention(*args_p, sep, lengths=lengths)[0] * do).sum()
            fm = (reference_attention(*args_m, sep, lengths=lengths)[0] * do).sum()
            numeric[idx] = (fp - fm) / (2 * eps)
        np.testing.assert_allclose(analytic[idx_in], numeric, atol=1e-8, err_msg=f"input {'qkv'[idx_in]}")


def test_twin_never_allocates_a_t_by_t_array():
    rng = np.random.default_rng(6)
    B, H, T, D = 2, 2, 2048, 8
    q, k, v, do = _inputs(rng, B, H, T, D, np.float32)
    sep = np.array([300, 700])
    tracemalloc.start()
    try:
        o, lse = twin.flash_attention_forward(q, k, v, sep, block_q=128, block_k=128)
        _, peak_fwd = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        twin.flash_attention_backward(q, k, v, o, lse, do, sep, block_q=128, block_k=128)
        _, peak_bwd = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    scores_bytes = B * H * T * T * 4  # one (B, H, T, T) float32 matrix: 64 MiB
    inputs_bytes = B * H * T * D * 4  # one (B, H, T, D) array: 0.125 MiB
    assert peak_fwd < scores_bytes / 8, (peak_fwd, scores_bytes)  # all O(T): inputs, copies, tile buffers
    assert peak_bwd < scores_bytes / 8, (peak_bwd, scores_bytes)
    assert peak_bwd > inputs_bytes  # the measurement saw the gradient arrays, so it can fail


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sep": np.array([0, 99])}, "sep must lie"),
        ({"sep": np.array([1, 2, 3])}, "sep must be"),
        ({"sep": np.array([4, 4]), "lengths": np.array([3, 9])}, "sep <= lengths"),
    ],
)
def test_bad_input_raises_a_clear_error(kwargs, match):
    rng = np.random.default_rng(7)
    q, k, v, _ = _inputs(rng, 2, 1, 9, 4, np.float64)
    with pytest.raises(ValueError, match=match):
        twin.flash_attention_forward(q, k, v, **kwargs)


def test_bad_shapes_and_dtypes_raise():
    rng = np.random.default_rng(8)
    q, k, v, _ = _inputs(rng, 2, 1, 9, 4, np.float64)
    with pytest.raises(ValueError, match="same shape"):
        twin.flash_attention_forward(q, k[:, :, :5], v, np.array([1, 2]))
    with pytest.raises(ValueError, match="float32 or float64"):
        twin.flash_attention_forward(q.astype(np.float16), k.astype(np.float16), v.astype(np.float16), 1)
    with pytest.raises(ValueError, match=r"\(B, H, T, D\)"):
        twin.flash_attention_forward(q[0], k[0], v[0], 1)


def test_twin_min_t_is_a_sensible_length():
    assert isinstance(kernels.TWIN_MIN_T, int) and 64 <= kernels.TWIN_MIN_T <= 4096


def test_attention_benchmark_runs(capsys):
    from minglm.bench import attention

    assert attention.main(["--quick", "--seq", "64", "--impl", "numpy"]) == 0
    out = capsys.readouterr().out
    assert "numpy twin" in out and "numpy plain" in out and "fwd+bwd" in out
    assert attention.flops(1, 1, 10, 4, "fwd") == 4 * 100 * 4
    assert attention.flops(1, 1, 10, 4, "fwd+bwd") == 3.5 * 4 * 100 * 4


def test_strided_views_give_the_same_answer():
    """Inputs as views (heads split out of a (B, T, H, D) layout, every other element): same result as copies."""
    rng = np.random.default_rng(9)
    B, T, H, D = 2, 37, 3, 8
    q, k, v, do = (rng.standard_normal((B, T, H, 2 * D))[..., ::2].transpose(0, 2, 1, 3) for _ in range(4))
    assert not q.flags.c_contiguous and q.strides[-1] != q.itemsize
    sep = np.array([4, 30])
    _compare(q, k, v, do, sep, 16, 8, tol=1e-12)


def test_one_piece_per_sample_gives_the_same_numbers(monkeypatch):
    """On NumPy the twin runs each sample of a batch as its own piece, on 2 threads (minglm.parallel): the numbers
    equal one batched pass bit for bit, including unsorted sep and lengths."""
    from minglm import parallel

    rng = np.random.default_rng(5)
    q, k, v, do = _inputs(rng, 4, 2, 50, 8, np.float64)
    sep, lengths = np.array([3, 50, 0, 20]), np.array([40, 50, 7, 33])
    results = []
    before = parallel.num_threads()
    try:
        for piece, threads in ((1 << 30, 1), (1, 2)):  # one batched pass; then one piece per sample on 2 threads
            monkeypatch.setattr(parallel, "PIECE", piece)
            parallel.set_num_threads(threads)
            assert len(parallel.pieces(q.shape[0], q[0].size)) == (4 if piece == 1 else 1)
            o, lse = twin.flash_attention_forward(q, k, v, sep, block_q=16, block_k=32, lengths=lengths)
            grads = twin.flash_attention_backward(q, k, v, o, lse, do, sep, block_q=16, block_k=32, lengths=lengths)
            results.append((o, lse, *grads))
    finally:
        parallel.set_num_threads(before)
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), *results):
        np.testing.assert_array_equal(a, b, err_msg=name)


@pytest.mark.parametrize("impl", ["twin", "reference"])
@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 2e-5)])
def test_nan_in_padding_never_reaches_real_rows(impl, dtype, tol):
    """A caller's padding may hold anything. With NaN in every padded row of q, k, v and the upstream gradient
    (and, for the twin's backward, of o and lse), the real rows equal a run with clean padding and every padded
    row of o, lse, dq, dk, dv is exactly 0. (A masked probability is 0, but 0 * NaN is NaN: padding must be read
    as 0, as the kernel loads it.)"""
    rng = np.random.default_rng(10)
    B, H, T, D = 3, 2, 45, 8
    q, k, v, do = _inputs(rng, B, H, T, D, dtype)
    sep, lengths = np.array([5, 0, 20]), np.array([30, 17, 45])
    pad = np.arange(T)[None, :] >= lengths[:, None]  # (B, T)
    pad3 = pad[:, None, :].repeat(H, 1)  # (B, H, T)

    def run(q, k, v, do):
        if impl == "reference":
            o, lse, backward = reference_attention(q, k, v, sep, lengths=lengths)
            return (o, lse, *backward(do))
        o, lse = twin.flash_attention_forward(q, k, v, sep, block_q=16, block_k=16, lengths=lengths)
        o_nan, lse_nan = o.copy(), lse.copy()
        o_nan[pad3], lse_nan[pad3] = np.nan, np.nan
        grads = twin.flash_attention_backward(q, k, v, o_nan, lse_nan, do, sep, block_q=16, block_k=16,
                                              lengths=lengths)
        return (o, lse, *grads)

    clean = run(q, k, v, do)
    for a in (q, k, v, do):
        a[pad3] = np.nan
    dirty = run(q, k, v, do)
    for name, c, d in zip(("o", "lse", "dq", "dk", "dv"), clean, dirty):
        assert np.isfinite(d).all(), f"{impl} {name}: NaN from the padding leaked"
        np.testing.assert_allclose(d, c, atol=tol, rtol=tol, err_msg=f"{impl} {name}")
        assert (d[pad3] == 0).all(), f"{impl} {name}: padded rows are not 0"


def test_empty_sequences_give_empty_results():
    """T = 0 (and a sample of length 0): empty outputs of the right shapes from the twin and the reference."""
    q = np.zeros((2, 3, 0, 8))
    sep, lengths = np.array([0, 0]), np.array([0, 0])
    for o, lse in (twin.flash_attention_forward(q, q, q, sep, lengths=lengths),
                   reference_attention(q, q, q, sep, lengths=lengths)[:2]):
        assert o.shape == q.shape and lse.shape == (2, 3, 0)
    grads = twin.flash_attention_backward(q, q, q, q, np.zeros((2, 3, 0)), q, sep, lengths=lengths)
    assert all(g.shape == q.shape for g in (*grads, *reference_attention(q, q, q, sep)[2](q)))
