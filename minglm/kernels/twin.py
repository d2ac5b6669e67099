"""The NumPy twin of the fused GLM attention kernel: the same tiles, the same online softmax, on a CPU.

Nothing runs CUDA C on a CPU, so this file is how the kernel's *algorithm* is taught and tested: it walks the same
query tiles and key tiles as ``flash_attn.cu``, keeps the same running statistics (row max ``m``, row sum ``l``,
output accumulator ``acc``), skips the same fully masked tiles, and saves the same log-sum-exp for the backward.
Where the kernel runs one thread block per (sample, head, tile), the twin runs one batched ``np.matmul`` over all
samples and heads per tile pair, so it is also the fast CPU path for long sequences (see ``TWIN_MIN_T``). On NumPy
a batch of several samples is cut into pieces of samples (one each at long T), spread over the CPU cores
(``parallel.map_rows``): a sample's tiles stay in cache, and the numbers are the same as in one batched pass.

Glossary: B = batch, H = heads, T = sequence length, D = head size, bq/bk = query/key tile sizes.

The GLM mask (docs/mask.md): key j is visible to query i of sample b when ``j < sep[b]`` (Part A, seen by
everyone) or ``j <= i`` (causal). Every query sees key 0, so every row of the softmax has at least one term.

Forward: the online-softmax recurrence
--------------------------------------
For one query row with scaled scores ``s_j = scale * q.k_j`` over the visible keys, attention is
``o = sum_j exp(s_j) v_j / sum_j exp(s_j)``. Process the keys in tiles. After tiles 1..t keep

    m_t   = max of all scores seen so far
    l_t   = sum_j exp(s_j - m_t)            (the softmax denominator, rescaled to m_t)
    acc_t = sum_j exp(s_j - m_t) v_j        (the numerator, rescaled to m_t)

A new tile with scores ``s`` gives ``m_new = max(m_t, max s)`` and, with ``alpha = exp(m_t - m_new)`` (<= 1),

    l_new   = alpha * l_t   + sum exp(s - m_new)
    acc_new = alpha * acc_t + exp(s - m_new) @ V_tile

because multiplying by ``alpha`` moves an old sum from reference point ``m_t`` to ``m_new``. At the end
``o = acc / l`` and ``lse = m + log l`` (the log of the softmax denominator). Subtracting the running max keeps
every ``exp`` at most 1, so nothing overflows, and no T×T matrix is ever held: only one bq×bk tile of scores.

Backward: recompute instead of store (FlashAttention-2)
-------------------------------------------------------
With ``P = softmax(S)`` and upstream gradient ``dO``: ``dV = P^T dO``, ``dP = dO V^T``, and the softmax backward
``dS_ij = P_ij (dP_ij - sum_k P_ik dP_ik)``. The row sum equals ``sum_k P_ik (dO_i . v_k) = dO_i . o_i``, so
``Delta_i = rowsum(dO * O)`` is computed once from the saved output, with no T×T matrix. ``P`` itself is rebuilt
tile by tile from the saved log-sum-exp: ``P_ij = exp(s_ij - lse_i)``, already normalised. Then, since
``S = scale * Q K^T``, ``dQ = scale * dS K`` and ``dK = scale * dS^T Q``. The twin loops key tiles outside and
query tiles inside, like the kernel: dK and dV of one key tile are finished in the inner loop, and dQ of each query
tile is accumulated across key tiles (the kernel does that accumulation with float32 ``atomicAdd``).

Tile skipping. A (query tile, key tile) pair is skipped for sample b when every key in it is ``>= sep[b]`` and
later than every query in it. The samples are first reordered by decreasing ``sep``, so the samples that still see
a key tile are always a *prefix* ``[:nb]`` of the batch: one batched matmul on a slice, no gathers. (The reordering
copies the inputs; a batch that already comes sorted by decreasing sep is used as it is.)

Optional ``lengths`` (valid length per sample, pads at the end): query rows ``i >= lengths[b]`` are treated as
absent, with output 0, lse 0, zero dq and no contribution to dk/dv. Real rows are unchanged, since a real row never
sees a pad key when ``sep <= length``. The CUDA kernel uses the same rule and skips whole padded tiles. Padding is
never trusted: its rows of q, k, v (and o, do, lse in the backward) are read as 0, as the kernel loads them,
because a masked probability is 0 but still multiplies its value row, and 0 * NaN is NaN.

Left out: dropout on the attention probabilities, a K/V cache (decoding), and memory ("mems") columns.
"""

from __future__ import annotations

import numpy as np

from minglm import parallel
from minglm.backend import get_xp, to_numpy

# 256×256 tiles: big enough for efficient batched GEMMs, small enough that the skipped tiles follow the mask closely
# (at T 2048 with random sep they compute 66 % of the full score matrix; 256×512 tiles compute 73 %).
DEFAULT_BLOCK_Q = 256
DEFAULT_BLOCK_K = 256
NEG_INF = float("-inf")


def _check_inputs(fn: str, q, k, v, sep, lengths):
    """Validate shapes/dtypes and return (sep, lengths) as host int64 arrays (lengths may be None)."""
    if q.ndim != 4:
        raise ValueError(f"{fn}: q must be (B, H, T, D), got shape {q.shape}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"{fn}: q, k, v must have the same shape, got {q.shape}, {k.shape}, {v.shape}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"{fn}: q, k, v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in (np.float32, np.float64):
        raise ValueError(f"{fn}: dtype must be float32 or float64, got {q.dtype}")
    B, _, T, _ = q.shape
    sep_h = np.asarray(to_numpy(sep)).astype(np.int64).reshape(-1)
    if sep_h.size == 1 and B != 1:
        sep_h = np.full(B, int(sep_h[0]), dtype=np.int64)
    if sep_h.shape != (B,):
        raise ValueError(f"{fn}: sep must be a scalar or shape ({B},), got shape {np.shape(sep)}")
    if sep_h.min() < 0 or sep_h.max() > T:
        raise ValueError(f"{fn}: sep must lie in [0, T={T}], got min {sep_h.min()} max {sep_h.max()}")
    len_h = None
    if lengths is not None:
        len_h = np.asarray(to_numpy(lengths)).astype(np.int64).reshape(-1)
        if len_h.shape != (B,):
            raise ValueError(f"{fn}: lengths must have shape ({B},), got shape {np.shape(lengths)}")
        if (len_h < sep_h).any() or (len_h > T).any():
            raise ValueError(f"{fn}: need sep <= lengths <= T={T}, got sep {sep_h.tolist()} lengths {len_h.tolist()}")
    return sep_h, len_h


def _zero_padding(xp, x, len_h):
    """A copy of ``x`` (B, H, T[, D]) with the rows ``t >= len_h[b]`` set to 0; ``x`` itself without padding."""
    T = x.shape[2]
    if len_h is None or (len_h >= T).all():
        return x
    keep = xp.arange(T).reshape(1, 1, T) < xp.asarray(len_h).reshape(-1, 1, 1)  # (B, 1, T)
    if x.ndim == 4:
        keep = keep[..., None]  # (B, 1, T, 1)
    return xp.where(keep, x, xp.zeros((), dtype=x.dtype))


def _blas_ready(xp, x):
    """``x`` itself when its last axis is contiguous (tiles of it are valid BLAS operands), else a contiguous copy.
    NumPy's matmul silently falls back to a slow loop on other layouts."""
    return x if x.strides[-1] == x.itemsize else xp.ascontiguousarray(x)


def _tile_sizes(block_q, block_k, T: int) -> tuple[int, int]:
    """Tile sizes clipped to T (at least 1, so that T = 0 gives empty loops)."""
    if int(block_q) < 1 or int(block_k) < 1:
        raise ValueError(f"flash attention twin: block_q and block_k must be >= 1, got {block_q}, {block_k}")
    return max(1, min(int(block_q), T)), max(1, min(int(block_k), T))


def _sep_order(sep_h: np.ndarray):
    """Order of the samples by decreasing sep, or None when they already are in that order."""
    order = np.argsort(-sep_h, kind="stable")
    return None if (order == np.arange(sep_h.size)).all() else order


def _active(sep_sorted: np.ndarray, i1: int, j0: int) -> int:
    """How many samples (a prefix, sep sorted decreasing) see something in keys >= j0 from queries < i1.

    A query i sees key j when j < sep or j <= i. If the key tile starts at or before the last query of the tile
    (j0 <= i1 - 1), the causal part reaches it for every sample; otherwise only samples with sep > j0 do.
    """
    if j0 <= i1 - 1:
        return sep_sorted.size
    return int((sep_sorted > j0).sum())


def _tile_mask(xp, sep_h, len_h, sep_col, len_col, i0: int, i1: int, j0: int, j1: int):
    """Visibility of keys [j0, j1) to queries [i0, i1), shape (nb, 1, nq, nk); None when all visible.

    ``sep_h`` / ``len_h`` are the host values and ``sep_col`` / ``len_col`` the (nb, 1, 1, 1) array columns of the
    active samples; the ``len`` ones are None without lengths (then every query row counts as real).
    """
    all_visible = (j1 - 1 <= i0) or (j1 - 1 < int(sep_h.min()))
    if all_visible and (len_h is None or i1 <= int(len_h.min())):
        return None
    qi = xp.arange(i0, i1).reshape(1, 1, -1, 1)  # (1, 1, nq, 1)
    kj = xp.arange(j0, j1).reshape(1, 1, 1, -1)  # (1, 1, 1, nk)
    visible = (kj < sep_col) | (kj <= qi)  # (nb, 1, nq, nk)
    if len_col is not None:
        visible &= qi < len_col
    return visible


class _Buffer:
    """One flat scratch array handed out as contiguous views of any shape up to its size (no per-tile allocs)."""

    def __init__(self, xp, size: int, dtype):
        self.flat = xp.empty(size, dtype=dtype)

    def view(self, *shape):
        n = int(np.prod(shape))
        return self.flat[:n].reshape(shape)


def flash_attention_forward(q, k, v, sep, scale=None, block_q=DEFAULT_BLOCK_Q, block_k=DEFAULT_BLOCK_K, lengths=None):
    """Tiled GLM-masked attention forward.

    q, k, v: (B, H, T, D) float32 or float64; sep: (B,) ints in [0, T] (or a scalar); scale defaults to D**-0.5.
    Returns ``o`` (B, H, T, D) and ``lse`` (B, H, T), both in the input dtype; ``lse`` is the log of each row's
    softmax denominator (of the scaled scores), which the backward needs.
    """
    xp = get_xp(q)
    sep_h, len_h = _check_inputs("flash_attention_forward", q, k, v, sep, lengths)
    o, lse = xp.empty_like(q), xp.empty(q.shape[:3], dtype=q.dtype)
    parallel.map_rows(_forward_rows, q, k, v, sep_h, len_h, o, lse, args=(scale, block_q, block_k))
    return o, lse


def _forward_rows(q, k, v, sep_h, len_h, o_out, lse_out, scale, block_q, block_k) -> None:
    """The tiled forward of some samples (``sep_h``/``len_h`` their host values), written into o_out and lse_out."""
    xp = get_xp(q)
    q, k, v = (_zero_padding(xp, a, len_h) for a in (q, k, v))  # padded rows read as 0, like the kernel
    k, v = _blas_ready(xp, k), _blas_ready(xp, v)
    B, H, T, D = q.shape
    dt = q.dtype
    scale = float(D**-0.5 if scale is None else scale)
    bq, bk = _tile_sizes(block_q, block_k, T)

    order = _sep_order(sep_h)
    if order is not None:  # reorder samples by decreasing sep (undone at the end)
        idx = xp.asarray(order)
        qs, k, v = q[idx], k[idx], v[idx]  # copies, so the scale can go into qs in place
        qs *= scale
        sep_h = sep_h[order]
        len_h = None if len_h is None else len_h[order]
    else:
        qs = q * scale
    # qs: the scale folded into q once, S = qs @ k^T   # (B, H, T, D)
    sep_d = xp.asarray(sep_h).reshape(B, 1, 1, 1)
    len_d = None if len_h is None else xp.asarray(len_h).reshape(B, 1, 1, 1)
    o = xp.empty_like(q)  # (B, H, T, D)
    lse = xp.empty((B, H, T), dtype=dt)
    s_buf = _Buffer(xp, B * H * bq * bk, dt)
    pv_buf = _Buffer(xp, B * H * bq * D, dt)

    for i0 in range(0, T, bq):
        i1 = min(i0 + bq, T)
        nq = i1 - i0
        m = xp.full((B, H, nq), NEG_INF, dtype=dt)  # running row max
        l = xp.zeros((B, H, nq), dtype=dt)  # running softmax denominator (relative to m)
        acc = xp.zeros((B, H, nq, D), dtype=dt)  # running numerator (relative to m)
        for j0 in range(0, T, bk):
            j1 = min(j0 + bk, T)
            nb = _active(sep_h, i1, j0)
            if nb == 0:  # sep is sorted, so later key tiles are masked too
                break
            nk = j1 - j0
            s = s_buf.view(nb, H, nq, nk)
            xp.matmul(qs[:nb, :, i0:i1], k[:nb, :, j0:j1].swapaxes(-1, -2), out=s)  # scores (nb, H, nq, nk)
            visible = _tile_mask(xp, sep_h[:nb], None, sep_d[:nb], None, i0, i1, j0, j1)
            if visible is not None:
                xp.copyto(s, NEG_INF, where=~visible)
            m_new = xp.maximum(m[:nb], s.max(axis=-1))  # finite: key 0 is in the first tile and always visible
            xp.subtract(s, m_new[..., None], out=s)
            xp.exp(s, out=s)  # p~ = exp(s - m_new), in place   # (nb, H, nq, nk)
            alpha = xp.exp(m[:nb] - m_new)  # rescales the old sums to the new max
            l[:nb] *= alpha
            l[:nb] += s.sum(axis=-1)
            acc[:nb] *= alpha[..., None]
            pv = pv_buf.view(nb, H, nq, D)
            xp.matmul(s, v[:nb, :, j0:j1], out=pv)
            acc[:nb] += pv
            m[:nb] = m_new
        o[:, :, i0:i1] = acc / l[..., None]
        lse[:, :, i0:i1] = m + xp.log(l)

    if len_d is not None:  # pad query rows are absent: output 0, lse 0
        pad = xp.arange(T).reshape(1, 1, T) >= len_d[:, :, :, 0]  # (B, 1, T)
        xp.copyto(o, 0.0, where=pad[..., None])
        xp.copyto(lse, 0.0, where=pad)
    if order is not None:
        inverse = xp.asarray(np.argsort(order))
        o, lse = o[inverse], lse[inverse]
    o_out[...], lse_out[...] = o, lse


def flash_attention_backward(
    q, k, v, o, lse, do, sep, scale=None, block_q=DEFAULT_BLOCK_Q, block_k=DEFAULT_BLOCK_K, lengths=None
):
    """Tiled GLM-masked attention backward, recomputing P from the saved ``lse``.

    Takes the forward's inputs and outputs (``o``, ``lse``) and the upstream gradient ``do`` (B, H, T, D).
    Returns ``(dq, dk, dv)``, each (B, H, T, D) in the input dtype.
    """
    xp = get_xp(q)
    sep_h, len_h = _check_inputs("flash_attention_backward", q, k, v, sep, lengths)
    B, H, T, D = q.shape
    if o.shape != q.shape or do.shape != q.shape or lse.shape != (B, H, T):
        raise ValueError(
            f"flash_attention_backward: expected o, do {q.shape} and lse {(B, H, T)}, "
            f"got o {o.shape}, do {do.shape}, lse {lse.shape}"
        )
    dq, dk, dv = xp.empty_like(q), xp.empty_like(q), xp.empty_like(q)
    parallel.map_rows(_backward_rows, q, k, v, o, lse, do, sep_h, len_h, dq, dk, dv, args=(scale, block_q, block_k))
    return dq, dk, dv


def _backward_rows(q, k, v, o, lse, do, sep_h, len_h, dq_out, dk_out, dv_out, scale, block_q, block_k) -> None:
    """The tiled backward of some samples, written into dq_out, dk_out, dv_out."""
    xp = get_xp(q)
    B, H, T, D = q.shape
    dt = q.dtype
    q, k, v, o, do, lse = (_zero_padding(xp, a, len_h) for a in (q, k, v, o, do, lse))  # padded rows read as 0
    do, lse = _blas_ready(xp, do.astype(dt, copy=False)), lse.astype(dt, copy=False)
    k, v = _blas_ready(xp, k), _blas_ready(xp, v)
    scale = float(D**-0.5 if scale is None else scale)
    bq, bk = _tile_sizes(block_q, block_k, T)

    delta = xp.einsum("bhtd,bhtd->bht", do, o)  # Delta_i = rowsum(dO * O); o is not needed after this   # (B, H, T)
    order = _sep_order(sep_h)
    if order is not None:
        idx = xp.asarray(order)
        qs, k, v, do, lse, delta = q[idx], k[idx], v[idx], do[idx], lse[idx], delta[idx]
        qs *= scale
        sep_h = sep_h[order]
        len_h = None if len_h is None else len_h[order]
    else:
        qs = q * scale  # (B, H, T, D)
    sep_d = xp.asarray(sep_h).reshape(B, 1, 1, 1)
    len_d = None if len_h is None else xp.asarray(len_h).reshape(B, 1, 1, 1)
    dq = xp.zeros((B, H, T, D), dtype=dt)  # accumulated over key tiles (atomicAdd in the kernel), scaled at the end
    dk = xp.zeros((B, H, T, D), dtype=dt)
    dv = xp.zeros((B, H, T, D), dtype=dt)
    p_buf = _Buffer(xp, B * H * bq * bk, dt)
    dp_buf = _Buffer(xp, B * H * bq * bk, dt)
    kd_buf = _Buffer(xp, B * H * bk * D, dt)  # (nb, H, nk, D) products for dk, dv
    qd_buf = _Buffer(xp, B * H * bq * D, dt)  # (nb, H, nq, D) products for dq

    for j0 in range(0, T, bk):
        j1 = min(j0 + bk, T)
        nk = j1 - j0
        kj, vj = k[:, :, j0:j1], v[:, :, j0:j1]  # (B, H, nk, D)
        for i0 in range(0, T, bq):
            i1 = min(i0 + bq, T)
            nb = _active(sep_h, i1, j0)
            if nb == 0:  # only tiles with i1 - 1 < j0 can be empty, and they come first: skip, don't stop
                continue
            nq = i1 - i0
            # recompute P = exp(S - lse) for the tile, with masked entries exactly 0
            p = p_buf.view(nb, H, nq, nk)
            xp.matmul(qs[:nb, :, i0:i1], kj[:nb].swapaxes(-1, -2), out=p)
            lens = (None, None) if len_h is None else (len_h[:nb], len_d[:nb])
            visible = _tile_mask(xp, sep_h[:nb], lens[0], sep_d[:nb], lens[1], i0, i1, j0, j1)
            if visible is not None:
                xp.copyto(p, NEG_INF, where=~visible)
            xp.subtract(p, lse[:nb, :, i0:i1, None], out=p)
            xp.exp(p, out=p)  # (nb, H, nq, nk)
            # dV_j += P^T dO_i
            kd = kd_buf.view(nb, H, nk, D)
            xp.matmul(p.swapaxes(-1, -2), do[:nb, :, i0:i1], out=kd)
            dv[:nb, :, j0:j1] += kd
            # dS = P * (dO V^T - Delta)
            ds = dp_buf.view(nb, H, nq, nk)
            xp.matmul(do[:nb, :, i0:i1], vj[:nb].swapaxes(-1, -2), out=ds)
            xp.subtract(ds, delta[:nb, :, i0:i1, None], out=ds)
            xp.multiply(ds, p, out=ds)
            # dK_j += dS^T (scale * Q_i);  dQ_i += dS K_j (times scale at the end)
            xp.matmul(ds.swapaxes(-1, -2), qs[:nb, :, i0:i1], out=kd)
            dk[:nb, :, j0:j1] += kd
            qd = qd_buf.view(nb, H, nq, D)
            xp.matmul(ds, kj[:nb], out=qd)
            dq[:nb, :, i0:i1] += qd
    dq *= scale

    if order is not None:
        inverse = xp.asarray(np.argsort(order))
        dq, dk, dv = dq[inverse], dk[inverse], dv[inverse]
    dq_out[...], dk_out[...], dv_out[...] = dq, dk, dv
