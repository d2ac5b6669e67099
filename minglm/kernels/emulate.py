"""Run the CUDA kernels of ``flash_attn.cu`` on a CPU, for testing the kernel source where there is no GPU.

``emulate/cuda_emulation.h`` maps the few CUDA features the kernels use onto C++ (a fiber per CUDA thread, a tiny
scheduler that releases ``__syncthreads``/``__syncwarp`` once everyone has arrived and reports a deadlock when the
barriers are used inconsistently, an exchange array for warp shuffles); ``emulate/emulate_main.cpp`` includes the
unchanged ``.cu`` file and exports the launches.
This module builds that with ``g++`` (once per head size, into a temporary folder) and calls it with ``ctypes``,
mirroring ``cuda.py``: same grid, same arguments, same delta = rowsum(dO * O) step.

It checks what a CPU can check about the kernel: indexing, masking, tile skipping, the online-softmax code and the
barrier structure, in well under a second for small shapes. Left out: anything about speed, and races that only a
GPU's scheduling would expose (the fiber schedule is fixed).
"""

from __future__ import annotations

import ctypes
import functools
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from minglm.kernels.cuda import HEAD_DIMS, NTHREADS

EMULATE_DIR = Path(__file__).with_name("emulate")
_FLOAT_P = np.ctypeslib.ndpointer(dtype=np.float32, flags="C_CONTIGUOUS")
_INT_P = np.ctypeslib.ndpointer(dtype=np.int32, flags="C_CONTIGUOUS")


def compiler() -> str | None:
    """The C++ compiler used for the emulation (g++ on PATH), or None."""
    return shutil.which("g++")


@functools.cache
def _library(head_dim: int) -> ctypes.CDLL:
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"emulate: head size must be one of {HEAD_DIMS}, got {head_dim}")
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("emulate: needs g++ (C++20) on PATH")
    with tempfile.TemporaryDirectory(prefix="minglm_emu_") as tmp:  # the loaded library outlives its file
        out = Path(tmp) / f"libemu_{head_dim}.so"
        cmd = [cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-Wno-unknown-pragmas",
               f"-DHEAD_DIM={head_dim}", str(EMULATE_DIR / "emulate_main.cpp"), "-o", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"emulate: building the CPU emulation failed:\n{proc.stderr}")
        lib = ctypes.CDLL(str(out))
    i32, f32, grid = ctypes.c_int, ctypes.c_float, [ctypes.c_uint] * 4  # gx, gy, gz, threads per block
    lib.emu_consts.argtypes = [_INT_P]
    lib.emu_fwd.argtypes = grid + [_FLOAT_P] * 3 + [_INT_P] * 2 + [_FLOAT_P] * 2 + [i32, i32, f32]
    lib.emu_bwd.argtypes = grid + [_FLOAT_P] * 6 + [_INT_P] * 2 + [_FLOAT_P] * 3 + [i32, i32, f32]
    return lib


def kernel_constants(head_dim: int) -> dict[str, int]:
    """The tile constants compiled into the kernel (what cuda.py reads back with the smem_floats kernel)."""
    out = np.zeros(4, dtype=np.int32)
    _library(head_dim).emu_consts(out)
    return {"fwd_smem_floats": int(out[0]), "bwd_smem_floats": int(out[1]), "fwd_block_q": int(out[2]),
            "bwd_block_k": int(out[3])}


def _prepare(q, sep, lengths):
    B, _, T, _ = q.shape
    sep32 = np.ascontiguousarray(np.broadcast_to(np.asarray(sep), (B,)), dtype=np.int32)
    len32 = np.full(B, T, np.int32) if lengths is None else np.ascontiguousarray(lengths, dtype=np.int32)
    return sep32, len32


def _f32(a):
    return np.ascontiguousarray(a, dtype=np.float32)


def forward(q, k, v, sep, scale=None, lengths=None):
    """glm_attn_fwd on the CPU. Same contract as cuda.flash_attention_forward_cuda (float32 in, (o, lse) out)."""
    B, H, T, D = q.shape
    scale = float(D**-0.5 if scale is None else scale)
    sep32, len32 = _prepare(q, sep, lengths)
    o = np.full((B, H, T, D), np.nan, np.float32)  # NaN: a row the kernel forgets to write shows up
    lse = np.full((B, H, T), np.nan, np.float32)
    grid = (-(-T // kernel_constants(D)["fwd_block_q"]), H, B, NTHREADS)
    _library(D).emu_fwd(*grid, _f32(q), _f32(k), _f32(v), sep32, len32, o, lse, H, T, scale)
    return o, lse


def backward(q, k, v, o, lse, do, sep, scale=None, lengths=None):
    """glm_attn_bwd on the CPU. Same contract as cuda.flash_attention_backward_cuda."""
    B, H, T, D = q.shape
    scale = float(D**-0.5 if scale is None else scale)
    sep32, len32 = _prepare(q, sep, lengths)
    do32, o32 = _f32(do), _f32(o)
    delta = np.einsum("bhtd,bhtd->bht", do32, o32)  # (B, H, T)
    dq = np.zeros((B, H, T, D), np.float32)
    dk = np.full((B, H, T, D), np.nan, np.float32)
    dv = np.full((B, H, T, D), np.nan, np.float32)
    grid = (-(-T // kernel_constants(D)["bwd_block_k"]), H, B, NTHREADS)
    _library(D).emu_bwd(*grid, _f32(q), _f32(k), _f32(v), do32, _f32(lse), delta, sep32, len32, dq, dk, dv, H, T, scale)
    return dq, dk, dv


class FakeCupy:
    """A NumPy-backed stand-in for the parts of ``cupy`` that ``cuda.py`` uses, whose RawModule runs the kernels
    through the CPU emulation. Lets a test drive the real launcher (grid, arguments, shared memory) on a CPU."""

    int32, float32, float16 = np.int32, np.float32, np.float16

    def __init__(self):
        self.launches: list[tuple[str, tuple, tuple, int]] = []  # (kernel, grid, block, shared_mem) per launch

    asarray = staticmethod(np.asarray)
    asnumpy = staticmethod(np.asarray)
    zeros = staticmethod(np.zeros)
    empty = staticmethod(np.empty)
    sum = staticmethod(np.sum)

    @staticmethod
    def ascontiguousarray(a, dtype=None):
        return np.ascontiguousarray(a, dtype=dtype)

    def RawModule(self, code: str, options: tuple = ()):  # noqa: N802 - mirrors cupy.RawModule
        head_dims = [int(o.split("=")[1]) for o in options if o.startswith("-DHEAD_DIM=")]
        if len(head_dims) != 1:
            raise ValueError(f"FakeCupy.RawModule: expected one -DHEAD_DIM option, got {options}")
        return _FakeModule(self, head_dims[0])


class _FakeModule:
    def __init__(self, cupy: FakeCupy, head_dim: int):
        self.cupy, self.head_dim = cupy, head_dim

    def get_function(self, name: str):
        return _FakeKernel(self.cupy, self.head_dim, name)


class _FakeKernel:
    def __init__(self, cupy: FakeCupy, head_dim: int, name: str):
        self.cupy, self.head_dim, self.name = cupy, head_dim, name
        self.max_dynamic_shared_size_bytes = 48 * 1024

    def __call__(self, grid, block, args, shared_mem: int = 0):
        self.cupy.launches.append((self.name, tuple(grid), tuple(block), shared_mem))
        lib = _library(self.head_dim)
        if shared_mem > self.max_dynamic_shared_size_bytes:
            raise RuntimeError(f"{self.name}: {shared_mem} B of shared memory over the kernel's limit "
                               f"{self.max_dynamic_shared_size_bytes} B (a real launch would fail)")
        if self.name == "smem_floats":
            lib.emu_consts(args[0])
        elif self.name in ("glm_attn_fwd", "glm_attn_bwd"):
            gx, gy, gz = (tuple(grid) + (1, 1))[:3]
            scalars = [int(args[-3]), int(args[-2]), float(args[-1])]  # H, T, scale
            launch = lib.emu_fwd if self.name == "glm_attn_fwd" else lib.emu_bwd
            launch(gx, gy, gz, int(block[0]), *args[:-3], *scalars)
        else:
            raise ValueError(f"FakeCupy: no kernel named {self.name}")
