"""What minglm's autograd costs per op: forward + backward through minglm next to the same maths in plain NumPy.

`python -m minglm bench ops [--repeats 41] [--ops linear,attention] [--dtype float32] [--no-check]`

For each core op at the size it has in the small GLM (B·T = 2048 rows, C = 256, V = 256 and up; attention at B 8,
H 8, T 256, D 32 with GLM's ``sep`` mask) this times one forward + backward through minglm (build the graph, then
``backward`` with a fixed upstream gradient) and the same computation written by hand in NumPy: the straightforward,
efficient version (views for transposes, in-place softmax, ``einsum`` row dots), computing exactly the gradients
minglm computes. Each repeat runs both back to back, and the table reports medians, so a busy machine slows both
alike; the spread (max/min of the minglm times) is printed to show the noise. Target: ratio <= 1.3.
Before timing, every gradient of the hand version is checked against minglm's (``--no-check`` skips it).

Left out: the fused attention kernel (``python -m minglm bench attention``) and whole training steps
(``python -m minglm bench train``). Reference for the sizes and the NumPy techniques: docs/performance.md.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

import minglm.functional as F
from minglm import backend
from minglm.tensor import Tensor

GELU_C = math.sqrt(2.0 / math.pi)


@dataclass
class Case:
    """One benchmark row: a minglm step and a hand-written NumPy step that compute the same gradients."""

    name: str
    shape: str  # for the table
    flops: float  # forward + backward floating-point operations (matmul-heavy ops only, else 0)
    run_minglm: Callable[[], list]  # -> the gradients, in the same order as run_numpy's
    run_numpy: Callable[[], list]


def _leaves(*arrays) -> list[Tensor]:
    return [Tensor(a, requires_grad=True) for a in arrays]


def _minglm_step(build: Callable[[], Tensor], grad, leaves: list[Tensor]) -> Callable[[], list]:
    """Zero the leaves' grads, build the graph, run backward(grad); return the leaf gradients."""

    def step():
        for t in leaves:
            t.grad = None
        out = build()
        out.backward(grad)
        return [t.grad for t in leaves]

    return step


# --- the ops, each as (minglm, hand NumPy) ---------------------------------------------------------------------
def case_matmul(rng, dtype, N=2048, C=256) -> Case:
    a, b = rng.standard_normal((N, C)).astype(dtype), rng.standard_normal((C, C)).astype(dtype) * 0.05
    dy = rng.standard_normal((N, C)).astype(dtype)
    ta, tb = _leaves(a, b)

    def numpy_step():
        a @ b  # forward (the output is not needed for the backward)
        return [dy @ b.T, a.T @ dy]  # transposes are views: BLAS takes them as flags

    return Case("matmul", f"({N}, {C}) @ ({C}, {C})", 3 * 2.0 * N * C * C,
                _minglm_step(lambda: ta @ tb, dy, [ta, tb]), numpy_step)


def case_linear(rng, dtype, N=2048, C=256, out=1024) -> Case:
    x = rng.standard_normal((N, C)).astype(dtype)
    W, bias = (rng.standard_normal((out, C)) * 0.05).astype(dtype), np.zeros(out, dtype)
    dy = rng.standard_normal((N, out)).astype(dtype)
    tx, tW, tb = _leaves(x, W, bias)

    def numpy_step():
        y = x @ W.T
        y += bias
        return [dy @ W, dy.T @ x, dy.sum(axis=0)]

    return Case("linear", f"({N}, {C}) → {out}", 3 * 2.0 * N * C * out,
                _minglm_step(lambda: F.linear(tx, tW, tb), dy, [tx, tW, tb]), numpy_step)


def case_layer_norm(rng, dtype, N=2048, C=256, eps=1e-5) -> Case:
    x = rng.standard_normal((N, C)).astype(dtype)
    w, b = (1.0 + 0.1 * rng.standard_normal(C)).astype(dtype), np.zeros(C, dtype)
    dy = rng.standard_normal((N, C)).astype(dtype)
    tx, tw, tb = _leaves(x, w, b)

    def numpy_step():
        xc = x - x.mean(axis=-1, keepdims=True)  # (N, C)
        var = np.einsum("nc,nc->n", xc, xc)[:, None] * (1.0 / C)
        rstd = 1.0 / np.sqrt(var + eps)
        xhat = xc
        xhat *= rstd
        y = xhat * w
        y += b
        g = dy * w
        dot = np.einsum("nc,nc->n", g, xhat)[:, None] * (1.0 / C)
        dx = g - g.mean(axis=-1, keepdims=True)
        dx -= xhat * dot
        dx *= rstd
        return [dx, np.einsum("nc,nc->c", dy, xhat), dy.sum(axis=0)]

    return Case("layer_norm", f"({N}, {C})", 0.0,
                _minglm_step(lambda: F.layer_norm(tx, tw, tb, eps=eps), dy, [tx, tw, tb]), numpy_step)


def case_softmax(rng, dtype, rows=8 * 8 * 256, T=256) -> Case:
    x = rng.standard_normal((rows, T)).astype(dtype)
    dy = rng.standard_normal((rows, T)).astype(dtype)
    (tx,) = _leaves(x)

    def numpy_step():
        y = x - x.max(axis=-1, keepdims=True)
        np.exp(y, out=y)
        y *= 1.0 / y.sum(axis=-1, keepdims=True)
        dx = dy - np.einsum("nt,nt->n", dy, y)[:, None]
        dx *= y
        return [dx]

    return Case("softmax", f"({rows}, {T})", 0.0, _minglm_step(lambda: F.softmax(tx), dy, [tx]), numpy_step)


def case_cross_entropy(rng, dtype, N=2048, V=256) -> Case:
    z = rng.standard_normal((N, V)).astype(dtype)
    t = rng.integers(0, V, size=N)
    (tz,) = _leaves(z)
    rows = np.arange(N)
    one = np.ones((), dtype)

    def numpy_step():
        m = z.max(axis=-1, keepdims=True)
        e = z - m
        np.exp(e, out=e)
        s = e.sum(axis=-1)
        (np.log(s) + m[:, 0] - z[rows, t]).mean()  # the loss
        e *= (1.0 / s)[:, None]  # softmax, turned into the gradient in place
        e[rows, t] -= 1.0
        e *= 1.0 / N
        return [e]

    return Case(f"cross_entropy V={V}", f"({N}, {V})", 0.0,
                _minglm_step(lambda: F.cross_entropy(tz, t), one, [tz]), numpy_step)


def case_embedding(rng, dtype, B=8, T=256, V=256, C=256) -> Case:
    ids = rng.integers(0, V, size=(B, T))
    W = rng.standard_normal((V, C)).astype(dtype)
    dy = rng.standard_normal((B, T, C)).astype(dtype)
    (tW,) = _leaves(W)
    flat_ids = ids.reshape(-1)

    def numpy_step():
        W[ids]  # forward
        # backward: sum the rows of dy per id (sort, then one reduceat over equal runs)
        dW = np.zeros_like(W)
        order = np.argsort(flat_ids, kind="stable")
        sorted_ids = flat_ids[order]
        starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
        dW[sorted_ids[starts]] = np.add.reduceat(dy.reshape(-1, C)[order], starts, axis=0)
        return [dW]

    return Case(f"embedding V={V}", f"({B}, {T}) ids, ({V}, {C})", 0.0,
                _minglm_step(lambda: F.embedding(ids, tW), dy, [tW]), numpy_step)


def case_gelu(rng, dtype, N=2048, C=1024) -> Case:
    x = rng.standard_normal((N, C)).astype(dtype)
    dy = rng.standard_normal((N, C)).astype(dtype)
    (tx,) = _leaves(x)

    def numpy_step():
        x2 = x * x
        t = np.tanh(GELU_C * (x + 0.044715 * x2 * x))
        0.5 * x * (1.0 + t)  # forward
        # dgelu = 0.5(1 + t) + 0.5 x (1 - t²) c (1 + 3·0.044715 x²)
        du = GELU_C * (1.0 + 3 * 0.044715 * x2)
        d = 0.5 * x * (1.0 - t * t) * du
        d += 0.5 * (1.0 + t)
        d *= dy
        return [d]

    return Case("gelu (tanh)", f"({N}, {C})", 0.0, _minglm_step(lambda: F.gelu(tx), dy, [tx]), numpy_step)


def case_attention(rng, dtype, B=8, H=8, T=256, D=32) -> Case:
    q, k, v = (rng.standard_normal((B, H, T, D)).astype(dtype) for _ in range(3))
    sep = rng.integers(1, T, size=B)
    do = rng.standard_normal((B, H, T, D)).astype(dtype)
    tq, tk, tv = _leaves(q, k, v)
    scale = 1.0 / math.sqrt(D)
    neg = np.finfo(dtype).min

    def numpy_step():
        j = np.arange(T)
        allowed = (j < sep[:, None, None, None]) | (j <= j[:, None])  # (B, 1, T, T) GLM mask
        s = q @ k.swapaxes(-1, -2)  # (B, H, T, T)
        s *= scale
        np.copyto(s, neg, where=~allowed)
        s -= s.max(axis=-1, keepdims=True)
        np.exp(s, out=s)
        s *= 1.0 / s.sum(axis=-1, keepdims=True)
        p = s
        p @ v  # forward output (B, H, T, D)
        dv = p.swapaxes(-1, -2) @ do
        dp = do @ v.swapaxes(-1, -2)  # (B, H, T, T)
        dp -= np.einsum("bhij,bhij->bhi", dp, p)[..., None]
        dp *= p
        dp *= scale
        return [dp @ k, dp.swapaxes(-1, -2) @ q, dv]

    def build():
        return F.scaled_dot_product_attention(tq, tk, tv, sep=sep, impl="plain")

    return Case("attention (sep)", f"B{B} H{H} T{T} D{D}", 6 * 2.0 * B * H * T * T * D,
                _minglm_step(build, do, [tq, tk, tv]), numpy_step)


CASES = {
    "matmul": case_matmul,
    "linear": case_linear,
    "layer_norm": case_layer_norm,
    "softmax": case_softmax,
    "cross_entropy": lambda rng, dtype: case_cross_entropy(rng, dtype, V=256),
    "cross_entropy_4k": lambda rng, dtype: case_cross_entropy(rng, dtype, V=4096),
    "embedding": lambda rng, dtype: case_embedding(rng, dtype, V=256),
    "embedding_4k": lambda rng, dtype: case_embedding(rng, dtype, V=4096),
    "attention": case_attention,
    "gelu": case_gelu,
}


def check(case: Case, dtype) -> float:
    """Max relative difference between minglm's gradients and the hand version's (they must agree)."""
    worst = 0.0
    for a, b in zip(case.run_minglm(), case.run_numpy(), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape or a.dtype != np.dtype(dtype):
            raise AssertionError(f"bench {case.name}: minglm grad {a.shape}/{a.dtype} vs NumPy {b.shape}/{b.dtype}")
        worst = max(worst, float(np.abs(a - b).max() / (np.abs(b).max() + 1e-30)))
    tol = 1e-4 if np.dtype(dtype) == np.float32 else 1e-10
    if worst > tol:
        raise AssertionError(f"bench {case.name}: minglm and hand-written NumPy gradients differ by {worst:.2e}")
    return worst


def measure(case: Case, repeats: int, warmup: int = 2) -> dict:
    """Medians over ``repeats`` of minglm's and NumPy's step, alternating them, on two clocks.

    ``wall`` is what a user waits; ``cpu`` (process CPU time, all threads) is steadier on a shared machine, since
    time spent descheduled does not count. ``spread`` is max/min of minglm's wall times, a measure of the noise.
    """
    for _ in range(warmup):
        case.run_minglm()
        case.run_numpy()
    wall = {"minglm": [], "numpy": []}
    cpu = {"minglm": [], "numpy": []}
    for _ in range(repeats):
        for side, run in (("minglm", case.run_minglm), ("numpy", case.run_numpy)):
            w0, c0 = time.perf_counter(), time.process_time()
            run()
            wall[side].append(time.perf_counter() - w0)
            cpu[side].append(time.process_time() - c0)
    med = {f"{clock}_{side}": float(np.median(d[side])) for clock, d in (("wall", wall), ("cpu", cpu)) for side in d}
    med["spread"] = max(wall["minglm"]) / min(wall["minglm"])
    return med


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m minglm bench ops", description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=41,
                   help="timed repeats per op (the median is reported; 15 let the 2-ms ops swing by 1.3x on an idle "
                        "2-core machine, even a bare matmul against itself)")
    p.add_argument("--ops", default="all", help=f"comma-separated subset of: {', '.join(CASES)}")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", type=float, default=1.3, help="the ratio an op must stay under")
    p.add_argument("--no-check", action="store_true", help="skip comparing the gradients before timing")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    names = list(CASES) if args.ops == "all" else [n.strip() for n in args.ops.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        p.error(f"unknown op(s) {unknown}; choose from {', '.join(CASES)}")
    dtype = np.dtype(args.dtype)
    rng = np.random.default_rng(args.seed)
    malloc = f"process tuning {backend.tuning() or 'off (MINGLM_TUNE=0)'}"

    threads = os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS") or "default"
    print(f"minglm ops: forward + backward, {args.dtype}, median of {args.repeats} (minglm and NumPy alternate), "
          f"{malloc}, BLAS threads {threads}, {os.cpu_count()} cores, load average {_load()}")
    print()
    print("| op | shape | minglm ms | NumPy ms | ratio (wall) | ratio (CPU time) | minglm GFLOP/s | noise (max/min) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    missed, missed_cpu = [], []
    for name in names:
        case = CASES[name](rng, dtype)
        if not args.no_check:
            check(case, dtype)
        m = measure(case, args.repeats)
        ratio, ratio_cpu = m["wall_minglm"] / m["wall_numpy"], m["cpu_minglm"] / m["cpu_numpy"]
        gflops = f"{case.flops / m['wall_minglm'] / 1e9:.0f}" if case.flops else "–"
        flag = "" if ratio <= args.target else " ✗"
        print(f"| {case.name} | {case.shape} | {m['wall_minglm'] * 1e3:.2f} | {m['wall_numpy'] * 1e3:.2f} "
              f"| {ratio:.2f}{flag} | {ratio_cpu:.2f} | {gflops} | {m['spread']:.2f} |")
        if ratio > args.target:
            missed.append(case.name)
        if ratio_cpu > args.target:
            missed_cpu.append(case.name)
    print()
    for clock, names_missed in (("wall", missed), ("CPU time", missed_cpu)):
        verdict = "all met" if not names_missed else f"missed by {', '.join(names_missed)}"
        print(f"target ratio <= {args.target} ({clock}): {verdict}")
    print("The CPU-time ratio is the steadier one on a shared machine (time spent descheduled does not count). "
          "minglm's side includes copying each input's gradient into its .grad (the inputs are leaves here).")
    return 0


def _load() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:  # not available on every platform
        return "n/a"
