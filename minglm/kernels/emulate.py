"""Run the CUDA kernels of ``flash_attn.cu`` on a CPU, for testing the kernel source where there is no GPU.

``emulate/cuda_emulation.h`` maps the few CUDA features the kernels use onto C++ (a fiber per CUDA thread, a tiny
scheduler that releases ``__syncthreads``/``__syncwarp`` once everyone has arrived and reports a deadlock when the
barriers are used inconsistently, an exchange array for warp shuffles, dynamic shared memory of exactly the
launch's size); ``emulate/emulate_main.cpp`` includes the unchanged ``.cu`` file and exports the launches.
This module builds that with ``g++`` (once per head size and tile variant per process) and calls it with
``ctypes``, mirroring ``cuda.py``: same grid, same arguments, same delta = rowsum(dO * O) step.

Schedules (``SCHEDULES``, the ``schedule=`` option): the order in which the emulator runs the threads between
barriers. ``"thread-order"`` and ``"reverse"`` move the warps in lockstep; ``"warp-random"`` runs one warp at a
time, in a random order, each until its next ``__syncthreads``, with its lanes shuffled. A kernel with a missing
barrier gives wrong numbers under at least one of them (tests/test_kernels_emulation.py deletes each barrier to
show it), except a ``__syncwarp`` that only orders memory around a warp shuffle, which a CPU cannot show.

``bounds_check`` builds ``emulate/bounds_check.cpp`` with AddressSanitizer and UBSan, where the compiler supports
them, and runs both kernels on exact-size buffers with NaN in every padded row.

``FakeCupy`` is a NumPy-backed stand-in for the parts of ``cupy`` that ``cuda.py`` uses, with a device whose
shared-memory limit you choose, so that tests drive the real launcher and its device-aware dispatch on a CPU.

Left out: anything about speed, and memory-ordering races (one fiber runs at a time, so memory is always coherent).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from minglm.kernels.cuda import HEAD_DIMS, NTHREADS, SOURCE_PATH

EMULATE_DIR = Path(__file__).with_name("emulate")
SCHEDULES = {"thread-order": 0, "reverse": 1, "warp-random": 2}  # EmuSchedule in cuda_emulation.h
SANITIZE_FLAGS = ("-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer")
_FLOAT_P = np.ctypeslib.ndpointer(dtype=np.float32, flags="C_CONTIGUOUS")
_INT_P = np.ctypeslib.ndpointer(dtype=np.int32, flags="C_CONTIGUOUS")


def compiler() -> str | None:
    """The C++ compiler used for the emulation (g++ on PATH), or None."""
    return shutil.which("g++")


@functools.cache
def _build_dir() -> Path:
    """One folder per process for the built harness executables (libraries are loaded and need no file)."""
    folder = Path(tempfile.mkdtemp(prefix="minglm_emu_"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def _compile(out: Path, main: str, head_dim: int, small_tiles: bool, source: str | None, extra: Iterable[str]):
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"emulate: head size must be one of {HEAD_DIMS}, got {head_dim}")
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("emulate: needs g++ (C++20) on PATH")
    cmd = [cxx, "-std=c++20", "-Wno-unknown-pragmas", f"-DHEAD_DIM={head_dim}", f"-DSMALL_TILES={int(small_tiles)}",
           *extra, str(EMULATE_DIR / main), "-o", str(out)]
    if source is not None:
        cmd.insert(1, f'-DEMU_KERNEL_SOURCE="{Path(source).resolve()}"')
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"emulate: building {main} failed ({' '.join(cmd)}):\n{proc.stderr}")


@functools.cache
def _library(head_dim: int, small_tiles: bool = False, source: str | None = None) -> ctypes.CDLL:
    """The emulation of one build of the kernel source (``source``: another copy of flash_attn.cu) as a library."""
    with tempfile.TemporaryDirectory(prefix="minglm_emu_") as tmp:  # the loaded library outlives its file
        out = Path(tmp) / f"libemu_{head_dim}.so"
        _compile(out, "emulate_main.cpp", head_dim, small_tiles, source, ["-O1", "-shared", "-fPIC"])
        lib = ctypes.CDLL(str(out))
    u32, i32, f32 = ctypes.c_uint, ctypes.c_int, ctypes.c_float
    launch = [u32] * 5 + [i32, u32]  # gx, gy, gz, threads per block, shared bytes, schedule, seed
    lib.emu_consts.argtypes = [_INT_P]
    lib.emu_last_error.restype = ctypes.c_char_p
    lib.emu_fwd.argtypes = launch + [_FLOAT_P] * 3 + [_INT_P] * 2 + [_FLOAT_P] * 2 + [i32, i32, f32]
    lib.emu_bwd.argtypes = launch + [_FLOAT_P] * 6 + [_INT_P] * 2 + [_FLOAT_P] * 3 + [i32, i32, f32]
    lib.emu_fwd.restype = lib.emu_bwd.restype = i32
    return lib


def kernel_constants(head_dim: int, small_tiles: bool = False, source: str | None = None) -> dict[str, int]:
    """The tile constants compiled into the kernel (what cuda.py reads back with the smem_floats kernel)."""
    out = np.zeros(5, dtype=np.int32)
    _library(head_dim, small_tiles, source).emu_consts(out)
    return {"fwd_smem_floats": int(out[0]), "bwd_smem_floats": int(out[1]), "fwd_block_q": int(out[2]),
            "bwd_block_k": int(out[3]), "bwd_block_q": int(out[4])}


def _schedule_code(schedule: str) -> int:
    if schedule not in SCHEDULES:
        raise ValueError(f"emulate: schedule must be one of {tuple(SCHEDULES)}, got {schedule!r}")
    return SCHEDULES[schedule]


def _launch(lib, name: str, grid, nthreads: int, smem_bytes: int, schedule: str, seed: int, args) -> None:
    gx, gy, gz = (tuple(int(g) for g in grid) + (1, 1))[:3]
    fn = lib.emu_fwd if name == "glm_attn_fwd" else lib.emu_bwd
    if fn(gx, gy, gz, int(nthreads), int(smem_bytes), _schedule_code(schedule), int(seed), *args) != 0:
        raise RuntimeError(f"{name} (emulated): {lib.emu_last_error().decode()}")


def _prepare(q, sep, lengths):
    B, _, T, _ = q.shape
    sep32 = np.ascontiguousarray(np.broadcast_to(np.asarray(sep), (B,)), dtype=np.int32)
    len32 = np.full(B, T, np.int32) if lengths is None else np.ascontiguousarray(lengths, dtype=np.int32)
    return sep32, len32


def _f32(a):
    return np.ascontiguousarray(a, dtype=np.float32)


def forward(q, k, v, sep, scale=None, lengths=None, *, schedule="thread-order", seed=0, small_tiles=False,
            source=None):
    """glm_attn_fwd on the CPU. Same contract as cuda.flash_attention_forward_cuda (float32 in, (o, lse) out).
    ``source``: run another copy of flash_attn.cu (a path) instead of the package's."""
    B, H, T, D = q.shape
    scale = float(D**-0.5 if scale is None else scale)
    sep32, len32 = _prepare(q, sep, lengths)
    o = np.full((B, H, T, D), np.nan, np.float32)  # NaN: a row the kernel forgets to write shows up
    lse = np.full((B, H, T), np.nan, np.float32)
    c = kernel_constants(D, small_tiles, source)
    grid = (-(-T // c["fwd_block_q"]), H, B)
    args = (_f32(q), _f32(k), _f32(v), sep32, len32, o, lse, H, T, scale)
    _launch(_library(D, small_tiles, source), "glm_attn_fwd", grid, NTHREADS, 4 * c["fwd_smem_floats"], schedule,
            seed, args)
    return o, lse


def backward(q, k, v, o, lse, do, sep, scale=None, lengths=None, *, schedule="thread-order", seed=0,
             small_tiles=False, source=None):
    """glm_attn_bwd on the CPU. Same contract as cuda.flash_attention_backward_cuda."""
    B, H, T, D = q.shape
    scale = float(D**-0.5 if scale is None else scale)
    sep32, len32 = _prepare(q, sep, lengths)
    do32, o32 = _f32(do), _f32(o)
    delta = np.einsum("bhtd,bhtd->bht", do32, o32)  # (B, H, T)
    dq = np.zeros((B, H, T, D), np.float32)
    dk = np.full((B, H, T, D), np.nan, np.float32)
    dv = np.full((B, H, T, D), np.nan, np.float32)
    c = kernel_constants(D, small_tiles, source)
    grid = (-(-T // c["bwd_block_k"]), H, B)
    args = (_f32(q), _f32(k), _f32(v), do32, _f32(lse), delta, sep32, len32, dq, dk, dv, H, T, scale)
    _launch(_library(D, small_tiles, source), "glm_attn_bwd", grid, NTHREADS, 4 * c["bwd_smem_floats"], schedule,
            seed, args)
    return dq, dk, dv


# ---------------------------------------------------------------- AddressSanitizer + UBSan bounds harness


@functools.cache
def sanitizers_supported() -> bool:
    """Whether g++ here can build and run a program with -fsanitize=address,undefined."""
    cxx = compiler()
    if cxx is None:
        return False
    folder = _build_dir()
    src, exe = folder / "probe.cpp", folder / "probe"
    src.write_text("int main() { return 0; }\n")
    build = subprocess.run([cxx, *SANITIZE_FLAGS, str(src), "-o", str(exe)], capture_output=True, check=False)
    return build.returncode == 0 and subprocess.run([str(exe)], capture_output=True, check=False).returncode == 0


@functools.cache
def _bounds_executable(head_dim: int, small_tiles: bool = False) -> Path:
    out = _build_dir() / f"bounds_check_{head_dim}_{int(small_tiles)}"
    _compile(out, "bounds_check.cpp", head_dim, small_tiles, None, ["-O0", *SANITIZE_FLAGS])  # -O0: builds 3x faster
    return out


def tile_edge_cases(head_dim: int, small_tiles: bool = False) -> list[tuple[int, int, int, list[int], list[int]]]:
    """(B, H, T, sep, lengths) cases on and next to the kernel's tile edges: T = 0; T one past a key tile (with
    two samples and two heads, so the sample and head offsets are exercised); T one past a forward query tile
    (and a key tile); and at that T, lengths on a query-tile edge, on a key-tile edge, and 0."""
    tile = kernel_constants(head_dim, small_tiles)["fwd_block_q"]  # keys come in tiles of 32
    T = max(tile, 32) + 1
    return [
        (1, 1, 0, [0], [0]),
        (2, 2, 33, [0, 33], [33, 33]),
        (2, 1, T, [5, T], [T, T]),
        (3, 1, T, [0, 16, 0], [tile, 32, 0]),
    ]


def bounds_check(head_dim: int, cases=None, small_tiles: bool = False, schedules=("warp-random",)) -> tuple[bool, str]:
    """Run the AddressSanitizer + UBSan harness (emulate/bounds_check.cpp) on ``cases`` (default: the tile-edge
    cases) under ``schedules`` (addresses do not depend on the order, so one is enough by default).
    Returns (passed, output). Raises when the sanitizers are not supported here."""
    if not sanitizers_supported():
        raise RuntimeError("emulate.bounds_check: g++ cannot build with -fsanitize=address,undefined here")
    cases = tile_edge_cases(head_dim, small_tiles) if cases is None else cases
    lines = [" ".join(str(x) for x in (B, H, T, *(n for pair in zip(sep, lens) for n in pair)))
             for B, H, T, sep, lens in cases]
    cmd = [str(_bounds_executable(head_dim, small_tiles)), *(str(_schedule_code(s)) for s in schedules)]
    proc = subprocess.run(cmd, input="\n".join(lines) + "\n", capture_output=True, text=True, check=False,
                          env={**os.environ, "ASAN_OPTIONS": "detect_leaks=0", "UBSAN_OPTIONS": "print_stacktrace=1"})
    return proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------- a NumPy-backed stand-in for cupy


class FakeCupy:
    """A NumPy-backed stand-in for the parts of ``cupy`` that ``cuda.py`` uses, whose RawModule runs the kernels
    through the CPU emulation. Lets a test drive the real launcher (dispatch, grid, arguments, shared memory) on a
    CPU, on a pretend device with ``smem_optin`` bytes of opt-in shared memory per block (227 KiB on an H100,
    64 KiB on a T4, 48 KiB on Pascal; or a dict {device id: bytes} for several devices). ``device_id`` may be
    changed to pretend that another device is current; ``source`` runs another copy of flash_attn.cu."""

    int32, float32, float16 = np.int32, np.float32, np.float16

    def __init__(self, smem_optin: int | dict[int, int] = 227 * 1024, schedule: str = "thread-order", seed: int = 0,
                 device_id: int = 0, source: str | None = None):
        _schedule_code(schedule)
        self.smem_optin, self.schedule, self.seed, self.device_id = smem_optin, schedule, seed, device_id
        self.source = None if source is None else str(source)
        self.launches: list[tuple[str, tuple, tuple, int]] = []  # (kernel, grid, block, shared_mem) per launch
        self.modules: list[tuple[int, tuple]] = []  # (device id, options) per RawModule built
        self.cuda = _FakeCudaNamespace(self)

    asarray = staticmethod(np.asarray)
    asnumpy = staticmethod(np.asarray)
    zeros = staticmethod(np.zeros)
    empty = staticmethod(np.empty)
    sum = staticmethod(np.sum)

    @staticmethod
    def ascontiguousarray(a, dtype=None):
        return np.ascontiguousarray(a, dtype=dtype)

    def device_limit(self, device_id: int | None = None) -> int:
        """The pretend device's MaxSharedMemoryPerBlockOptin (of the current device by default)."""
        device_id = self.device_id if device_id is None else device_id
        return self.smem_optin[device_id] if isinstance(self.smem_optin, dict) else self.smem_optin

    def RawModule(self, code: str, options: tuple = ()):  # noqa: N802 - mirrors cupy.RawModule
        head_dims = [int(o.split("=")[1]) for o in options if o.startswith("-DHEAD_DIM=")]
        if len(head_dims) != 1:
            raise ValueError(f"FakeCupy.RawModule: expected one -DHEAD_DIM option, got {options}")
        self.modules.append((self.device_id, tuple(options)))
        return _FakeModule(self, head_dims[0], "-DSMALL_TILES=1" in options)


class _FakeCudaNamespace:
    def __init__(self, cupy: FakeCupy):
        self._cupy = cupy

    def Device(self, device_id=None):  # noqa: N802 - mirrors cupy.cuda.Device
        return _FakeDevice(self._cupy, self._cupy.device_id if device_id is None else int(device_id))


class _FakeDevice:
    def __init__(self, cupy: FakeCupy, device_id: int):
        self.id = device_id
        self.attributes = {"MaxSharedMemoryPerBlockOptin": cupy.device_limit(device_id),
                           "MaxSharedMemoryPerBlock": 48 * 1024}
        self.compute_capability = "00"

    def synchronize(self):
        pass


class _FakeModule:
    """A module belongs to the device that was current when it was built, as a CUDA module does."""

    def __init__(self, cupy: FakeCupy, head_dim: int, small_tiles: bool):
        self.cupy, self.head_dim, self.small_tiles, self.device_id = cupy, head_dim, small_tiles, cupy.device_id

    def get_function(self, name: str):
        return _FakeKernel(self.cupy, self.head_dim, self.small_tiles, name, self.device_id)


class _FakeKernel:
    def __init__(self, cupy: FakeCupy, head_dim: int, small_tiles: bool, name: str, device_id: int):
        self.cupy, self.head_dim, self.small_tiles, self.name = cupy, head_dim, small_tiles, name
        self.device_id = device_id
        self._max_dynamic = 48 * 1024

    @property
    def max_dynamic_shared_size_bytes(self) -> int:
        return self._max_dynamic

    @max_dynamic_shared_size_bytes.setter
    def max_dynamic_shared_size_bytes(self, value: int) -> None:
        limit = self.cupy.device_limit(self.device_id)
        if value > limit:  # what the driver does (CUDA_ERROR_INVALID_VALUE)
            raise RuntimeError(f"{self.name}: cannot opt in to {value} B of shared memory on a device that allows "
                               f"{limit} B per block")
        self._max_dynamic = int(value)

    def __call__(self, grid, block, args, shared_mem: int = 0):
        self.cupy.launches.append((self.name, tuple(grid), tuple(block), shared_mem))
        if self.device_id != self.cupy.device_id:
            raise RuntimeError(f"{self.name}: launched on device {self.cupy.device_id}, built for {self.device_id}")
        lib = _library(self.head_dim, self.small_tiles, self.cupy.source)
        if shared_mem > self._max_dynamic:
            raise RuntimeError(f"{self.name}: {shared_mem} B of shared memory over the kernel's limit "
                               f"{self._max_dynamic} B (a real launch would fail)")
        if self.name == "smem_floats":
            lib.emu_consts(args[0])
        elif self.name in ("glm_attn_fwd", "glm_attn_bwd"):
            scalars = [int(args[-3]), int(args[-2]), float(args[-1])]  # H, T, scale
            _launch(lib, self.name, grid, int(block[0]), shared_mem, self.cupy.schedule, self.cupy.seed,
                    (*args[:-3], *scalars))
        else:
            raise ValueError(f"FakeCupy: no kernel named {self.name}")


@contextlib.contextmanager
def fake_cupy_installed(fake: FakeCupy) -> Iterator[FakeCupy]:
    """Point cuda.py at ``fake`` (and start from an empty compile cache) for the duration of the block."""
    from minglm.kernels import cuda  # noqa: PLC0415 - cuda imports this module's constants only

    saved = cuda.cupy_module
    cuda.cupy_module = lambda: fake
    cuda.clear_cache()
    try:
        yield fake
    finally:
        cuda.cupy_module = saved
        cuda.clear_cache()


__all__ = ["SCHEDULES", "SOURCE_PATH", "FakeCupy", "backward", "bounds_check", "compiler", "fake_cupy_installed",
           "forward", "kernel_constants", "sanitizers_supported", "tile_edge_cases"]
