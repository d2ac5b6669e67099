"""minglm/parallel.py: the thread pool that spreads the non-GEMM passes over the CPU cores.

What must hold: every item runs exactly once, really on two threads at a time, errors come back to the caller, a
nested call does not deadlock, BLAS gets its threads back, and the numbers do not depend on the thread count (the
pieces depend only on sizes). The ops that use it are checked piece by piece in tests/test_ops_table.py.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import minglm.functional as F
from minglm import parallel
from minglm.model import GLM, GLMConfig
from minglm.optim import AdamW
from minglm.tensor import Tensor


@pytest.fixture
def two_threads():
    before = parallel.num_threads()
    parallel.set_num_threads(2)
    yield
    parallel.set_num_threads(before)


def test_every_piece_once_and_two_at_a_time(two_threads, monkeypatch):
    monkeypatch.setattr(parallel, "PIECE", 1)
    barrier = threading.Barrier(2, timeout=10)  # breaks (an error) unless two pieces really run at once
    seen, lock = [], threading.Lock()

    def work(rows):
        if rows[0] in (0, 5):  # the first piece of each thread's run meets the other thread here
            barrier.wait()
        with lock:
            seen.append((int(rows[0]), threading.get_ident()))
        return int(rows[0])

    assert parallel.map_rows(work, np.arange(10)) == list(range(10))  # the results come back in row order
    assert sorted(i for i, _ in seen) == list(range(10))
    assert len({t for _, t in seen}) == 2


def test_an_error_in_another_thread_is_raised(two_threads, monkeypatch):
    monkeypatch.setattr(parallel, "PIECE", 1)

    def work(rows):
        if rows[0] == 7:
            raise ValueError("row 7 failed")

    with pytest.raises(ValueError, match="row 7 failed"):
        parallel.map_rows(work, np.arange(8))
    out = np.zeros(4)
    parallel.map_rows(lambda o: o.__setitem__(slice(None), 1.0), out)  # the pool still works afterwards
    assert out.tolist() == [1.0] * 4


def test_nested_call_runs_inline(two_threads, monkeypatch):
    monkeypatch.setattr(parallel, "PIECE", 1)
    out = np.zeros((4, 4))

    def inner(row, col):
        row[:, col] = 1.0

    parallel.map_rows(lambda rows: parallel.map_rows(lambda c: inner(rows, c), np.arange(4)), out)
    assert out.ravel().tolist() == [1.0] * 16


def test_map_rows_arguments(two_threads, monkeypatch):
    """None stands for an absent optional array, ``args`` are passed whole, mismatched rows are refused, and small
    arrays go in one call."""
    monkeypatch.setattr(parallel, "PIECE", 2)
    x, out = np.arange(12.0).reshape(6, 2), np.zeros((6, 2))

    def axpy(x, y, out, a):
        out[...] = a * x + (0.0 if y is None else y)
        return len(x)

    assert parallel.map_rows(axpy, x, None, out, args=(3.0,)) == [1] * 6
    np.testing.assert_array_equal(out, 3.0 * x)
    with pytest.raises(ValueError, match="same first axis"):
        parallel.map_rows(axpy, x, np.zeros((5, 2)), out, args=(1.0,))
    monkeypatch.setattr(parallel, "PIECE", 1 << 17)
    assert parallel.map_rows(axpy, x, None, out, args=(1.0,)) == [6]


def test_blas_threads_are_restored(two_threads, monkeypatch):
    blas = parallel._state["blas"]
    if blas is None:
        pytest.skip("threadpoolctl found no BLAS it can control")
    monkeypatch.setattr(parallel, "PIECE", 1)
    before = [c.num_threads for c in blas.lib_controllers]
    inside = []
    parallel.map_rows(lambda r: inside.append([c.num_threads for c in blas.lib_controllers]), np.arange(2))
    assert all(n == 1 for row in inside for n in row), "BLAS was not held at one thread inside the region"
    assert [c.num_threads for c in blas.lib_controllers] == before


def test_bad_thread_counts(monkeypatch):
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="set_num_threads"):
            parallel.set_num_threads(bad)
    monkeypatch.setattr(parallel, "_state", {})
    monkeypatch.setenv("MINGLM_THREADS", "two")
    with pytest.raises(ValueError, match="MINGLM_THREADS"):
        parallel.num_threads()
    monkeypatch.setattr(parallel, "_state", {})
    monkeypatch.setenv("MINGLM_THREADS", "3")
    assert parallel.num_threads() == 3


def test_pieces_cover_the_axis_once(monkeypatch):
    monkeypatch.setattr(parallel, "PIECE", 10)
    assert parallel.pieces(15) == [slice(None)]  # under two pieces' worth: one piece
    for n, row in ((20, 1), (101, 1), (37, 3), (9, 50)):
        covered = np.zeros(n, dtype=int)
        for r in parallel.pieces(n, row):
            covered[r] += 1
        assert covered.tolist() == [1] * n, (n, row)


def _step(model, opt, rng):
    B, T = 2, 16
    tokens = rng.integers(0, model.config.vocab_size, (B, T))
    pos = np.tile(np.arange(T), (B, 1))
    logits = model(tokens, pos, np.zeros((B, T), dtype=np.int64), np.array([5, 9]))
    loss = F.cross_entropy(logits, rng.integers(0, model.config.vocab_size, (B, T)))
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def test_training_is_the_same_on_any_thread_count(monkeypatch):
    """Small pieces (so every pieced op splits) give the same losses and weights on 1 and 2 threads, bit for bit."""
    monkeypatch.setattr(parallel, "PIECE", 64)
    cfg = GLMConfig(vocab_size=40, n_layer=2, n_head=2, d_model=16, max_len=16, seq_len=16)
    before = parallel.num_threads()
    runs = []
    try:
        for n in (1, 2):
            parallel.set_num_threads(n)
            model = GLM(cfg, np.random.default_rng(0))
            opt = AdamW(model, lr=1e-2)
            rng = np.random.default_rng(1)
            losses = [_step(model, opt, rng) for _ in range(3)]
            runs.append((losses, {k: v.copy() for k, v in model.state_dict().items()}))
    finally:
        parallel.set_num_threads(before)
    (l1, w1), (l2, w2) = runs
    assert l1 == l2
    for k in w1:
        np.testing.assert_array_equal(w1[k], w2[k], err_msg=k)


def test_adamw_pieces_equal_one_piece(monkeypatch, two_threads):
    """AdamW's update is elementwise: cutting the flat buffer into pieces changes no bit."""
    results = []
    for piece in (1 << 30, 7):
        monkeypatch.setattr(parallel, "PIECE", piece)
        rng = np.random.default_rng(0)
        cfg = GLMConfig(vocab_size=30, n_layer=1, n_head=2, d_model=8, max_len=8, seq_len=8)
        model = GLM(cfg, rng)
        opt = AdamW(model, lr=1e-2)
        for _ in range(3):
            for p in model.parameters():
                p.grad = rng.standard_normal(p.shape).astype(np.float32)
            opt.step()
        results.append(opt.flat.copy())
    np.testing.assert_array_equal(results[0], results[1])


def test_large_attention_uses_pieces_and_matches(two_threads):
    """At a size where the real pieces apply (per batch element), the pieced attention equals the one-piece one."""
    rng = np.random.default_rng(0)
    q, k, v = (Tensor(rng.standard_normal((2, 2, 256, 16)).astype(np.float32), requires_grad=True) for _ in range(3))
    assert len(parallel.pieces(2, 2 * 256 * 256)) > 1
    sep = np.array([100, 0])
    out = F.scaled_dot_product_attention(q, k, v, sep, impl="plain")
    g = rng.standard_normal(out.shape).astype(np.float32)
    out.backward(g)
    grads = [t.grad.copy() for t in (q, k, v)]
    parallel.set_num_threads(1)
    for t in (q, k, v):
        t.grad = None
    # the pieces run their products with BLAS held at one thread; hold the one-piece pass there too, since some
    # BLAS kernels (OpenBLAS with OPENBLAS_CORETYPE=Haswell) sum a product differently on two threads
    with threadpool_limits(limits=1, user_api="blas"):
        ref = F.scaled_dot_product_attention(q, k, v, sep, impl="plain")
        ref.backward(g)
    np.testing.assert_array_equal(out.data, ref.data)
    for a, t in zip(grads, (q, k, v)):
        np.testing.assert_array_equal(a, t.grad)


def _run_python(code: str, env: dict) -> str:
    import os
    import subprocess
    import sys
    from pathlib import Path

    environ = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_THREAD_TIMEOUT", "MINGLM_TUNE")}
    environ.update(env)
    root = str(Path(__file__).resolve().parents[1])
    environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, environ.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.parametrize("code, env, expected", [
    ("import minglm", {}, "18 {'malloc': True, 'openblas_spin': 18}"),  # minglm first: OpenBLAS reads it as it loads
    ("import numpy; import minglm", {}, "18 {'malloc': True, 'openblas_spin': 18}"),  # NumPy first: the same
    ("import minglm", {"OPENBLAS_THREAD_TIMEOUT": "25"}, "25 {'malloc': True, 'openblas_spin': 25}"),  # user's kept
    ("import numpy; import minglm", {"MINGLM_TUNE": "0"}, "unset {}"),  # the one off switch
])
def test_process_tuning_whatever_the_import_order(code, env, expected):
    """``import minglm`` applies backend.tune_process whether or not NumPy (and so OpenBLAS) was loaded before it,
    as in a notebook; OpenBLAS itself reports the spin it now uses."""
    if parallel._state.get("blas") is None and parallel._blas_controller() is None:
        pytest.skip("no BLAS that threadpoolctl can see")
    out = _run_python(f"{code}; import os; from minglm import backend; "
                      "print(os.environ.get('OPENBLAS_THREAD_TIMEOUT', 'unset'), backend.tuning())", env)
    assert out == expected


def test_numpy_first_blas_threads_sleep_soon():
    """The effect itself, with NumPy imported first: after a matrix product, OpenBLAS's idle thread stops spinning
    within a fraction of a millisecond, so the process uses (almost) no CPU while it sleeps (0.1 s a product before)."""
    code = ("import numpy as np; import minglm, resource, time\n"
            "a = np.ones((512, 512), np.float32)\n"
            "used = []\n"
            "for _ in range(3):\n"
            "    a @ a; r0 = resource.getrusage(resource.RUSAGE_SELF); time.sleep(0.3)\n"
            "    r1 = resource.getrusage(resource.RUSAGE_SELF)\n"
            "    used.append(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)\n"
            "print(min(used))")
    assert float(_run_python(code, {"OPENBLAS_NUM_THREADS": "2"})) < 0.02


def test_bench_train_numpy_first_process_is_tuned():
    """``bench train``'s NumPy-first column trains in a process that imported NumPy before minglm, and that process
    got the same tuning as ``python -m minglm``."""
    from minglm.bench.train import numpy_first_block

    block = numpy_first_block("tiny", 2, 1)
    assert len(block["wall"]) == len(block["cpu"]) == 1
    assert block["tuning"] == {"malloc": True, "openblas_spin": 18} or parallel._blas_controller() is None
