"""The array-backend seam: NumPy on the CPU, CuPy on a GPU, with the same code above it.

Every other module does array work through an ``xp`` module it gets from here (``get_xp(array)`` for the module
that owns an array, ``default_xp()`` for new arrays). Nothing outside this file and ``minglm/kernels/`` imports
``cupy``, so a CPU machine never needs it.

``MINGLM_BACKEND`` picks the default for new arrays:
- ``auto`` (the default): CuPy when ``cupy.is_available()`` says a GPU is usable, else NumPy;
- ``numpy``: always NumPy;
- ``cupy``: CuPy, and a clear error when there is no usable GPU.

Left out on purpose: multiple GPUs, streams and memory pools. CuPy's defaults are fine for a course.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from types import ModuleType

import numpy as np

_VALID = ("auto", "numpy", "cupy")
_cupy_cache: list[ModuleType | None] = []  # filled on first probe: [cupy or None]


def _probe_cupy() -> ModuleType | None:
    """Return the cupy module when it imports and a GPU is usable, else None (probed once)."""
    if not _cupy_cache:
        try:
            import cupy  # noqa: PLC0415 - optional dependency, imported only here

            _cupy_cache.append(cupy if cupy.is_available() else None)
        except Exception:  # ImportError, or a broken CUDA install
            _cupy_cache.append(None)
    return _cupy_cache[0]


def backend_name() -> str:
    """The backend asked for by MINGLM_BACKEND (validated)."""
    name = os.environ.get("MINGLM_BACKEND", "auto").strip().lower() or "auto"
    if name not in _VALID:
        raise ValueError(f"MINGLM_BACKEND={name!r} is not one of {', '.join(_VALID)}")
    return name


def gpu_available() -> bool:
    """True when CuPy is installed and can use a GPU."""
    return _probe_cupy() is not None


def cupy_module() -> ModuleType:
    """The cupy module, or a RuntimeError that says why it cannot be used."""
    cp = _probe_cupy()
    if cp is None:
        raise RuntimeError(
            "the CuPy backend needs `cupy` and a usable CUDA GPU, and none was found "
            "(install requirements-gpu.txt on a machine with an NVIDIA driver, or use MINGLM_BACKEND=numpy)"
        )
    return cp


def default_xp() -> ModuleType:
    """The module that new arrays are created with, as MINGLM_BACKEND says."""
    name = backend_name()
    if name == "numpy":
        return np
    if name == "cupy":
        return cupy_module()
    return _probe_cupy() or np


def device_xp(device: str) -> ModuleType:
    """Map a device name ('cpu', 'gpu', 'auto') to its array module."""
    if device == "cpu":
        return np
    if device == "gpu":
        return cupy_module()
    if device == "auto":
        return default_xp()
    raise ValueError(f"device must be 'cpu', 'gpu' or 'auto', got {device!r}")


def is_cupy(a) -> bool:
    """True when ``a`` is a CuPy array (checked without importing cupy)."""
    return type(a).__module__.split(".")[0] == "cupy"


def get_xp(*arrays) -> ModuleType:
    """The array module that owns the given arrays: cupy if any is a CuPy array, else numpy."""
    for a in arrays:
        if type(a) is not np.ndarray and is_cupy(a):  # the common case first: decoding calls this ~30 times a token
            return cupy_module()
    return np


def to_numpy(a) -> np.ndarray:
    """A NumPy copy (or view) of an array from either backend."""
    if is_cupy(a):
        return a.get()
    return np.asarray(a)


def to_device(a, xp: ModuleType):
    """Move an array to the backend ``xp`` (a no-op when it is already there)."""
    if xp is np:
        return to_numpy(a)
    return xp.asarray(a)


def scatter_add_rows(table, ids, rows) -> None:
    """In place: ``table[ids[n]] += rows[n]`` for every n, with repeated ids summed.

    ``table`` is (V, C), ``ids`` (N,) integers, ``rows`` (N, C). This is the embedding backward. ``np.add.at`` on a
    large table is slow, so on NumPy the ids are sorted and equal runs summed with ``np.add.reduceat``; CuPy has a
    native atomic scatter-add.
    """
    if is_cupy(table):
        import cupyx  # noqa: PLC0415 - CuPy-only helper, still inside the backend module

        cupyx.scatter_add(table, ids, rows)
        return
    if ids.size == 0:
        return
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
    table[sorted_ids[starts]] += np.add.reduceat(rows[order], starts, axis=0)


def scatter_add(target, index, values) -> None:
    """In place ``target[index] += values`` with repeated indices summed (advanced-indexing backward)."""
    if is_cupy(target):
        import cupyx  # noqa: PLC0415

        cupyx.scatter_add(target, index, values)
    else:
        np.add.at(target, index, values)


def cpu_name() -> str:
    """The CPU's model name (``lscpu``'s "Model name", read from /proc/cpuinfo), or the platform's word for it."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


SPIN = "18"  # OPENBLAS_THREAD_TIMEOUT: idle BLAS threads spin 2^18 cycles (about 0.1 ms) instead of 2^28 (0.1 s)
_tuned: dict = {}  # what tune_process applied, for the benchmarks' header and the tests


def tune_process() -> dict:
    """Process-wide settings that a training step on the CPU needs, applied by ``import minglm`` (minglm/__init__.py)
    whatever was imported before it, so a notebook that imports NumPy first trains as fast as ``python -m minglm``.
    ``MINGLM_TUNE=0`` (set before the import) turns all of it off. Returns what was applied (also ``tuning()``):

    - ``malloc``: glibc keeps freed large blocks for reuse (``tune_malloc``);
    - ``openblas_spin``: OpenBLAS's idle threads spin about 0.1 ms after a matrix product instead of 0.1 s, so they
      leave the cores to minglm's own threads for the passes between products (minglm/parallel.py; 10-20 % of the
      small step on 2 cores). OpenBLAS reads ``OPENBLAS_THREAD_TIMEOUT`` when it is loaded; when NumPy loaded it
      before minglm, it is told to read it again and its threads are restarted (``tune_openblas_spin``). A value the
      user set is kept.
    """
    if os.environ.get("MINGLM_TUNE", "1") == "0":
        _tuned.clear()
        return {}
    _tuned.update(malloc=tune_malloc(), openblas_spin=tune_openblas_spin())
    return dict(_tuned)


def tuning() -> dict:
    """What ``tune_process`` applied in this process ({} when it was turned off)."""
    return dict(_tuned)


def _openblas():
    """The OpenBLAS library NumPy loaded, as a ctypes handle, or None (another BLAS, or no threadpoolctl)."""
    try:
        from threadpoolctl import ThreadpoolController  # noqa: PLC0415 - optional, as in minglm/parallel.py
        libs = ThreadpoolController().select(internal_api="openblas").lib_controllers
        return ctypes.CDLL(libs[0].filepath) if libs else None
    except Exception:  # no threadpoolctl, or a library it cannot read
        return None


def tune_openblas_spin() -> int | None:
    """Make OpenBLAS's idle threads go to sleep after about 0.1 ms (``OPENBLAS_THREAD_TIMEOUT``, unless the user set
    it). Returns the timeout OpenBLAS now uses (the exponent of its spin cycles), or None when NumPy's BLAS is not an
    OpenBLAS that can be told.

    The variable is read by OpenBLAS once, when it is loaded, and its threads keep the value they started with. So
    when NumPy is already loaded with another value, OpenBLAS re-reads its environment (``openblas_read_env``) and
    its idle threads are shut down (``blas_thread_shutdown_``, what OpenBLAS itself does before a fork); the next
    product starts them again with the new value. Call it while no other thread runs a matrix product.
    """
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", SPIN)
    lib = _openblas()
    names = ("openblas_thread_timeout", "openblas_read_env", "blas_thread_shutdown_")
    if lib is None or not all(hasattr(lib, n) for n in names):
        return None
    wanted = int(os.environ["OPENBLAS_THREAD_TIMEOUT"])
    if lib.openblas_thread_timeout() != wanted:
        lib.openblas_read_env()
        lib.blas_thread_shutdown_()
    return int(lib.openblas_thread_timeout())


def tune_malloc() -> bool:
    """Keep freed large blocks in the process instead of returning them to the OS (Linux glibc only).

    A training step allocates and frees the same few large temporaries every time. By default glibc serves blocks
    over 128 KiB with mmap and unmaps them on free, so every step page-faults them in again; that cost 6-8 ms per
    softmax of 16 MiB here. Raising M_MMAP_THRESHOLD (to 32 MiB, glibc's maximum) and M_TRIM_THRESHOLD makes
    those blocks reusable. Part of ``tune_process``. Returns True when the setting was applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_trim_threshold, 1 << 30) and libc.mallopt(m_mmap_threshold, 32 << 20)
        return bool(ok)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
