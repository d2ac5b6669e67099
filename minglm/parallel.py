"""Use every CPU core for the NumPy passes that are not matrix products.

A NumPy ufunc runs on one core. A GEMM already runs on all of them (BLAS has its own threads), but the passes around
it (softmax, the attention mask, GeLU, LayerNorm, the AdamW update) do not, and on a 2-core laptop they were about a
third of a training step. NumPy releases the GIL inside its loops, so plain Python threads can run those passes side
by side on disjoint pieces of an array. ``parallel_for`` does that:

    parallel_for(work, items)   # calls work(item) for every item, the items split between the threads

The items are independent (different batch elements, different rows), so the result does not depend on which thread
ran which item. Two details make it fast rather than slower:
- While the threads run, BLAS is held at one thread (through ``threadpoolctl``): two Python threads that each start
  a 2-thread GEMM on 2 cores fight over them, and the step got slower, not faster.
- Work on small pieces is cache-friendly: a (T, T) score block of one batch element stays in L2 between the mask,
  max, exp and sum passes, where the whole (B, H, T, T) array goes to memory and back for each pass.
- Idle OpenBLAS threads spin for a while after each GEMM and would take a core from these threads; minglm/__init__.py
  shortens that spin (OPENBLAS_THREAD_TIMEOUT).

Users: the plain attention (one batch element per piece), GeLU and LayerNorm (rows) in minglm/functional.py, the
kernel twin (one sample per piece) in minglm/kernels/twin.py, and AdamW (slices of its flat buffer) in optim.py.

The thread count is the BLAS thread count (so ``OMP_NUM_THREADS=2`` means 2 here too), or ``MINGLM_THREADS``.
Without ``threadpoolctl``, or with a BLAS it cannot control, everything runs in the calling thread as before.
CuPy arrays never come here: a GPU has its own parallelism.

Left out: processes (the arrays would be copied), and splitting the GEMMs themselves (BLAS does that better).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

_state: dict = {}  # "threads", "blas" (a threadpoolctl selection or None), "pool"; filled on first use
_busy = threading.Lock()  # one parallel region at a time; a nested or concurrent call runs inline


def _after_fork_in_child() -> None:
    """A forked child has none of the parent's pool threads: start a fresh pool when it first needs one."""
    global _busy
    _busy = threading.Lock()
    if "pool" in _state:
        _state["pool"] = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _blas_controller():
    """The threadpoolctl handle on the BLAS that NumPy uses, or None when it cannot be controlled."""
    try:
        import numpy  # noqa: F401, PLC0415 - load NumPy's BLAS before looking for it
        from threadpoolctl import ThreadpoolController  # noqa: PLC0415 - optional speed-up
    except ImportError:
        return None
    try:
        selection = ThreadpoolController().select(user_api="blas")
    except Exception:  # an unusual BLAS build threadpoolctl cannot read: run single-threaded
        return None
    return selection if len(selection.lib_controllers) else None


def _init() -> None:
    """Find the BLAS and the thread count once, on first use."""
    if "threads" in _state:
        return
    blas = _blas_controller()
    env = os.environ.get("MINGLM_THREADS", "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ValueError(f"MINGLM_THREADS must be a positive integer, got {env!r}")
        threads = int(env)
    elif blas is not None:
        threads = max(c.num_threads for c in blas.lib_controllers)
    else:
        threads = 1
    _state.update(threads=threads, blas=blas, pool=None)


def num_threads() -> int:
    """How many threads ``parallel_for`` uses: ``MINGLM_THREADS``, else the BLAS thread count (1 when unknown)."""
    _init()
    return _state["threads"]


def set_num_threads(n: int) -> None:
    """Use ``n`` threads from now on (1 = everything in the calling thread, as plain NumPy)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"set_num_threads: n must be a positive integer, got {n!r}")
    _init()
    with _busy:  # not while a parallel region is running
        if _state["pool"] is not None:
            _state["pool"].shutdown()
        _state.update(threads=n, pool=None)


def parallel_for(work, items: list) -> None:
    """Call ``work(item)`` for every item, spread over ``num_threads()`` threads; returns when all are done.

    ``items`` are split into contiguous runs, one per thread, and the calling thread takes the first run. ``work``
    must only write to places no other item writes to. An exception in any item is raised here.
    """
    threads = min(num_threads(), len(items))
    if threads <= 1 or not _busy.acquire(blocking=False):
        for item in items:
            work(item)
        return
    try:
        if _state["pool"] is None:
            _state["pool"] = ThreadPoolExecutor(max_workers=_state["threads"] - 1, thread_name_prefix="minglm")
        runs = [items[i * len(items) // threads:(i + 1) * len(items) // threads] for i in range(threads)]

        def run(chunk):
            for item in chunk:
                work(item)

        blas = _state["blas"]
        limit = blas.limit(limits=1) if blas is not None else None
        try:
            futures = [_state["pool"].submit(run, chunk) for chunk in runs[1:]]
            try:
                run(runs[0])
            finally:
                for f in futures:  # wait for every thread before BLAS gets its threads back
                    f.exception()
            for f in futures:
                f.result()  # re-raise the first error of another thread
        finally:
            if limit is not None:
                limit.restore_original_limits()
    finally:
        _busy.release()


PIECE = 1 << 17  # elements in one piece of an elementwise pass: 512 KiB of float32, which stays in L2 cache


def pieces(n: int, row: int = 1, on_gpu: bool = False) -> list:
    """Split an axis of ``n`` rows of ``row`` elements into index pieces of about ``PIECE`` elements.

    Returns ``[slice(None)]`` (the whole axis, one piece) for small arrays and on CuPy. The split depends only on
    the sizes, never on the thread count, so the numbers a step computes do not change with ``MINGLM_THREADS``.
    """
    per = max(1, PIECE // max(1, row))
    if on_gpu or n < 2 * per:
        return [slice(None)]
    return [slice(i, min(i + per, n)) for i in range(0, n, per)]
