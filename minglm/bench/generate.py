"""Benchmark: decoding speed with a K/V cache against recomputing the whole sequence for every new token.

Setup (docs/performance.md, "Decoding is bound by per-call overhead"): the small config (4 layers, d 256, 8 heads)
with random weights, a 256-token context encoded once, then 200 greedy tokens generated for one blank. Three ways
are timed:

- ``fast cache``: ``GLM.infer`` with the ``KVCache``, each layer's array-level ``infer`` method (no Tensor objects);
- ``model cache``: ``GLM.forward(..., cache=KVCache)`` under ``no_grad``, through the Tensor engine;
- ``recompute``: a full forward over context + everything generated so far for each new token, no cache (O(T²)).

All three must produce the same tokens; the table says so. ``--profile`` times the fast path's step by the layer
method it spends its time in. Target: >= 1,000 tokens/s with the cache on 2 cores.

One decoding step is a chain of tiny matrix-vector products, so BLAS threads help little, and on a busy machine two
spinning OpenBLAS threads can make every product many times slower: compare ``OPENBLAS_NUM_THREADS=1`` (set it before
Python starts; the header line prints it).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from minglm.generate import make_decoder, recompute_logits
from minglm.model import GLM, MLP, Block, GLMConfig, SelfAttention
from minglm.nn import Embedding, LayerNorm, Linear
from minglm.tensor import no_grad


def _decode(dec, context: np.ndarray, n_new: int, sop: int, mask_pos: int) -> tuple[list[int], float, float]:
    """Greedy tokens, prefill seconds, decode seconds (argmax included: it is part of every real step)."""
    t0 = time.perf_counter()
    dec.prefill(context)
    prefill = time.perf_counter() - t0
    out, seconds = _decode_steps(dec, n_new, sop, mask_pos)
    return out, prefill, seconds


def _decode_steps(dec, n_new: int, sop: int, mask_pos: int) -> tuple[list[int], float]:
    """Greedy decoding of one blank after the prefill: the tokens and the seconds it took."""
    t0 = time.perf_counter()
    out, token = [], sop
    for c in range(n_new):
        logits = dec.step(token, mask_pos, c + 1)
        token = int(np.argmax(logits))
        out.append(token)
    return out, time.perf_counter() - t0


def _recompute(model, context: np.ndarray, n_new: int, sop: int, mask_pos: int) -> tuple[list[int], float]:
    n = len(context)
    tokens = list(context) + [sop]
    pos = list(range(n)) + [mask_pos]
    block = [0] * n + [1]
    out = []
    t0 = time.perf_counter()
    for c in range(n_new):
        logits = recompute_logits(model, tokens, pos, block, n)[-1]
        token = int(np.argmax(logits))
        out.append(token)
        tokens.append(token)
        pos.append(mask_pos)
        block.append(c + 2)
    return out, time.perf_counter() - t0


def _profile(model, capacity: int, context: np.ndarray, n_new: int, sop: int,
             mask_pos: int) -> list[tuple[str, float]]:
    """Time the fast path's step by part (us per token). Every ``infer`` method of the model's modules is wrapped
    with a clock on this model instance only, so the timed code is the model's own; a method's time excludes the
    methods it calls (a SelfAttention's time is its attention arithmetic, not its two projections)."""
    parts = {Embedding: "embedding", LayerNorm: "layernorm", Linear: "gemm", SelfAttention: "attention",
             MLP: "gelu", Block: "residual adds", GLM: "checks, rotary, head"}
    cats = dict.fromkeys(parts.values(), 0.0)
    clock = time.perf_counter
    inner = [0.0]  # time spent in wrapped calls below the current one

    def timed(fn, cat):
        def wrapper(*args, **kwargs):
            outer, inner[0] = inner[0], 0.0
            t = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                spent = clock() - t
                cats[cat] += spent - inner[0]
                inner[0] = outer + spent
        return wrapper

    wrapped = []
    for _, module in model.named_modules():
        cat = next((c for kind, c in parts.items() if isinstance(module, kind)), None)
        if cat is not None:
            module.infer = timed(module.infer, cat)  # an instance attribute shadows the method
            wrapped.append(module)
    try:
        dec = make_decoder(model, capacity, "fast")
        dec.prefill(context)
        for c in cats:
            cats[c] = 0.0
        _, total = _decode_steps(dec, n_new, sop, mask_pos)
    finally:
        for module in wrapped:
            del module.infer
    rows = list(cats.items())
    rows.append(("python / other", total - sum(cats.values())))
    rows.append(("total", total))
    return [(k, 1e6 * v / n_new) for k, v in rows]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m minglm bench generate",
                                 description="Cached vs recomputed decoding speed (small config, random weights).")
    ap.add_argument("--context", type=int, default=256, help="context length in tokens")
    ap.add_argument("--new", type=int, default=200, help="tokens to generate")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=128)
    ap.add_argument("--recompute-new", type=int, default=None,
                    help="tokens for the (slow) recompute run; default: the same as --new")
    ap.add_argument("--repeat", type=int, default=7,
                    help="take the best of this many cached runs (a neighbour on a shared machine slows a whole "
                         "0.2-s run by up to 1.6x; 3 runs were not always enough to see one clean run)")
    ap.add_argument("--profile", action="store_true", help="time the fast path's step by part")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    n_ctx, n_new = args.context, args.new
    max_len = max(n_ctx, n_new + 1)
    config = GLMConfig(vocab_size=args.vocab, n_layer=args.layers, n_head=args.heads, d_model=args.d_model,
                       max_len=max_len)
    rng = np.random.default_rng(args.seed)
    model = GLM(config, rng)
    model.eval()
    context = rng.integers(8, args.vocab, size=n_ctx).astype(np.int64)
    context[0], context[n_ctx // 2] = 1, 2  # [CLS] ... [MASK] ...
    mask_pos, sop = n_ctx // 2, 5
    capacity = n_ctx + n_new + 1

    results = {}
    for name, kind in (("fast cache", "fast"), ("model cache", "cached")):
        best = None
        for _ in range(args.repeat):
            out, t_pre, t_dec = _decode(make_decoder(model, capacity, kind), context, n_new, sop, mask_pos)
            if best is None or t_dec < best[2]:
                best = (out, t_pre, t_dec)
        results[name] = best
    n_rec = args.recompute_new or n_new
    with no_grad():
        out_rec, t_rec = _recompute(model, context, n_rec, sop, mask_pos)
    results["recompute"] = (out_rec, float("nan"), t_rec)

    ref = results["fast cache"][0]
    threads = os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS") or "default"
    print(f"decoding {n_new} tokens after a {n_ctx}-token context: {args.layers} layers, d {args.d_model}, "
          f"{args.heads} heads, vocab {args.vocab}, random weights, greedy; BLAS threads: {threads}")
    print()
    print("| method | prefill ms | decode ms | tokens/s | ms/token | same tokens |")
    print("|---|---|---|---|---|---|")
    for name, (out, t_pre, t_dec) in results.items():
        n = len(out)
        same = "yes" if out == ref[:n] else "NO"
        pre = "-" if np.isnan(t_pre) else f"{1000 * t_pre:.1f}"
        print(f"| {name} | {pre} | {1000 * t_dec:.1f} | {n / t_dec:,.0f} | {1000 * t_dec / n:.3f} | {same} |")
    speedup = (results["recompute"][2] / n_rec) / (results["fast cache"][2] / n_new)
    print(f"\ncache speed-up over recompute: {speedup:.0f}x per token")

    if args.profile:
        print("\nfast path (GLM.infer), one step by part (us per token):")
        print("| part | us/token |")
        print("|---|---|")
        for name, us in _profile(model, capacity, context, n_new, sop, mask_pos):
            print(f"| {name} | {us:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
