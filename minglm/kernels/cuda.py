"""CuPy launcher for the fused GLM attention kernel in ``flash_attn.cu``.

This module and ``minglm/backend.py`` are the only places that touch ``cupy``, and only through
``minglm.backend.cupy_module()`` inside the functions, so importing this file on a CPU machine is harmless.

The source is compiled by CuPy's ``RawModule`` (NVRTC) with ``-DHEAD_DIM=<D>`` the first time a head size is used on
a device; CuPy also caches the binary on disk. The kernel computes in float32: float32 inputs go straight in,
float16 inputs are cast to float32 and the outputs cast back (float32 accumulation either way). float64 CuPy
arrays are not sent here: ``minglm.kernels`` runs the NumPy twin on them (it is xp-agnostic).

Dispatch knows the device. Each kernel's dynamic shared memory (read back from the compiled module) is compared
with the current device's ``MaxSharedMemoryPerBlockOptin``: where it fits, the kernel runs (opting in above the
default 48 KiB); where it does not, the ``-DSMALL_TILES=1`` build of that kernel runs (smaller query tiles, at most
43 KB at D = 128); where even that does not fit, the NumPy twin runs on the CuPy arrays. A warning says so once per
device, head size and kernel. At D = 128 the forward needs 49,792 B and the backward 74,240 B: an H100 (227 KiB)
or A100 (163 KiB) runs both, a T4 (64 KiB) runs the small-tile backward, Pascal (48 KiB) both small-tile kernels.
The plan (which build of which kernel) is cached per (device, head size): a RawModule belongs to one device.

Shapes: q, k, v, o, do (B, H, T, D) with D in {32, 64, 128}; lse (B, H, T) float32; sep, lengths (B,) ints.
The kernel design (tiles, shared memory, the atomicAdd for dq) is described at the top of ``flash_attn.cu``;
the maths is derived in ``twin.py``. docs/mask.md gives the mask.

Left out: streams, arrays on a device other than the current one, autotuning of tile sizes, and a bf16 path
(NumPy/CuPy have no bfloat16).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minglm.backend import cupy_module, gpu_available, to_numpy
from minglm.kernels import twin

SOURCE_PATH = Path(__file__).with_name("flash_attn.cu")
HEAD_DIMS = (32, 64, 128)
NTHREADS = 128  # threads per block in both kernels (NTHREADS in flash_attn.cu)
DEFAULT_SMEM_LIMIT = 48 * 1024  # above this a kernel must opt in to more dynamic shared memory (cudaFuncSetAttribute)
COMPILE_OPTIONS = ("-std=c++17",)


def cuda_available() -> bool:
    """True when CuPy imports and a CUDA GPU is usable."""
    return gpu_available()


@dataclass(frozen=True)
class _Kernel:
    """One compiled kernel, ready to launch on one device."""

    fn: object  # cupy.RawKernel
    smem_bytes: int  # dynamic shared memory per block
    block: int  # query rows per forward block, or keys per backward block
    small_tiles: bool  # the -DSMALL_TILES=1 build


@dataclass(frozen=True)
class _Plan:
    """What runs on one device at one head size: a kernel, or None where only the twin fits."""

    device: int
    smem_limit: int  # the device's MaxSharedMemoryPerBlockOptin
    fwd: _Kernel | None
    bwd: _Kernel | None


def _module(cp, head_dim: int, small_tiles: bool):
    """Compile the source for one head size (and tile variant); return the module and its tile constants."""
    options = (*COMPILE_OPTIONS, f"-DHEAD_DIM={head_dim}", *(("-DSMALL_TILES=1",) if small_tiles else ()))
    module = cp.RawModule(code=SOURCE_PATH.read_text(), options=options)
    # the tile constants live in the .cu file; read them back instead of keeping a second copy here
    consts = cp.zeros(5, dtype=cp.int32)
    module.get_function("smem_floats")((1,), (1,), (consts,))
    fwd_floats, bwd_floats, fwd_block_q, bwd_block_k, _ = (int(x) for x in cp.asnumpy(consts))
    sizes = {"glm_attn_fwd": (4 * fwd_floats, fwd_block_q), "glm_attn_bwd": (4 * bwd_floats, bwd_block_k)}
    return module, sizes


def device_smem_limit(cp, device_id: int) -> int:
    """The most dynamic shared memory one block may opt in to on this device (bytes)."""
    return int(cp.cuda.Device(device_id).attributes["MaxSharedMemoryPerBlockOptin"])


def _pick(cp, modules: dict, head_dim: int, name: str, limit: int, device: int) -> _Kernel | None:
    """The first build of kernel ``name`` (default tiles, then small tiles) whose shared memory fits ``limit``."""
    needs = []
    for small in (False, True):
        if small not in modules:
            modules[small] = _module(cp, head_dim, small)
        module, sizes = modules[small]
        smem, block = sizes[name]
        needs.append(smem)
        if smem <= limit:
            fn = module.get_function(name)
            if smem > DEFAULT_SMEM_LIMIT:  # above 48 KiB a kernel must opt in, and only up to the device's limit
                fn.max_dynamic_shared_size_bytes = smem
            if small:
                warnings.warn(f"flash attention: {name} at head size {head_dim} needs {needs[0]:,} B of shared memory "
                              f"per block, more than device {device} allows ({limit:,} B, "
                              f"MaxSharedMemoryPerBlockOptin); using its smaller-tile build ({smem:,} B)",
                              RuntimeWarning, stacklevel=5)
            return _Kernel(fn, smem, block, small)
    warnings.warn(f"flash attention: {name} at head size {head_dim} needs {min(needs):,} B of shared memory per "
                  f"block even with small tiles, more than device {device} allows ({limit:,} B); running the NumPy "
                  f"twin on the CuPy arrays instead (correct, slower)", RuntimeWarning, stacklevel=5)
    return None


@functools.cache
def _plan(device: int, head_dim: int) -> _Plan:
    """Compile and configure the kernels of one head size for one device (once; see the module docstring)."""
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"flash attention kernel: head size must be one of {HEAD_DIMS}, got {head_dim}")
    cp = cupy_module()
    limit = device_smem_limit(cp, device)
    modules: dict[bool, tuple] = {}  # small_tiles -> (module, sizes), built when first needed
    fwd = _pick(cp, modules, head_dim, "glm_attn_fwd", limit, device)
    bwd = _pick(cp, modules, head_dim, "glm_attn_bwd", limit, device)
    return _Plan(device, limit, fwd, bwd)


def kernel_plan(head_dim: int) -> _Plan:
    """The plan for the current device: which build of each kernel runs (None = the twin), and the device limit."""
    return _plan(cupy_module().cuda.Device().id, head_dim)


def clear_cache() -> None:
    """Forget every compiled plan (tests that swap the cupy module use it)."""
    _plan.cache_clear()


def _prepare(fn: str, q, k, v, sep, lengths):
    """Validate, and return contiguous float32 q, k, v, int32 device sep and lengths, and host (sep, lengths)."""
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
    if sep_h.shape != (B,) or sep_h.min(initial=0) < 0 or sep_h.max(initial=0) > T:
        raise ValueError(f"{fn}: sep must be (B,)=({B},) ints in [0, T={T}], got {sep_h.tolist()}")
    if lengths is None:
        len_h = np.full(B, T, dtype=np.int64)
    else:
        len_h = np.asarray(to_numpy(lengths)).astype(np.int64).reshape(-1)
        if len_h.shape != (B,) or (len_h < sep_h).any() or (len_h > T).any():
            raise ValueError(f"{fn}: need (B,) lengths with sep <= lengths <= T={T}, got {len_h.tolist()}")
    as32 = [cp.ascontiguousarray(a, dtype=cp.float32) for a in (q, k, v)]
    return (*as32, cp.asarray(sep_h, dtype=cp.int32), cp.asarray(len_h, dtype=cp.int32), sep_h, len_h)


def flash_attention_forward_cuda(q, k, v, sep, scale=None, lengths=None):
    """Fused forward on the GPU. Returns ``o`` (B, H, T, D) in the input dtype and ``lse`` (B, H, T) float32."""
    cp = cupy_module()
    q32, k32, v32, sep_d, len_d, sep_h, len_h = _prepare("flash_attention_forward_cuda", q, k, v, sep, lengths)
    B, H, T, D = q32.shape
    scale = float(D**-0.5 if scale is None else scale)
    o = cp.empty((B, H, T, D), dtype=cp.float32)
    lse = cp.empty((B, H, T), dtype=cp.float32)
    if o.size == 0:  # an empty grid is not a valid launch
        return o.astype(q.dtype, copy=False), lse
    kernel = kernel_plan(D).fwd
    if kernel is None:  # the device cannot hold even the small tiles: the twin, on the same (CuPy) arrays
        o, lse = twin.flash_attention_forward(q32, k32, v32, sep_h, scale, lengths=len_h)
        return o.astype(q.dtype, copy=False), lse
    grid = ((T + kernel.block - 1) // kernel.block, H, B)
    kernel.fn(
        grid,
        (NTHREADS,),
        (q32, k32, v32, sep_d, len_d, o, lse, np.int32(H), np.int32(T), np.float32(scale)),
        shared_mem=kernel.smem_bytes,
    )
    return o.astype(q.dtype, copy=False), lse


def flash_attention_backward_cuda(q, k, v, o, lse, do, sep, scale=None, lengths=None):
    """Fused backward on the GPU from the forward's ``o`` and ``lse``. Returns (dq, dk, dv) in the input dtype."""
    cp = cupy_module()
    q32, k32, v32, sep_d, len_d, sep_h, len_h = _prepare("flash_attention_backward_cuda", q, k, v, sep, lengths)
    B, H, T, D = q32.shape
    if o.shape != q.shape or do.shape != q.shape or lse.shape != (B, H, T):
        raise ValueError(
            f"flash_attention_backward_cuda: expected o, do {q.shape} and lse {(B, H, T)}, "
            f"got o {o.shape}, do {do.shape}, lse {lse.shape}"
        )
    scale = float(D**-0.5 if scale is None else scale)
    o32 = cp.ascontiguousarray(o, dtype=cp.float32)
    do32 = cp.ascontiguousarray(do, dtype=cp.float32)
    lse32 = cp.ascontiguousarray(lse, dtype=cp.float32)
    if q32.size == 0:
        return tuple(cp.zeros((B, H, T, D), dtype=q.dtype) for _ in range(3))
    kernel = kernel_plan(D).bwd
    if kernel is None:  # see the forward
        grads = twin.flash_attention_backward(q32, k32, v32, o32, lse32, do32, sep_h, scale, lengths=len_h)
        return tuple(g.astype(q.dtype, copy=False) for g in grads)
    # Delta_i = rowsum(dO * O), FlashAttention-2's shortcut; padded rows may be NaN here, the kernel reads them as 0
    delta = cp.sum(do32 * o32, axis=-1)  # (B, H, T)
    dq = cp.zeros((B, H, T, D), dtype=cp.float32)  # accumulated by atomicAdd from every key-tile block
    dk = cp.empty((B, H, T, D), dtype=cp.float32)
    dv = cp.empty((B, H, T, D), dtype=cp.float32)
    grid = ((T + kernel.block - 1) // kernel.block, H, B)
    kernel.fn(
        grid,
        (NTHREADS,),
        (q32, k32, v32, do32, lse32, delta, sep_d, len_d, dq, dk, dv, np.int32(H), np.int32(T), np.float32(scale)),
        shared_mem=kernel.smem_bytes,
    )
    return tuple(g.astype(q.dtype, copy=False) for g in (dq, dk, dv))
