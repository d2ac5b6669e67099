"""GLM-masked attention speed and memory: plain vs tiled (twin / CUDA kernel) vs PyTorch.

`python -m minglm bench attention [--device cpu|gpu] [--seq 512 1024 2048] [--quick]`

CPU rows: the plain NumPy path (dense mask, ``minglm.kernels.reference_attention``), the NumPy twin of the kernel
(``minglm.kernels.twin``), and PyTorch's ``scaled_dot_product_attention`` with a boolean mask when torch imports.
GPU rows: the fused CUDA kernel, plain CuPy (the same dense reference on CuPy arrays), torch SDPA with a boolean
mask, and torch FlexAttention with a block mask, each when available.

Conventions:
- Shapes B 8, H 8, D 64 by default; sep[b] uniform in [0, T] from a seeded generator; float32.
- FLOPs count the full matrices whatever an implementation skips: forward 4·B·H·T²·D (Q Kᵀ and P V), backward
  2.5× the forward (recompute S, dP, dV, dK, dQ), so forward + backward = 3.5 × 4·B·H·T²·D. TFLOP/s is that
  count over the time, comparable across implementations (skipped masked tiles show up as higher TFLOP/s).
- Times are the minimum over ``--reps`` runs after a warm-up, implementations interleaved rep by rep, so that
  other processes on a shared machine disturb them alike. ``cpu s`` is the process CPU time of the best run.
- Peak memory is what the call adds on top of its inputs: for NumPy the peak of the buffers it allocates
  (tracemalloc, which sees NumPy's allocations in every thread); for torch on the CPU the rise of the process's peak
  resident set (Linux ``/proc/self/clear_refs``); on the GPU the memory pool high-water mark. (The resident set
  misleads for NumPy here: ``tune_malloc`` keeps freed blocks in the process, so a call that reuses them shows 0.)

Left out: dropout, float16/bfloat16 timings, and multi-GPU.
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import time
import tracemalloc
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from minglm.backend import cupy_module
from minglm.kernels import reference_attention, twin

FWD = "fwd"
FWD_BWD = "fwd+bwd"


def flops(B: int, H: int, T: int, D: int, mode: str) -> float:
    """Full-matrix FLOP count (see the module docstring)."""
    fwd = 4.0 * B * H * T * T * D
    return fwd if mode == FWD else 3.5 * fwd


# ---------------------------------------------------------------- peak memory on the CPU


def _read_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's record of peak RSS (Linux >= 4.0); False when not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def numpy_peak_bytes(fn: Callable[[], object]) -> tuple[float, str]:
    """Run fn once; return (peak bytes of the NumPy buffers it allocated, "tracemalloc")."""
    gc.collect()
    tracemalloc.start()
    try:
        fn()
        return float(tracemalloc.get_traced_memory()[1]), "tracemalloc"
    finally:
        tracemalloc.stop()


def cpu_peak_bytes(fn: Callable[[], object]) -> tuple[float, str]:
    """Run fn once; return (extra peak bytes, method)."""
    gc.collect()
    if _reset_peak_rss() and _read_status_kb("VmHWM") is not None:
        before = _read_status_kb("VmRSS")
        fn()
        return 1024.0 * (_read_status_kb("VmHWM") - before), "rss"
    return numpy_peak_bytes(fn)


# ---------------------------------------------------------------- implementations


def _numpy_impls(q, k, v, do, sep) -> dict[str, dict[str, Callable[[], object]]]:
    def plain_fwd():
        return reference_attention(q, k, v, sep)[0]

    def plain_fwd_bwd():
        _, _, backward = reference_attention(q, k, v, sep)
        return backward(do)

    def twin_fwd():
        return twin.flash_attention_forward(q, k, v, sep)

    def twin_fwd_bwd():
        o, lse = twin.flash_attention_forward(q, k, v, sep)
        return twin.flash_attention_backward(q, k, v, o, lse, do, sep)

    return {"numpy plain": {FWD: plain_fwd, FWD_BWD: plain_fwd_bwd},
            "numpy twin": {FWD: twin_fwd, FWD_BWD: twin_fwd_bwd}}


def _torch_impls(q, k, v, do, sep, device: str, flex: bool) -> dict[str, dict[str, Callable[[], object]]]:
    """torch SDPA with a boolean mask (and FlexAttention on a GPU); empty when torch is missing."""
    try:
        import torch  # noqa: PLC0415 - optional comparison only
        import torch.nn.functional as tF  # noqa: N812, PLC0415
    except ImportError:
        return {}
    if device == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    dev = "cuda" if device == "gpu" else "cpu"
    tq, tk, tv, tdo = (torch.as_tensor(np.asarray(_host(a)), device=dev) for a in (q, k, v, do))
    tsep = torch.as_tensor(np.asarray(_host(sep)), device=dev)
    T = tq.shape[2]
    idx = torch.arange(T, device=dev)
    key, query = idx[None, None, None, :], idx[None, None, :, None]
    mask = (key < tsep[:, None, None, None]) | (key <= query)  # (B, 1, T, T), True = may attend

    def sdpa(backward: bool):
        def run():
            a, b, c = (t.detach().requires_grad_(backward) for t in (tq, tk, tv))
            o = tF.scaled_dot_product_attention(a, b, c, attn_mask=mask)
            if backward:
                o.backward(tdo)
            return o

        return run

    impls = {"torch sdpa bool mask": {FWD: _no_grad(torch, sdpa(False)), FWD_BWD: sdpa(True)}}
    if flex and device == "gpu":
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: PLC0415

            def glm_mask_mod(b, h, q_idx, kv_idx):
                return (kv_idx < tsep[b]) | (kv_idx <= q_idx)

            block_mask = create_block_mask(glm_mask_mod, tq.shape[0], None, T, T, device=dev)
            flex_compiled = torch.compile(flex_attention)

            def flex_run(backward: bool):
                def run():
                    a, b, c = (t.detach().requires_grad_(backward) for t in (tq, tk, tv))
                    o = flex_compiled(a, b, c, block_mask=block_mask)
                    if backward:
                        o.backward(tdo)
                    return o

                return run

            impls["torch flex block mask"] = {FWD: _no_grad(torch, flex_run(False)), FWD_BWD: flex_run(True)}
        except Exception as exc:  # noqa: BLE001 - FlexAttention is optional and version dependent
            print(f"(FlexAttention unavailable: {type(exc).__name__}: {exc})")
    return impls


def _no_grad(torch, fn):
    def run():
        with torch.no_grad():
            return fn()

    return run


def _host(a):
    return a.get() if hasattr(a, "get") else a


def _cupy_impls(cp, q, k, v, do, sep) -> dict[str, dict[str, Callable[[], object]]]:
    from minglm.kernels import cuda  # noqa: PLC0415 - imports cupy lazily

    def kernel_fwd():
        return cuda.flash_attention_forward_cuda(q, k, v, sep)

    def kernel_fwd_bwd():
        o, lse = cuda.flash_attention_forward_cuda(q, k, v, sep)
        return cuda.flash_attention_backward_cuda(q, k, v, o, lse, do, sep)

    def plain_fwd():
        return reference_attention(q, k, v, sep)[0]

    def plain_fwd_bwd():
        _, _, backward = reference_attention(q, k, v, sep)
        return backward(do)

    return {"cuda kernel": {FWD: kernel_fwd, FWD_BWD: kernel_fwd_bwd},
            "cupy plain": {FWD: plain_fwd, FWD_BWD: plain_fwd_bwd}}


# ---------------------------------------------------------------- timing


def _time_cpu(fn) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def _time_gpu(fn, sync) -> tuple[float, float]:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    dt = time.perf_counter() - t0
    return dt, dt


def _gpu_sync_and_peak(device: str):
    """(synchronize, peak-bytes measurer) for the GPU: CuPy's pool, plus torch's allocator when present."""
    cp = cupy_module()  # only backend.py and minglm/kernels/ import cupy

    def sync():
        cp.cuda.Device().synchronize()
        try:
            import torch  # noqa: PLC0415

            if torch.cuda.is_available():
                torch.cuda.synchronize()
        except ImportError:
            pass

    def peak(fn):
        pool = cp.get_default_memory_pool()
        sync()
        pool.free_all_blocks()
        held = pool.total_bytes()
        torch_peak = 0
        try:
            import torch  # noqa: PLC0415

            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
                torch_base = torch.cuda.memory_allocated()
        except ImportError:
            torch = None
        fn()
        sync()
        if torch is not None and torch.cuda.is_available():
            torch_peak = torch.cuda.max_memory_allocated() - torch_base
        return float(pool.total_bytes() - held + torch_peak), "pool"

    return sync, peak


def run(device: str, B: int, H: int, D: int, seqs: list[int], reps: int, seed: int, impl_filter: list[str] | None,
        flex: bool, modes: tuple[str, ...] = (FWD, FWD_BWD)) -> Iterator[dict]:
    """Yield one result row per (T, mode, implementation), as soon as it is measured."""
    rng = np.random.default_rng(seed)
    for T in seqs:
        q, k, v, do = (rng.standard_normal((B, H, T, D), dtype=np.float32) for _ in range(4))
        sep = rng.integers(0, T + 1, size=B)
        if device == "gpu":
            cp = cupy_module()
            qd, kd, vd, dod = (cp.asarray(a) for a in (q, k, v, do))
            impls = _cupy_impls(cp, qd, kd, vd, dod, sep)
            sync, peak = _gpu_sync_and_peak(device)
            timer = functools.partial(_time_gpu, sync=sync)
        else:
            impls = _numpy_impls(q, k, v, do, sep)
            peak, timer = cpu_peak_bytes, _time_cpu
        impls.update(_torch_impls(q, k, v, do, sep, device, flex))
        if impl_filter:
            impls = {name: f for name, f in impls.items() if any(s in name for s in impl_filter)}
        for mode in modes:
            best: dict[str, tuple[float, float]] = {}
            for fns in impls.values():  # warm-up (and compile), then the peak-memory run
                fns[mode]()
            mem = {name: (numpy_peak_bytes if name.startswith("numpy") else peak)(fns[mode])
                   for name, fns in impls.items()}
            for _ in range(reps):  # interleaved, so that load from elsewhere hits every implementation alike
                for name, fns in impls.items():
                    wall, cpu = timer(fns[mode])
                    if name not in best or wall < best[name][0]:
                        best[name] = (wall, cpu)
            for name in impls:
                wall, cpu = best[name]
                yield {"T": T, "mode": mode, "impl": name, "ms": 1e3 * wall, "cpu_s": cpu,
                       "tflops": flops(B, H, T, D, mode) / wall / 1e12, "peak_mb": mem[name][0] / 2**20,
                       "mem_method": mem[name][1]}


def print_table(rows: Iterable[dict], header: str) -> list[dict]:
    """Print rows as they arrive, each with its time relative to the first implementation of its (T, mode)."""
    print(header)
    print(f"{'T':>6} {'mode':8} {'implementation':24} {'ms':>10} {'cpu s':>7} {'TFLOP/s':>8} {'peak MB':>9}  vs first",
          flush=True)
    first: dict[tuple[int, str], float] = {}
    done = []
    for r in rows:
        key = (r["T"], r["mode"])
        first.setdefault(key, r["ms"])
        print(f"{r['T']:>6} {r['mode']:8} {r['impl']:24} {r['ms']:>10.1f} {r['cpu_s']:>7.2f} {r['tflops']:>8.3f} "
              f"{r['peak_mb']:>9.1f}  {r['ms'] / first[key]:.2f}x", flush=True)
        done.append(r)
    return done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m minglm bench attention", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--seq", type=int, nargs="+", default=None,
                   help="sequence lengths (default 512 1024 2048 on cpu, 512 1024 2048 4096 on gpu)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--impl", nargs="+", default=None, help="only implementations whose name contains one of these")
    p.add_argument("--mode", choices=(FWD, FWD_BWD, "both"), default="both")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention (it compiles for a while)")
    p.add_argument("--quick", action="store_true", help="tiny run: B 2, H 2, T 128 256, 1 rep")
    args = p.parse_args(argv)

    if args.quick:
        args.batch, args.heads, args.reps = 2, 2, 1
        args.seq = args.seq or [128, 256]
    seqs = args.seq or ([512, 1024, 2048] if args.device == "cpu" else [512, 1024, 2048, 4096])
    if args.device == "gpu":
        from minglm.kernels.cuda import cuda_available  # noqa: PLC0415

        if not cuda_available():
            print("bench attention: --device gpu needs CuPy and a CUDA GPU, and none is usable here")
            return 1
    threads = os.environ.get("OMP_NUM_THREADS") or os.environ.get("OPENBLAS_NUM_THREADS") or "default"
    header = (f"GLM attention, {args.device}: B {args.batch}, H {args.heads}, D {args.head_dim}, float32, "
              f"sep ~ U[0, T], best of {args.reps}; BLAS threads {threads}; FLOPs = full matrices, "
              f"fwd 4BHT²D, fwd+bwd 3.5x that")
    modes = (FWD, FWD_BWD) if args.mode == "both" else (args.mode,)
    rows = run(args.device, args.batch, args.heads, args.head_dim, seqs, args.reps, args.seed, args.impl,
               flex=not args.no_flex, modes=modes)
    print_table(rows, header)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
