"""Fused GLM-masked attention: one entry point, three implementations of the same maths.

- ``flash_attn.cu`` + ``cuda.py``: the CUDA kernel (online softmax, mask from ``sep`` on the fly, no T×T buffer),
  launched through CuPy when the arrays live on a GPU;
- ``twin.py``: its NumPy twin, the same tile loops and recurrence, batched over heads, one piece per sample (CPU);
- ``reference.py``: plain dense masked attention, the readable path everything is tested against.

``flash_attention_forward`` / ``flash_attention_backward`` pick the kernel for CuPy arrays and the twin otherwise;
``cuda.py`` then picks the kernel build that fits the device's shared memory (or the twin, with a warning).
``python -m minglm.kernels.gpu_check`` is the acceptance check for a GPU (``nvrtc_check`` and ``emulate`` are the
CPU-side ones).
On a CPU the plain path is faster for short sequences: use the twin when ``T >= TWIN_MIN_T`` (measured with
``python -m minglm bench attention``). The mask rule is docs/mask.md.
"""

from __future__ import annotations

import numpy as np

from minglm.backend import is_cupy
from minglm.kernels import twin
from minglm.kernels.cuda import HEAD_DIMS  # cuda.py imports cupy only inside its functions
from minglm.kernels.reference import glm_mask, reference_attention

# Forward + backward through F.scaled_dot_product_attention (autograd included), impl="plain" against the twin,
# B 8, H 8, sep ~ U[0, T], 2 threads (both paths spread their pieces over the cores, minglm.parallel), best-of-3 ms:
#   T            128    256    384    512    640    1024   1536   2048
#   D 64 plain    11     38     83    115    180     511   1202   2411
#   D 64 twin     16     50     96    129    223     539   1159   1741
#   D 32 plain     7     23     86     98    140     355
#   D 32 twin     12     29     58     89    121     326
# At D 64 they break even near 1024 and the twin wins from there (1.4× at 2048); at D 32 the twin is 0.7-0.9× of
# plain from 384 up.
# Above the threshold memory decides it too: plain saves (B, H, T, T) probabilities per layer (256 MB at T 1024,
# 1 GB at 2048), the twin O(T). MINGLM_ATTENTION=flash uses the twin at any length when memory is tight.
TWIN_MIN_T = 1024

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
