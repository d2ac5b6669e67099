"""The fused attention kernel's acceptance check: one command, about 5 minutes on one GPU, one table.

    python -m minglm.kernels.gpu_check                 # every part this machine can run; exit 1 on any failure
    python -m minglm.kernels.gpu_check --require-gpu   # on the GPU machine: no GPU found is a failure too
    python -m minglm.kernels.gpu_check --emulate       # the kernel checks on the CPU emulation (small sizes)
    python -m minglm.kernels.gpu_check --only lengths float16 --repeats 5

The kernel has never run on a GPU, and the first GPU may be lent for a few minutes only, so everything that
should be looked at then is prepared here, cheapest and most telling first. Parts (``CHECKS``):

  CPU side (run anywhere; skipped only when their tool is missing)
    facts        Python, NumPy, CuPy, CUDA runtime and driver, the device, its shared-memory limit, which kernel
                 build runs at each head size on it
    nvrtc        NVRTC compile of every architecture and build, registers and spills (nvrtc_check)
    emulator     the .cu source run thread by thread on the CPU, under every schedule, against float64
    bounds       AddressSanitizer + UBSan on exact-size buffers at tile-edge shapes (emulate.bounds_check)
  GPU side (skipped without a GPU; --emulate runs the first five on the CPU emulation instead)
    lengths      T = 0, 1 and tile edges, lengths on tile edges and 0, NaN planted in the padding, D 32/64/128
    noncontig    q, k, v, dO as the permuted views the model passes: same bits as contiguous copies
    float16      float16 inputs and gradients against float64
    determinism  20 runs: o, lse, dk, dv bitwise identical (dq may differ by atomicAdd order, within 1e-6)
    stress       many blocks (B 8, H 16, T 1024, and D 128) against the float64 twin on CuPy
    sanitizer    compute-sanitizer memcheck, racecheck and synccheck on a small case (when the tool is there)
    train        200 steps of python -m minglm train on the CPU and on the GPU: losses agree within 1e-4
    pytest       python -m pytest -m gpu: the kernel tests, the CPU/GPU training test, every op on CuPy
    bench        python -m minglm bench attention --device gpu (fused vs plain CuPy vs torch SDPA / FlexAttention)

Each part prints a row as it finishes (result, seconds, detail); the bench table follows the summary. The exit
status is 1 when a part fails, when a part was left out for the time budget (--budget, 300 s), or with
--require-gpu when no GPU was used; a part whose tool is missing (compute-sanitizer, g++, the NVRTC wheel) is
skipped and says so. The parts that run commands have their own time limits (sanitizer 90 s per tool, train 120 s
per device, pytest 150 s, bench 120 s). None of these times has been measured on a GPU yet: ``--only`` reruns
whatever the budget cut. The kernel checks are plain functions that take the ``cupy`` module:
tests/test_kernels_gpu.py calls them on a GPU, tests/test_kernels_gpu_check.py on the emulation.

Left out: multi-GPU, and timing targets (the bench prints numbers; nothing here fails on speed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from minglm.kernels import cuda, emulate, nvrtc_check, twin
from minglm.kernels.cuda import HEAD_DIMS
from minglm.kernels.reference import reference_attention

REPO_ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-5  # float32 kernel against float64, relative to max(1, max |reference|)
FLOAT16_TOL = 4e-3  # float16 outputs: rounding of the result (the sums are float32)
TRAIN_RTOL = 1e-4


class Skip(Exception):  # noqa: N818 - a reason, not an error
    """Raised by a check that cannot run here; the message says why."""


@dataclass
class Context:
    """What the checks share: the cupy module (or FakeCupy), whether that is the emulation, sizes, the clock."""

    cp: object = None
    emulated: bool = False
    repeats: int = 20
    budget: float = 300.0
    start: float = field(default_factory=time.perf_counter)
    bench_output: str = ""

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)

    def need_gpu(self) -> None:
        if self.cp is None:
            raise Skip("no GPU (CuPy missing or no usable device)")


# ---------------------------------------------------------------- helpers


def _rel_err(got, ref) -> float:
    """max |got - ref| relative to max(1, max |ref|), on the host in float64."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    if got.size == 0:
        return 0.0
    return float(np.abs(got - ref).max() / max(1.0, float(np.abs(ref).max())))


def _host(cp, a) -> np.ndarray:
    return np.asarray(cp.asnumpy(a))


def _kernel(cp, q, k, v, do, sep, lengths=None):
    """The launcher's forward then backward on device arrays: host copies of (o, lse, dq, dk, dv)."""
    o, lse = cuda.flash_attention_forward_cuda(q, k, v, sep, lengths=lengths)
    grads = cuda.flash_attention_backward_cuda(q, k, v, o, lse, do, sep, lengths=lengths)
    return tuple(_host(cp, a) for a in (o, lse, *grads))


def _reference(q, k, v, do, sep, lengths=None):
    """float64 dense reference on the host: (o, lse, dq, dk, dv)."""
    o, lse, backward = reference_attention(*(np.asarray(a, np.float64) for a in (q, k, v)), sep, lengths=lengths)
    return (o, lse, *backward(np.asarray(do, np.float64)))


NAMES = ("o", "lse", "dq", "dk", "dv")


def _compare(got, ref, tol, what: str) -> float:
    worst = 0.0
    for name, g, r in zip(NAMES, got, ref):
        assert np.isfinite(g).all(), f"{what}: {name} has {int((~np.isfinite(g)).sum())} entries not finite"
        err = _rel_err(g, r)
        assert err <= tol, f"{what}: {name} max error {err:.3g} > {tol:g}"
        worst = max(worst, err)
    return worst


# ---------------------------------------------------------------- the kernel checks (cp: cupy, or emulate.FakeCupy)


def check_lengths(cp, small: bool = False) -> str:
    """T = 0, 1 and on/next to every tile edge; per sample: causal full length, bidirectional full length, padded
    to a key-tile edge, length 0, and padded inside a tile; NaN in every padded row of q, k, v, dO. Real rows
    must match float64, padded rows of every output must be exactly 0."""
    Ts = (0, 1, 33, 65) if small else (0, 1, 31, 32, 33, 63, 64, 65, 96, 127, 128, 129, 257)
    rng = np.random.default_rng(1)
    worst, cases = 0.0, 0
    for D in HEAD_DIMS:
        for T in Ts:
            B, H = 5, 1 if small else 2
            edge, inside = (T // 32) * 32, (2 * T) // 3
            sep = np.array([0, T, min(T // 2, edge), 0, inside // 2])
            lengths = np.array([T, T, edge, 0, inside])
            q, k, v, do = (rng.standard_normal((B, H, T, D)).astype(np.float32) for _ in range(4))
            ref = _reference(q, k, v, do, sep, lengths)
            pad = (np.arange(T)[None, :] >= lengths[:, None])[:, None, :].repeat(H, 1)  # (B, H, T)
            for a in (q, k, v, do):
                a[pad] = np.nan
            got = _kernel(cp, *(cp.asarray(a) for a in (q, k, v, do)), sep, lengths)
            what = f"D {D} T {T} lengths {lengths.tolist()}"
            worst = max(worst, _compare(got, ref, TOL, what))
            for name, g in zip(NAMES, got):
                assert (g[pad] == 0).all(), f"{what}: padded rows of {name} are not 0"
            cases += 1
    return f"{cases} cases (T {min(Ts)}..{max(Ts)}, NaN in padding): max error {worst:.1e}"


def check_noncontiguous(cp, small: bool = False) -> str:
    """q, k, v, dO as the model passes them: heads split out of (B, T, 3·H·D) and permuted to (B, H, T, D), so
    neither contiguous nor with unit stride on T. o, lse, dk, dv must equal a run on contiguous copies bit for
    bit (dq within atomicAdd reordering), and match float64."""
    B, T, H = (2, 70, 2) if small else (3, 300, 4)
    rng = np.random.default_rng(2)
    worst = 0.0
    for D in HEAD_DIMS:
        x = cp.asarray(rng.standard_normal((B, T, 4 * H * D)).astype(np.float32))
        q, k, v, do = (x[..., i * H * D:(i + 1) * H * D].reshape(B, T, H, D).transpose(0, 2, 1, 3) for i in range(4))
        assert not q.flags.c_contiguous, "the views should not be contiguous"
        sep, lengths = rng.integers(0, T + 1, size=B), None
        views = _kernel(cp, q, k, v, do, sep, lengths)
        copies = _kernel(cp, *(cp.ascontiguousarray(a) for a in (q, k, v, do)), sep, lengths)
        for name, a, b in zip(NAMES, views, copies):
            if name == "dq":
                assert _rel_err(a, b) <= 1e-6, f"D {D}: dq from views differs from copies by {_rel_err(a, b):.3g}"
            else:
                assert np.array_equal(a, b), f"D {D}: {name} from views is not bitwise equal to contiguous copies"
        worst = max(worst, _compare(views, _reference(*(_host(cp, a) for a in (q, k, v, do)), sep), TOL, f"D {D}"))
    return f"permuted views, D 32/64/128: bitwise equal to copies, max error {worst:.1e}"


def check_float16(cp, small: bool = False) -> str:
    """float16 q, k, v, dO: outputs and gradients come back float16 (lse float32), within float16 rounding of
    the float64 result computed from the same float16 values."""
    B, H, T = (2, 1, 40) if small else (2, 4, 200)
    rng = np.random.default_rng(3)
    worst = 0.0
    for D in HEAD_DIMS:
        q, k, v, do = (rng.standard_normal((B, H, T, D)).astype(np.float16) for _ in range(4))
        sep, lengths = np.array([T // 3, 0]), np.array([T, T - 7])
        qd, kd, vd, dod = (cp.asarray(a) for a in (q, k, v, do))
        o, lse = cuda.flash_attention_forward_cuda(qd, kd, vd, sep, lengths=lengths)
        grads = cuda.flash_attention_backward_cuda(qd, kd, vd, o, lse, dod, sep, lengths=lengths)
        dtypes = [np.dtype(a.dtype).name for a in (o, lse, *grads)]
        assert dtypes == ["float16", "float32", "float16", "float16", "float16"], f"D {D}: dtypes {dtypes}"
        got = tuple(_host(cp, a) for a in (o, lse, *grads))
        worst = max(worst, _compare(got, _reference(q, k, v, do, sep, lengths), FLOAT16_TOL, f"float16 D {D}"))
    return f"D 32/64/128: float16 o, dq, dk, dv, float32 lse; max error {worst:.1e} (limit {FLOAT16_TOL:g})"


def check_determinism(cp, repeats: int = 20, small: bool = False) -> str:
    """The same call ``repeats`` times: o, lse, dk, dv bitwise identical every time (each is written by exactly
    one thread); dq is summed with atomicAdd, whose order may change, so it must only agree to 1e-6."""
    B, H, T = (1, 2, 70) if small else (4, 4, 384)
    rng = np.random.default_rng(4)
    dq_spread = 0.0
    for D in HEAD_DIMS:
        arrays = [cp.asarray(rng.standard_normal((B, H, T, D)).astype(np.float32)) for _ in range(4)]
        sep, lengths = rng.integers(0, T + 1, size=B), None
        first = _kernel(cp, *arrays, sep, lengths)
        for r in range(1, repeats):
            again = _kernel(cp, *arrays, sep, lengths)
            for name, a, b in zip(NAMES, first, again):
                if name == "dq":
                    dq_spread = max(dq_spread, _rel_err(b, a))
                    assert dq_spread <= 1e-6, f"D {D} run {r}: dq moved by {dq_spread:.3g}"
                else:
                    assert np.array_equal(a, b), f"D {D} run {r}: {name} is not bitwise identical to run 0"
    return f"{repeats} runs x D 32/64/128: o, lse, dk, dv bitwise identical; dq spread {dq_spread:.1e}"


def check_stress(cp, small: bool = False) -> str:
    """Many blocks at once: every (sample, head, tile) block writes its own rows, and dq collects atomicAdds from
    up to T/32 key-tile blocks per row. Against the float64 twin run on the same device."""
    shapes = [(2, 2, 130, 32)] if small else [(8, 16, 1024, 64), (4, 8, 1024, 128), (16, 8, 512, 32)]
    rng = np.random.default_rng(5)
    parts = []
    for B, H, T, D in shapes:
        q, k, v, do = (cp.asarray(rng.standard_normal((B, H, T, D)).astype(np.float32)) for _ in range(4))
        sep = rng.integers(0, T + 1, size=B)
        lengths = rng.integers(sep, T + 1)
        got = _kernel(cp, q, k, v, do, sep, lengths)
        q64, k64, v64, do64 = (a.astype(np.float64) for a in (q, k, v, do))  # the twin is xp-agnostic
        o, lse = twin.flash_attention_forward(q64, k64, v64, sep, lengths=lengths)
        ref = tuple(_host(cp, a) for a in (o, lse, *twin.flash_attention_backward(q64, k64, v64, o, lse, do64, sep,
                                                                                   lengths=lengths)))
        err = _compare(got, ref, TOL, f"B {B} H {H} T {T} D {D}")
        fwd = cuda.kernel_plan(D).fwd
        blocks = f"{B * H * -(-T // fwd.block)} fwd blocks" if fwd is not None else "twin"
        parts.append(f"{B}x{H}x{T}x{D} ({blocks}) {err:.1e}")
    return "max error vs float64 twin: " + ", ".join(parts)


def small_case(cp) -> None:
    """The case compute-sanitizer runs: each head size, forward and backward, two samples with padding."""
    rng = np.random.default_rng(6)
    for D in HEAD_DIMS:
        q, k, v, do = (cp.asarray(rng.standard_normal((2, 2, 70, D)).astype(np.float32)) for _ in range(4))
        _kernel(cp, q, k, v, do, np.array([10, 70]), np.array([45, 70]))
    cp.cuda.Device().synchronize()


# ---------------------------------------------------------------- the parts of the table


def part_facts(ctx: Context) -> str:
    facts = [f"Python {platform.python_version()}", f"NumPy {np.__version__}"]
    if ctx.emulated:
        facts.append("kernel checks on the CPU emulation (--emulate), not on a GPU")
    try:
        import cupy  # noqa: PLC0415 - the facts are about this installation
    except ImportError:
        return "; ".join([*facts, "CuPy not installed"])
    facts.append(f"CuPy {cupy.__version__}")
    if ctx.cp is None or ctx.emulated:
        try:
            cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:  # noqa: BLE001 - report whatever the driver says
            facts.append(f"no usable GPU ({type(exc).__name__}: {str(exc).splitlines()[0]})")
        return "; ".join(facts)
    rt = cupy.cuda.runtime
    dev = cupy.cuda.Device()
    props = rt.getDeviceProperties(dev.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    facts += [f"CUDA runtime {rt.runtimeGetVersion()}, driver {rt.driverGetVersion()}",
              f"device {dev.id} of {rt.getDeviceCount()}: {name}, sm_{dev.compute_capability}, "
              f"{props['multiProcessorCount']} SMs, {props['totalGlobalMem'] / 2**30:.0f} GiB",
              f"shared memory per block (opt-in) {cuda.device_smem_limit(cupy, dev.id):,} B"]
    with contextlib.suppress(Exception):
        facts.append(f"NVRTC {'.'.join(map(str, cupy.cuda.nvrtc.getVersion()))}")
    for D in HEAD_DIMS:
        plan = cuda.kernel_plan(D)
        builds = [f"{n} " + ("twin" if k is None else f"{'small' if k.small_tiles else 'default'} {k.smem_bytes:,} B")
                  for n, k in (("fwd", plan.fwd), ("bwd", plan.bwd))]
        facts.append(f"D {D}: {', '.join(builds)}")
    with contextlib.suppress(ImportError):
        import torch  # noqa: PLC0415 - only to say which version the bench compares against

        facts.append(f"torch {torch.__version__}")
    return "; ".join(facts)


def part_nvrtc(ctx: Context) -> str:
    lib = nvrtc_check.find_libnvrtc()
    if lib is None:
        raise Skip(f"the {nvrtc_check.NVRTC_DISTRIBUTION} wheel is not installed")
    rows = nvrtc_check.run_nvrtc_checks(lib)
    bad = [f"{r['arch']} D {r['head_dim']}{' small' if r['small_tiles'] else ''}" for r in rows
           if not nvrtc_check.row_passed(r)]
    assert not bad, f"failed compile or spill: {', '.join(bad)} (python -m minglm.kernels.nvrtc_check)"
    regs = max(r["kernels"][k]["registers"] for r in rows for k in nvrtc_check.KERNELS)
    return (f"NVRTC {nvrtc_check.NVRTC(lib).version()}: {len(rows)} builds ({', '.join(nvrtc_check.ARCHS)}), "
            f"0 B spilled, at most {regs} registers")


def part_emulator(ctx: Context) -> str:
    if emulate.compiler() is None:
        raise Skip("g++ is not on PATH")
    rng = np.random.default_rng(7)
    worst = 0.0
    for D, T in ((32, 77), (64, 70), (128, 40)):
        q, k, v, do = (rng.standard_normal((2, 1, T, D)).astype(np.float32) for _ in range(4))
        sep, lengths = np.array([5, T]), np.array([T - 9, T])
        ref = _reference(q, k, v, do, sep, lengths)
        for schedule in emulate.SCHEDULES:
            o, lse = emulate.forward(q, k, v, sep, lengths=lengths, schedule=schedule)
            got = (o, lse, *emulate.backward(q, k, v, o, lse, do, sep, lengths=lengths, schedule=schedule))
            worst = max(worst, _compare(got, ref, TOL, f"emulated D {D} ({schedule})"))
    return f"D 32/64/128 x {len(emulate.SCHEDULES)} schedules ({', '.join(emulate.SCHEDULES)}): max error {worst:.1e}"


def part_bounds(ctx: Context) -> str:
    if emulate.compiler() is None or not emulate.sanitizers_supported():
        raise Skip("g++ cannot build with -fsanitize=address,undefined here")
    builds = [(d, False) for d in HEAD_DIMS] + [(128, True)]
    for D, small in builds:
        ok, output = emulate.bounds_check(D, small_tiles=small)
        assert ok, f"D {D}{' small tiles' if small else ''}:\n" + output[-3000:]
    return f"{len(builds)} builds x {len(emulate.tile_edge_cases(32))} tile-edge cases: no report"


def _kernel_part(fn: Callable[..., str], takes_repeats: bool = False) -> Callable[[Context], str]:
    """A kernel check as a part: on the GPU at full size, on the emulation small (and with at most 3 repeats)."""

    def part(ctx: Context) -> str:
        ctx.need_gpu()
        options = {"small": True} if ctx.emulated else {}
        if takes_repeats:
            options["repeats"] = min(ctx.repeats, 3) if ctx.emulated else ctx.repeats
        return fn(ctx.cp, **options)

    return part


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MINGLM_BACKEND", None)  # each command picks its device from --device
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TQDM_DISABLE", "1")
    return env


def _run(cmd: list[str], ctx: Context, limit: float, what: str) -> subprocess.CompletedProcess:
    timeout = max(10.0, min(limit, ctx.left()))
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT,
                              env=_subprocess_env(), check=False)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{what}: did not finish within {timeout:.0f} s") from None


def _real_gpu(ctx: Context) -> None:
    ctx.need_gpu()
    if ctx.emulated:
        raise Skip("needs a real GPU (--emulate)")


def part_sanitizer(ctx: Context) -> str:
    _real_gpu(ctx)
    exe = shutil.which("compute-sanitizer")
    if exe is None and Path("/usr/local/cuda/bin/compute-sanitizer").exists():  # a toolkit not on PATH
        exe = "/usr/local/cuda/bin/compute-sanitizer"
    if exe is None:
        raise Skip("compute-sanitizer not found (it comes with the CUDA toolkit)")
    results = []
    for tool in ("memcheck", "racecheck", "synccheck"):
        cmd = [exe, "--tool", tool, "--error-exitcode", "97", sys.executable, "-m", "minglm.kernels.gpu_check",
               "--small-case"]
        proc = _run(cmd, ctx, 90, f"compute-sanitizer --tool {tool}")
        summary = [line for line in proc.stdout.splitlines() if "SUMMARY" in line]
        assert proc.returncode == 0, f"{tool}: exit {proc.returncode}\n" + (proc.stdout + proc.stderr)[-3000:]
        results.append(f"{tool}: {summary[-1].split('SUMMARY:')[-1].strip() if summary else 'clean'}")
    return "; ".join(results)


def part_pytest(ctx: Context) -> str:
    _real_gpu(ctx)
    tests = REPO_ROOT / "tests"
    if not tests.is_dir():
        raise Skip(f"no tests folder at {tests}")
    # compute-sanitizer is its own part of this script: leave its test out here. A test module that cannot be
    # imported (a missing dev dependency) fails the part, but does not stop the other GPU tests from running.
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-k", "not compute_sanitizer", "-q", "-p", "no:cacheprovider",
           "--continue-on-collection-errors", str(tests)]
    proc = _run(cmd, ctx, 150, "pytest -m gpu")
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    assert proc.returncode == 0, f"exit {proc.returncode}: {last}\n" + proc.stdout[-3000:] + proc.stderr[-1000:]
    return last


def _write_corpus(folder: Path) -> None:
    """A small made-up corpus (no download, no package data): the same words in random lines."""
    rng = np.random.default_rng(0)
    words = ["thou", "art", "fair", "and", "kind", "my", "lord", "the", "sea", "night", "doth", "love"]
    folder.mkdir()
    for i in range(3):
        text = "\n".join(" ".join(rng.choice(words, 9)).capitalize() + "." for _ in range(150))
        (folder / f"doc{i}.txt").write_text(text, encoding="utf-8")


def _losses(run_dir: Path) -> np.ndarray:
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return np.array([r["loss"] for r in records if "loss" in r])


def part_train(ctx: Context, steps: int = 200) -> str:
    _real_gpu(ctx)
    with tempfile.TemporaryDirectory(prefix="minglm_gpu_check_") as tmp:
        corpus = Path(tmp) / "corpus"
        _write_corpus(corpus)
        common = ["--corpus", str(corpus), "--out", tmp, "--steps", str(steps), "--seed", "7",
                  "--set", "model.n_layer=2", "--set", "model.d_model=64", "--set", "model.n_head=2",
                  "--set", "model.dropout=0.1", "--set", "seq_len=64", "--set", "batch_size=4",
                  "--set", "eval_batches=1", "--set", "fill_lines=1", "--set", "plots=false",
                  "--eval-every", str(steps), "--ckpt-every", str(steps), "--quiet"]
        for device in ("cpu", "gpu"):
            cmd = [sys.executable, "-m", "minglm", "train", *common, "--name", device, "--device", device]
            proc = _run(cmd, ctx, 120, f"train --device {device}")
            assert proc.returncode == 0, f"train --device {device}: exit {proc.returncode}\n" + proc.stderr[-3000:]
        cpu, gpu = _losses(Path(tmp) / "cpu"), _losses(Path(tmp) / "gpu")
    assert len(cpu) == len(gpu) == steps, f"expected {steps} losses, got {len(cpu)} (cpu) and {len(gpu)} (gpu)"
    rel = np.abs(gpu - cpu) / np.maximum(np.abs(cpu), 1e-12)
    worst = int(rel.argmax())
    assert rel[worst] <= TRAIN_RTOL, (f"step {worst + 1}: gpu loss {gpu[worst]:.6f} vs cpu {cpu[worst]:.6f} "
                                      f"(relative {rel[worst]:.2e} > {TRAIN_RTOL:g})")
    return f"{steps} steps: losses agree, max relative diff {rel.max():.1e} (loss {cpu[0]:.3f} -> {cpu[-1]:.3f})"


def part_bench(ctx: Context) -> str:
    _real_gpu(ctx)
    cmd = [sys.executable, "-m", "minglm", "bench", "attention", "--device", "gpu", "--seq", "1024", "4096"]
    proc = _run(cmd, ctx, 120, "bench attention --device gpu")
    ctx.bench_output = proc.stdout
    assert proc.returncode == 0, f"exit {proc.returncode}\n" + (proc.stdout + proc.stderr)[-3000:]
    kernel = [line for line in proc.stdout.splitlines() if "cuda kernel" in line]
    return f"{len(kernel)} fused-kernel rows (table below)"


CHECKS: dict[str, tuple[str, Callable[[Context], str]]] = {
    "facts": ("cpu", part_facts),
    "nvrtc": ("cpu", part_nvrtc),
    "emulator": ("cpu", part_emulator),
    "bounds": ("cpu", part_bounds),
    "lengths": ("gpu", _kernel_part(check_lengths)),
    "noncontig": ("gpu", _kernel_part(check_noncontiguous)),
    "float16": ("gpu", _kernel_part(check_float16)),
    "determinism": ("gpu", _kernel_part(check_determinism, takes_repeats=True)),
    "stress": ("gpu", _kernel_part(check_stress)),
    "sanitizer": ("gpu", part_sanitizer),
    "train": ("gpu", part_train),
    "pytest": ("gpu", part_pytest),
    "bench": ("gpu", part_bench),
}


# ---------------------------------------------------------------- the runner


@dataclass
class Row:
    name: str
    side: str
    status: str  # "ok", "FAIL" or "skipped"
    seconds: float
    detail: str


def run_checks(names: list[str], ctx: Context, on_row: Callable[[Row], None] = lambda row: None) -> list[Row]:
    rows = []
    for name in names:
        side, fn = CHECKS[name]
        t0 = time.perf_counter()
        if ctx.left() <= 0:
            status, detail = "skipped", f"time budget of {ctx.budget:.0f} s used up"
        else:
            try:
                status, detail = "ok", fn(ctx)
            except Skip as reason:
                status, detail = "skipped", str(reason)
            except Exception as exc:  # noqa: BLE001 - every failure becomes a row; the run goes on
                status = "FAIL"
                detail = str(exc) if isinstance(exc, AssertionError) else f"{type(exc).__name__}: {exc}"
        rows.append(Row(name, side, status, time.perf_counter() - t0, detail.strip()))
        on_row(rows[-1])
    return rows


def _print_row(row: Row) -> None:
    lines = row.detail.splitlines() or [""]
    print(f"{row.name:12} {row.side:4} {row.status:8} {row.seconds:7.1f}  {lines[0]}", flush=True)
    for line in lines[1:40]:
        print(f"{'':35}{line}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minglm.kernels.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--require-gpu", action="store_true", help="fail when no GPU is used (on the GPU machine)")
    parser.add_argument("--emulate", action="store_true", help="run the kernel checks on the CPU emulation")
    parser.add_argument("--only", nargs="+", choices=tuple(CHECKS), help="run only these parts")
    parser.add_argument("--skip", nargs="+", choices=tuple(CHECKS), default=[], help="leave these parts out")
    parser.add_argument("--repeats", type=int, default=20, help="runs in the determinism check (default 20)")
    parser.add_argument("--budget", type=float, default=300.0, help="seconds; later parts are skipped (default 300)")
    parser.add_argument("--small-case", action="store_true", help=argparse.SUPPRESS)  # what compute-sanitizer runs
    args = parser.parse_args(argv)

    from minglm.backend import cupy_module, gpu_available  # noqa: PLC0415

    if args.small_case:
        small_case(cupy_module())
        return 0
    names = [n for n in (args.only or CHECKS) if n not in args.skip]
    with contextlib.ExitStack() as stack:
        if args.emulate:
            if emulate.compiler() is None:
                print("--emulate needs g++ on PATH", file=sys.stderr)
                return 2
            ctx = Context(cp=stack.enter_context(emulate.fake_cupy_installed(emulate.FakeCupy())), emulated=True)
        else:
            ctx = Context(cp=cupy_module() if gpu_available() else None)
        ctx.repeats, ctx.budget = args.repeats, args.budget
        where = "CPU emulation" if ctx.emulated else "GPU" if ctx.cp is not None else "no GPU"
        print(f"minglm fused-kernel acceptance check ({where}, budget {ctx.budget:.0f} s)")
        print(f"{'part':12} {'side':4} {'result':8} {'seconds':>7}  detail", flush=True)
        rows = run_checks(names, ctx, _print_row)

    failed = [r for r in rows if r.status == "FAIL"]
    skipped = [r for r in rows if r.status == "skipped"]
    out_of_time = [r for r in skipped if r.detail.startswith("time budget")]
    gpu_skipped = [r for r in skipped if r.side == "gpu"]
    print(f"\n{len(rows) - len(failed) - len(skipped)} ok, {len(failed)} failed, {len(skipped)} skipped, "
          f"{time.perf_counter() - ctx.start:.0f} s")
    if gpu_skipped:
        print(f"GPU parts NOT run: {', '.join(f'{r.name} ({r.detail})' for r in gpu_skipped)}")
    if ctx.bench_output:
        print("\n" + ctx.bench_output.rstrip())
    problems = [f"failed: {', '.join(r.name for r in failed)}"] if failed else []
    if out_of_time:
        problems.append(f"not run within the time budget: {', '.join(r.name for r in out_of_time)}")
    if args.require_gpu and (ctx.cp is None or ctx.emulated):
        problems.append("--require-gpu, but no GPU was used")
    if problems:
        print("NOT ACCEPTED: " + "; ".join(problems))
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
