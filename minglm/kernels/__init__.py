"""Fused GLM-masked attention: one entry point, three implementations of the same maths.

- ``flash_attn.cu`` + ``cuda.py``: the CUDA kernel (online softmax, mask from ``sep`` on the fly, no T×T buffer),
  launched through CuPy when the arrays live on a GPU;
- ``twin.py``: its NumPy twin, the same tile loops and recurrence, batched over samples and heads (CPU path);
- ``reference.py``: plain dense masked attention, the readable path everything is tested against.

``flash_attention_forward`` / ``flash_attention_backward`` pick the kernel for CuPy arrays and the twin otherwise.
On a CPU the plain path is faster for short sequences: use the twin when ``T >= TWIN_MIN_T`` (measured with
``python -m minglm bench attention``). The mask rule is GLM-REFERENCE.md §3.
"""

from __future__ import annotations

import numpy as np

from minglm.backend import is_cupy
from minglm.kernels import twin
from minglm.kernels.cuda import HEAD_DIMS  # cuda.py imports cupy only inside its functions
from minglm.kernels.reference import glm_mask, reference_attention

# Forward + backward through F.scaled_dot_product_attention (autograd included), impl="plain" against the twin,
# B 8, H 8, D 64, sep ~ U[0, T], one BLAS thread, best-of-3-to-5 process CPU seconds:
#   T      128    256    512    576    640    768    1024   2048
#   plain  0.022  0.070  0.229  0.303  0.400  0.530  1.56   7.4
#   twin   0.034  0.089  0.295  0.328  0.370  0.560  0.99   3.8
# The two break even between 640 and 768; from there the twin wins (1.6× at 1024, 1.9× at 2048) and its memory
# is O(T) where plain holds (B, H, T, T) matrices (2-3 GB at T 2048). `python -m minglm bench attention` shows the
# same against minglm.kernels.reference_attention.
TWIN_MIN_T = 640

__all__ = [
    "TWIN_MIN_T",
    "flash_attention_backward",
    "flash_attention_forward",
    "glm_mask",
    "reference_attention",
]


def _use_kernel(q) -> bool:
    """The CUDA kernel takes CuPy float32/float16 arrays with D in 32/64/128; everything else runs the twin, which
    is xp-agnostic and so also runs (slower, but correctly) on CuPy arrays."""
    return is_cupy(q) and q.dtype in (np.float32, np.float16) and q.shape[-1] in HEAD_DIMS


def flash_attention_forward(q, k, v, sep, scale=None, lengths=None):
    """GLM-masked attention forward. q, k, v (B, H, T, D); sep (B,). Returns (o, lse): o (B, H, T, D), lse (B, H, T).

    CuPy float32/float16 arrays with D in (32, 64, 128) go to the CUDA kernel (lse float32); NumPy arrays, and other
    CuPy arrays (float64 for gradient checks, other head sizes), go to the twin (lse in the input dtype).
    """
    if _use_kernel(q):
        from minglm.kernels import cuda  # noqa: PLC0415 - imports cupy, only when the arrays are already CuPy

        return cuda.flash_attention_forward_cuda(q, k, v, sep, scale, lengths=lengths)
    return twin.flash_attention_forward(q, k, v, sep, scale, lengths=lengths)


def flash_attention_backward(q, k, v, o, lse, do, sep, scale=None, lengths=None):
    """GLM-masked attention backward from the forward's (o, lse) and the upstream gradient do. Returns (dq, dk, dv)."""
    if _use_kernel(q):
        from minglm.kernels import cuda  # noqa: PLC0415

        return cuda.flash_attention_backward_cuda(q, k, v, o, lse, do, sep, scale, lengths=lengths)
    return twin.flash_attention_backward(q, k, v, o, lse, do, sep, scale, lengths=lengths)
