"""Plain GLM-masked attention: the dense T×T mask and softmax, written the way the textbook writes them.

This is the readable path that the tiled twin (``twin.py``) and the CUDA kernel (``flash_attn.cu``) are tested
against, and the "plain" baseline of ``minglm/bench/attention.py``. It materialises the (B, 1, T, T) mask and the
(B, H, T, T) probabilities, so it costs O(T²) memory: fine for tests and short sequences, wasteful at T = 2048.
Works on NumPy and CuPy arrays alike (``get_xp``).

The mask follows docs/mask.md (``minglm.masks.glm_mask``): key j is visible to query i of sample b when
``j < sep[b]`` or ``j <= i``.
With ``lengths``, query rows ``i >= lengths[b]`` are treated as absent (output 0, lse 0, no gradient), the same
rule the twin and the kernel use, and the padded rows of q, k, v and of the upstream gradient are read as 0: a
masked probability is 0, but it still multiplies its value row, and 0 * NaN is NaN.

Left out: dropout, memory columns, and the −65504 fill of the official fp16 code (−inf gives identical float32
results, docs/mask.md).
"""

from __future__ import annotations

from minglm.backend import get_xp
from minglm.kernels.twin import _check_inputs, _zero_padding
from minglm.masks import glm_mask


def reference_attention(q, k, v, sep, scale=None, lengths=None):
    """Dense masked attention. Returns ``(o, lse, backward)`` where ``backward(do) -> (dq, dk, dv)``.

    q, k, v: (B, H, T, D); sep: (B,) ints in [0, T]; scale defaults to D**-0.5. ``lse`` (B, H, T) is the log of
    the softmax denominator of the scaled scores.
    """
    xp = get_xp(q)
    sep_h, len_h = _check_inputs("reference_attention", q, k, v, sep, lengths)
    B, H, T, D = q.shape
    scale = float(D**-0.5 if scale is None else scale)
    if T == 0:  # no rows, no keys (the row max below needs at least one key)
        return xp.zeros_like(q), xp.zeros((B, H, 0), dtype=q.dtype), lambda do: tuple(xp.zeros_like(q) for _ in "qkv")
    mask = glm_mask(xp, sep_h, T, lengths=len_h)  # (B, 1, T, T)
    real_row = mask.any(axis=-1)  # (B, 1, T): False only for absent pad rows
    q, k, v = (_zero_padding(xp, a, len_h) for a in (q, k, v))  # whatever the padding holds, it counts as 0

    s = (q * scale) @ k.swapaxes(-1, -2)  # (B, H, T, T)
    xp.copyto(s, float("-inf"), where=~mask)
    xp.copyto(s, 0.0, where=~real_row[..., None])  # an absent row has no terms; keep it finite, zeroed below
    row_max = s.max(axis=-1, keepdims=True)  # (B, H, T, 1)
    p = xp.exp(s - row_max)
    row_sum = p.sum(axis=-1, keepdims=True)
    p /= row_sum  # softmax over keys   # (B, H, T, T)
    xp.copyto(p, 0.0, where=~real_row[..., None])
    o = p @ v  # (B, H, T, D)
    lse = (row_max + xp.log(row_sum))[..., 0] * real_row  # (B, H, T)

    def backward(do):
        """Gradients of ``sum(do * o)`` with respect to q, k and v."""
        do = _zero_padding(xp, do, len_h)
        dv = p.swapaxes(-1, -2) @ do  # (B, H, T, D)
        dp = do @ v.swapaxes(-1, -2)  # (B, H, T, T)
        ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))  # softmax backward, row by row
        dq = (ds @ k) * scale
        dk = (ds.swapaxes(-1, -2) @ q) * scale
        return dq, dk, dv

    return o, lse.astype(q.dtype, copy=False), backward
