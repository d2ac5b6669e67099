"""CuPy launcher for the fused GLM attention kernel in ``flash_attn.cu``.

This module and ``minglm/backend.py`` are the only places that touch ``cupy``, and only through
``minglm.backend.cupy_module()`` inside the functions, so importing this file on a CPU machine is harmless.

The source is compiled by CuPy's ``RawModule`` (NVRTC) once per head size, the first time that size is used, with
``-DHEAD_DIM=<D>``; CuPy also caches the binary on disk. The kernel computes in float32: float32 inputs go straight
in, float16 inputs are cast to float32 and the outputs cast back (float32 accumulation either way). float64 CuPy
arrays are not sent here: ``minglm.kernels`` runs the NumPy twin on them (it is xp-agnostic).

Shapes: q, k, v, o, do (B, H, T, D) with D in {32, 64, 128}; lse (B, H, T) float32; sep, lengths (B,) ints.
The kernel design (tiles, shared memory, the atomicAdd for dq) is described at the top of ``flash_attn.cu``;
the maths is derived in ``twin.py``. GLM-REFERENCE.md §3 gives the mask.

Left out: streams, multiple devices, autotuning of tile sizes, and a bf16 path (NumPy/CuPy have no bfloat16).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minglm.backend import cupy_module, gpu_available, to_numpy

SOURCE_PATH = Path(__file__).with_name("flash_attn.cu")
HEAD_DIMS = (32, 64, 128)
NTHREADS = 128  # threads per block in both kernels (NTHREADS in flash_attn.cu)
DEFAULT_SMEM_LIMIT = 48 * 1024  # above this a kernel must opt in to more dynamic shared memory
COMPILE_OPTIONS = ("-std=c++17",)


def cuda_available() -> bool:
    """True when CuPy imports and a CUDA GPU is usable."""
    return gpu_available()


@dataclass(frozen=True)
class _Compiled:
    """The kernels of one head size and the launch constants read back from the compiled module."""

    fwd: object  # cupy.RawKernel glm_attn_fwd
    bwd: object  # cupy.RawKernel glm_attn_bwd
    fwd_smem_bytes: int
    bwd_smem_bytes: int
    fwd_block_q: int  # query rows per forward block
    bwd_block_k: int  # keys per backward block


@functools.cache
def _compiled(head_dim: int, dtype_name: str = "float32") -> _Compiled:
    """Compile (once per head size and compute dtype) and configure the kernels."""
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"flash attention kernel: head size must be one of {HEAD_DIMS}, got {head_dim}")
    if dtype_name != "float32":
        raise ValueError(f"flash attention kernel: computes in float32 only, got {dtype_name}")
    cp = cupy_module()
    module = cp.RawModule(code=SOURCE_PATH.read_text(), options=(*COMPILE_OPTIONS, f"-DHEAD_DIM={head_dim}"))
    # the tile constants live in the .cu file; read them back instead of keeping a second copy here
    consts = cp.zeros(4, dtype=cp.int32)
    module.get_function("smem_floats")((1,), (1,), (consts,))
    fwd_floats, bwd_floats, fwd_block_q, bwd_block_k = (int(x) for x in cp.asnumpy(consts))
    fwd, bwd = module.get_function("glm_attn_fwd"), module.get_function("glm_attn_bwd")
    for kernel, floats in ((fwd, fwd_floats), (bwd, bwd_floats)):
        if 4 * floats > DEFAULT_SMEM_LIMIT:  # D = 128 needs about 49 KB (fwd) and 73 KB (bwd)
            kernel.max_dynamic_shared_size_bytes = 4 * floats
    return _Compiled(fwd, bwd, 4 * fwd_floats, 4 * bwd_floats, fwd_block_q, bwd_block_k)


def _prepare(fn: str, q, k, v, sep, lengths):
    """Validate, and return contiguous float32 q, k, v plus int32 device sep and lengths."""
    cp = cupy_module()
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"{fn}: q, k, v must all be (B, H, T, D), got {q.shape}, {k.shape}, {v.shape}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (np.float32, np.float16):
        raise ValueError(f"{fn}: q, k, v must share a float32 or float16 dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, _, T, D = q.shape
    if D not in HEAD_DIMS:
        raise ValueError(f"{fn}: head size D must be one of {HEAD_DIMS}, got {D}")
    sep_h = np.asarray(to_numpy(sep)).astype(np.int64).reshape(-1)
    if sep_h.size == 1 and B != 1:
        sep_h = np.full(B, int(sep_h[0]), dtype=np.int64)
    if sep_h.shape != (B,) or sep_h.min() < 0 or sep_h.max() > T:
        raise ValueError(f"{fn}: sep must be (B,)=({B},) ints in [0, T={T}], got {sep_h.tolist()}")
    if lengths is None:
        len_h = np.full(B, T, dtype=np.int64)
    else:
        len_h = np.asarray(to_numpy(lengths)).astype(np.int64).reshape(-1)
        if len_h.shape != (B,) or (len_h < sep_h).any() or (len_h > T).any():
            raise ValueError(f"{fn}: need (B,) lengths with sep <= lengths <= T={T}, got {len_h.tolist()}")
    as32 = [cp.ascontiguousarray(a, dtype=cp.float32) for a in (q, k, v)]
    return (*as32, cp.asarray(sep_h, dtype=cp.int32), cp.asarray(len_h, dtype=cp.int32))


def flash_attention_forward_cuda(q, k, v, sep, scale=None, lengths=None):
    """Fused forward on the GPU. Returns ``o`` (B, H, T, D) in the input dtype and ``lse`` (B, H, T) float32."""
    cp = cupy_module()
    q32, k32, v32, sep_d, len_d = _prepare("flash_attention_forward_cuda", q, k, v, sep, lengths)
    B, H, T, D = q32.shape
    scale = float(D**-0.5 if scale is None else scale)
    c = _compiled(D)
    o = cp.empty((B, H, T, D), dtype=cp.float32)
    lse = cp.empty((B, H, T), dtype=cp.float32)
    if o.size == 0:  # an empty grid is not a valid launch
        return o.astype(q.dtype, copy=False), lse
    grid = ((T + c.fwd_block_q - 1) // c.fwd_block_q, H, B)
    c.fwd(
        grid,
        (NTHREADS,),
        (q32, k32, v32, sep_d, len_d, o, lse, np.int32(H), np.int32(T), np.float32(scale)),
        shared_mem=c.fwd_smem_bytes,
    )
    return o.astype(q.dtype, copy=False), lse


def flash_attention_backward_cuda(q, k, v, o, lse, do, sep, scale=None, lengths=None):
    """Fused backward on the GPU from the forward's ``o`` and ``lse``. Returns (dq, dk, dv) in the input dtype."""
    cp = cupy_module()
    q32, k32, v32, sep_d, len_d = _prepare("flash_attention_backward_cuda", q, k, v, sep, lengths)
    B, H, T, D = q32.shape
    if o.shape != q.shape or do.shape != q.shape or lse.shape != (B, H, T):
        raise ValueError(
            f"flash_attention_backward_cuda: expected o, do {q.shape} and lse {(B, H, T)}, "
            f"got o {o.shape}, do {do.shape}, lse {lse.shape}"
        )
    scale = float(D**-0.5 if scale is None else scale)
    c = _compiled(D)
    o32 = cp.ascontiguousarray(o, dtype=cp.float32)
    do32 = cp.ascontiguousarray(do, dtype=cp.float32)
    lse32 = cp.ascontiguousarray(lse, dtype=cp.float32)
    delta = cp.sum(do32 * o32, axis=-1)  # Delta_i = rowsum(dO * O), FlashAttention-2's shortcut   # (B, H, T)
    dq = cp.zeros((B, H, T, D), dtype=cp.float32)  # accumulated by atomicAdd from every key-tile block
    dk = cp.empty((B, H, T, D), dtype=cp.float32)
    dv = cp.empty((B, H, T, D), dtype=cp.float32)
    if dq.size == 0:
        return tuple(g.astype(q.dtype, copy=False) for g in (dq, dk, dv))
    grid = ((T + c.bwd_block_k - 1) // c.bwd_block_k, H, B)
    c.bwd(
        grid,
        (NTHREADS,),
        (q32, k32, v32, do32, lse32, delta, sep_d, len_d, dq, dk, dv, np.int32(H), np.int32(T), np.float32(scale)),
        shared_mem=c.bwd_smem_bytes,
    )
    return tuple(g.astype(q.dtype, copy=False) for g in (dq, dk, dv))
