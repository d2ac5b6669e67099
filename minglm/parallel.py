"""Use every CPU core for the NumPy passes that are not matrix products.

A NumPy ufunc runs on one core. A GEMM already runs on all of them (BLAS has its own threads), but the passes around
it (softmax, the attention mask, GeLU, LayerNorm, the AdamW update) do not, and on a 2-core laptop they were about a
third of a training step. NumPy releases the GIL inside its loops, so plain Python threads can run those passes side
by side on disjoint pieces of an array. One function does that:

    map_rows(fn, *arrays, args=())   # fn(*(a[r] for a in arrays), *args) for pieces r of the first axis

``fn`` is an ordinary function written for whole arrays (``layer_norm_rows``, ``gelu_tanh_into``, ...), so calling it
once on everything is the same computation on one core; ``map_rows`` only cuts the first axis into pieces of about
``PIECE`` elements (of the largest array) and runs the pieces on the pool. It finds the device itself: CuPy arrays
and small arrays go to ``fn`` in one call. The rows must be independent (``fn`` writes only to its own rows), so the
result does not depend on which thread ran which piece. Three details make it fast rather than slower:
- While the threads run, BLAS is held at one thread (through ``threadpoolctl``): two Python threads that each start
  a 2-thread GEMM on 2 cores fight over them, and the step got slower, not faster.
- Work on small pieces is cache-friendly: one batch element's (T, T) scores stay in cache between the mask, max, exp
  and sum passes, where the whole (B, H, T, T) array goes to memory and back for each pass.
- Idle OpenBLAS threads spin for a while after each GEMM and would take a core from these threads; minglm shortens
  that spin when it is imported (``backend.tune_process``).

Users: the plain attention and GLM-130B's FP32-softmax attention (batch elements), GeLU, LayerNorm and the
cross-entropy's softmax (rows) in minglm/functional.py, the kernel twin (samples) in minglm/kernels/twin.py,
and AdamW (slices of its flat buffer) in optim.py.

The thread count is the BLAS thread count (so ``OMP_NUM_THREADS=2`` means 2 here too), or ``MINGLM_THREADS``.
Without ``threadpoolctl``, or with a BLAS it cannot control, everything runs in the calling thread as before.

Left out: processes (the arrays would be copied), and splitting the GEMMs themselves (BLAS does that better).
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from minglm.backend import is_cupy

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
    """How many threads ``map_rows`` uses: ``MINGLM_THREADS``, else the BLAS thread count (1 when unknown)."""
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


def _run_items(work, items: list, results: list) -> None:
    """Set ``results[i] = work(items[i])`` for every i, spread over ``num_threads()`` threads.

    ``items`` are split into contiguous runs, one per thread, and the calling thread takes the first run. An exception
    in any item is raised here, after every thread has finished.
    """
    threads = min(num_threads(), len(items))
    if threads <= 1 or not _busy.acquire(blocking=False):  # one thread, or a nested call: run inline
        for i, item in enumerate(items):
            results[i] = work(item)
        return
    try:
        if _state["pool"] is None:
            _state["pool"] = ThreadPoolExecutor(max_workers=_state["threads"] - 1, thread_name_prefix="minglm")
        bounds = [(t * len(items) // threads, (t + 1) * len(items) // threads) for t in range(threads)]

        def run(bound):
            for i in range(*bound):
                results[i] = work(items[i])

        blas = _state["blas"]
        limit = blas.limit(limits=1) if blas is not None else None
        try:
            futures = [_state["pool"].submit(run, bound) for bound in bounds[1:]]
            try:
                run(bounds[0])
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


def pieces(n: int, row: int = 1) -> list:
    """Split an axis of ``n`` rows of ``row`` elements into index pieces of about ``PIECE`` elements.

    Returns ``[slice(None)]`` (the whole axis, one piece) for small arrays. The split depends only on the sizes, never
    on the thread count, so the numbers a step computes do not change with ``MINGLM_THREADS``.
    """
    per = max(1, PIECE // max(1, row))
    if n < 2 * per:
        return [slice(None)]
    return [slice(i, min(i + per, n)) for i in range(0, n, per)]


def map_rows(fn, *arrays, args: tuple = ()) -> list:
    """``fn(*(a[r] for a in arrays), *args)`` for pieces ``r`` of the first axis, on every core; returns the list of
    what each call returned, in row order (one entry when the arrays went in one piece).

    The arrays share the length of their first axis; an entry may be None (an optional input), which ``fn`` gets as
    None. The pieces hold about ``PIECE`` elements of the largest array's rows (``pieces``). ``fn`` must write only to
    its own rows, and its results must not depend on where the cuts fall (per-row work, or partial sums the caller
    adds up in order). CuPy arrays go to ``fn`` whole, in one call: a GPU has its own parallelism.
    """
    given = [a for a in arrays if a is not None]
    n = given[0].shape[0]
    if any(a.shape[0] != n for a in given):
        raise ValueError(f"map_rows: every array needs the same first axis, got {[a.shape for a in given]}")
    if any(type(a) is not np.ndarray and is_cupy(a) for a in given):
        return [fn(*arrays, *args)]
    cuts = pieces(n, max(math.prod(a.shape[1:]) for a in given))
    if len(cuts) == 1:
        return [fn(*arrays, *args)]
    results = [None] * len(cuts)
    _run_items(lambda r: fn(*(None if a is None else a[r] for a in arrays), *args), cuts, results)
    return results
