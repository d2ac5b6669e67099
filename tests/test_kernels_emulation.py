"""The unchanged CUDA source of the fused attention kernel, run thread by thread on the CPU (minglm.kernels.emulate).

Every emulation test runs under each scheduling mode (thread order, reverse thread order, warp-greedy random with
shuffled lanes), because a missing barrier only shows when some thread runs ahead. The barrier-deletion test proves
that the modes are strong enough: it deletes each ``__syncthreads``/``__syncwarp`` in a scratch copy of
flash_attn.cu and asserts that the emulation then fails. The bounds harness runs both kernels on exact-size
buffers under AddressSanitizer + UBSan at tile-edge shapes, when g++ supports the sanitizers. Everything here needs
``g++`` (C++20) and is skipped without it. The mask is docs/mask.md.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minglm.kernels import emulate, reference_attention
from minglm.kernels.cuda import HEAD_DIMS, SOURCE_PATH

pytestmark = pytest.mark.skipif(emulate.compiler() is None, reason="g++ (C++20) is not on PATH")
SCHEDULES = tuple(emulate.SCHEDULES)


def _inputs(rng, B, H, T, D):
    return tuple(rng.standard_normal((B, H, T, D)).astype(np.float32) for _ in range(4))  # q, k, v, do


def _run(q, k, v, do, sep, lengths=None, **options):
    """Forward then backward through the emulation: (o, lse, dq, dk, dv)."""
    o, lse = emulate.forward(q, k, v, sep, lengths=lengths, **options)
    return (o, lse, *emulate.backward(q, k, v, o, lse, do, sep, lengths=lengths, **options))


def _reference(q, k, v, do, sep, lengths=None):
    o, lse, backward = reference_attention(*(a.astype(np.float64) for a in (q, k, v)), sep, lengths=lengths)
    return (o, lse, *backward(do.astype(np.float64)))


def _assert_matches(got, ref, atol=1e-5, where=""):
    for name, g, r in zip(("o", "lse", "dq", "dk", "dv"), got, ref):
        assert np.isfinite(g).all(), f"{name}{where}: entries left unwritten (NaN) or not finite"
        np.testing.assert_allclose(g, r, atol=atol, err_msg=f"{name}{where}")


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize(
    "D, T, sep, lengths",
    [
        (32, 77, [5, 77], None),  # T not a multiple of any tile; one sample fully bidirectional
        (64, 70, [0, 33], [45, 70]),  # causal sample with padding: whole padded query/key tiles are skipped
        (128, 40, [17, 40], [30, 40]),  # D = 128 uses the smaller forward tile and > 48 KiB shared memory
    ],
)
def test_kernel_source_runs_correctly_on_the_cpu_emulation(D, T, sep, lengths, schedule):
    """The unchanged flash_attn.cu, run thread by thread on the CPU, matches the float64 reference."""
    rng = np.random.default_rng(D + T)
    q, k, v, do = _inputs(rng, 2, 1, T, D)
    sep, lengths = np.array(sep), None if lengths is None else np.array(lengths)
    got = _run(q, k, v, do, sep, lengths, schedule=schedule, seed=D)
    _assert_matches(got, _reference(q, k, v, do, sep, lengths), where=f" ({schedule})")


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_small_tile_build_runs_correctly(schedule):
    """-DSMALL_TILES=1 (what dispatch picks on a 48 KiB or 64 KiB GPU at D = 128): 16-row forward tiles and 8-row
    backward query tiles, over several tiles and with padding."""
    rng = np.random.default_rng(3)
    q, k, v, do = _inputs(rng, 2, 1, 50, 128)
    sep, lengths = np.array([20, 3]), np.array([41, 50])
    got = _run(q, k, v, do, sep, lengths, schedule=schedule, seed=1, small_tiles=True)
    _assert_matches(got, _reference(q, k, v, do, sep, lengths), where=f" ({schedule})")


def test_launcher_constants_match_the_compiled_kernel():
    """cuda.py reads the tile sizes back from the module; they must agree with the sizes the header describes."""
    for D in HEAD_DIMS:
        c = emulate.kernel_constants(D)
        fwd_bq = 32 if D == 128 else 64
        assert c["fwd_block_q"] == fwd_bq and c["bwd_block_k"] == 32 and c["bwd_block_q"] == 32
        assert c["fwd_smem_floats"] == fwd_bq * D + 32 * (D + 1) + 32 * D + 4 * 32
        assert c["bwd_smem_floats"] == 2 * 32 * (D + 1) + 2 * 32 * D + 2 * 32 * 32 + 2 * 32
    small = emulate.kernel_constants(128, small_tiles=True)
    assert (small["fwd_block_q"], small["bwd_block_q"]) == (16, 8)
    assert 4 * small["fwd_smem_floats"] == 41_600 and 4 * small["bwd_smem_floats"] == 43_328  # both under 48 KiB


@settings(max_examples=12, deadline=None)
@given(
    D=st.sampled_from(HEAD_DIMS),
    B=st.integers(1, 3),
    H=st.integers(1, 2),
    T=st.integers(1, 140),
    use_lengths=st.booleans(),
    schedule=st.sampled_from(SCHEDULES),
    seed=st.integers(0, 2**31 - 1),
)
def test_emulated_kernel_matches_reference_on_random_shapes(D, B, H, T, use_lengths, schedule, seed):
    rng = np.random.default_rng(seed)
    q, k, v, do = _inputs(rng, B, H, T, D)
    sep = rng.integers(0, T + 1, size=B)
    lengths = rng.integers(sep, T + 1) if use_lengths else None
    got = _run(q, k, v, do, sep, lengths, schedule=schedule, seed=seed)
    _assert_matches(got, _reference(q, k, v, do, sep, lengths), atol=2e-5, where=f" ({schedule})")


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_nan_in_padding_never_reaches_real_rows(schedule):
    """q, k, v, dO hold NaN beyond each sample's length (a caller's padding may hold anything): real rows still
    match the reference computed without the NaN, and padded rows of every output are exactly 0."""
    rng = np.random.default_rng(4)
    B, H, T, D = 3, 2, 70, 32
    q, k, v, do = _inputs(rng, B, H, T, D)
    sep, lengths = np.array([10, 0, 33]), np.array([40, 33, 70])
    ref = _reference(q, k, v, do, sep, lengths)
    pad = np.arange(T)[None, :] >= lengths[:, None]  # (B, T)
    for a in (q, k, v, do):
        a[pad[:, None, :, None].repeat(H, 1).repeat(D, 3)] = np.nan
    got = _run(q, k, v, do, sep, lengths, schedule=schedule, seed=2)
    _assert_matches(got, ref, where=f" ({schedule}, NaN in padding)")
    for name, g in zip(("o", "lse", "dq", "dk", "dv"), got):
        assert (g[pad[:, None, :].repeat(H, 1)] == 0).all(), f"{name}: padded rows are not 0"


@pytest.mark.parametrize("kernel", ["glm_attn_fwd", "glm_attn_bwd"])
def test_shared_memory_is_exactly_the_launch_size(kernel):
    """One float less dynamic shared memory than the kernel uses must fail: the emulator allocates exactly the
    launch's bytes, and a write past them is caught (guard words here; AddressSanitizer in the bounds harness)."""
    D, T = 32, 40
    rng = np.random.default_rng(5)
    q, k, v, do = _inputs(rng, 1, 1, T, D)
    sep, lens = np.array([7], np.int32), np.array([T], np.int32)
    c = emulate.kernel_constants(D)
    o, lse = emulate.forward(q, k, v, sep)
    lib = emulate._library(D)
    if kernel == "glm_attn_fwd":
        grid, smem = (-(-T // c["fwd_block_q"]), 1, 1), 4 * c["fwd_smem_floats"]
        args = (q, k, v, sep, lens, np.empty_like(q), np.empty(lse.shape, np.float32), 1, T, D**-0.5)
    else:
        grid, smem = (-(-T // c["bwd_block_k"]), 1, 1), 4 * c["bwd_smem_floats"]
        delta = np.einsum("bhtd,bhtd->bht", do, o)
        args = (q, k, v, do, lse, delta, sep, lens, np.zeros_like(q), np.empty_like(q), np.empty_like(q), 1, T,
                D**-0.5)
    emulate._launch(lib, kernel, grid, 128, smem, "thread-order", 0, args)  # the exact size works
    with pytest.raises(RuntimeError, match="wrote past the end"):
        emulate._launch(lib, kernel, grid, 128, smem - 4, "thread-order", 0, args)


def test_unknown_schedule_is_refused():
    q = np.zeros((1, 1, 4, 32), np.float32)
    with pytest.raises(ValueError, match="schedule must be one of"):
        emulate.forward(q, q, q, np.array([1]), schedule="random")


# ---------------------------------------------------------------- deleting each barrier must break the emulation

SOURCE = SOURCE_PATH.read_text()
# The one barrier no CPU schedule can catch: the emulated __shfl_xor_sync is itself a full warp barrier, and the
# next row's shuffles come before its Ps write. On a GPU a shuffle does not order shared memory, so the compiler
# or the hardware may let a lane's next write pass another lane's read; that needs a GPU (compute-sanitizer
# synccheck/racecheck, python -m minglm.kernels.gpu_check).
WARP_ORDERING_ONLY = "Ps is rewritten by the next row"


def _barriers(source: str) -> list[tuple[str, int, str]]:
    """(kernel, line number, line) of every __syncthreads()/__syncwarp() statement in the kernels' code."""
    found, kernel = [], None
    for number, line in enumerate(source.splitlines(), start=1):
        code = line.split("//")[0]
        if m := re.match(r"\s*(glm_attn_\w+)\(", code):
            kernel = m.group(1)
        if kernel and re.search(r"__sync(threads|warp)\(\)\s*;", code):
            found.append((kernel, number, line))
    return found


BARRIERS = _barriers(SOURCE)


def _scratch_without(folder: Path, number: int) -> Path:
    lines = SOURCE.splitlines()
    lines[number - 1] = re.sub(r"__sync(threads|warp)\(\)\s*;", "/* barrier deleted */;", lines[number - 1], count=1)
    path = folder / f"flash_attn_without_line_{number}.cu"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def scratch_builds(tmp_path_factory):
    """One scratch copy of flash_attn.cu per barrier, each with that barrier deleted, built in parallel."""
    folder = tmp_path_factory.mktemp("barriers")
    paths = {number: str(_scratch_without(folder, number)) for _, number, _ in BARRIERS}
    with ThreadPoolExecutor(max_workers=2) as pool:  # g++ runs outside the GIL
        list(pool.map(lambda p: emulate.kernel_constants(32, source=p), paths.values()))
    return paths


def test_the_kernels_have_the_barriers_this_file_expects():
    """Seven barriers: a new one must be added to the deletion test's reasoning, a removed one explained."""
    kinds = [(kernel, "__syncwarp" in line) for kernel, _, line in BARRIERS]
    assert kinds == [("glm_attn_fwd", False)] * 2 + [("glm_attn_fwd", True)] * 2 + [("glm_attn_bwd", False)] * 3
    assert sum(WARP_ORDERING_ONLY in line for _, _, line in BARRIERS) == 1


@pytest.mark.parametrize(
    "kernel, number, line",
    [
        pytest.param(*b, id=f"{b[0]}-line{b[1]}", marks=pytest.mark.xfail(
            strict=True, reason="a __syncwarp that only orders shared memory around warp shuffles: invisible to a "
                                "CPU emulation whose shuffle is a full warp barrier (needs a GPU)"))
        if WARP_ORDERING_ONLY in b[2] else pytest.param(*b, id=f"{b[0]}-line{b[1]}")
        for b in BARRIERS
    ],
)
def test_deleting_a_barrier_breaks_the_emulation(kernel, number, line, scratch_builds):
    """With one barrier deleted, at least one schedule must give wrong numbers (or stop with a barrier error).
    The unchanged source passes the same run under every schedule (the tests above)."""
    rng = np.random.default_rng(6)
    T, D = 70, 32  # two forward query tiles, three key tiles: every tile loop runs more than once
    q, k, v, do = _inputs(rng, 1, 1, T, D)
    sep = np.array([40])
    ref = _reference(q, k, v, do, sep)
    caught = []
    for schedule in SCHEDULES:
        try:
            got = _run(q, k, v, do, sep, schedule=schedule, seed=0, source=scratch_builds[number])
        except RuntimeError:
            caught.append(schedule)
            continue
        if any(not np.isfinite(g).all() or np.abs(g - r).max() > 1e-3 for g, r in zip(got, ref)):
            caught.append(schedule)
    assert caught, f"deleting `{line.strip()}` ({kernel}, flash_attn.cu:{number}) went unnoticed by every schedule"


# ---------------------------------------------------------------- AddressSanitizer + UBSan bounds harness

needs_sanitizers = pytest.mark.skipif(
    emulate.compiler() is None or not emulate.sanitizers_supported(),
    reason="g++ cannot build with -fsanitize=address,undefined here",
)
BOUNDS_BUILDS = [(d, False) for d in HEAD_DIMS] + [(128, True)]
BOUNDS_IDS = [f"D{d}{'-small' if small else ''}" for d, small in BOUNDS_BUILDS]


@pytest.fixture(scope="module")
def bounds_builds():
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(lambda build: emulate._bounds_executable(*build), BOUNDS_BUILDS))


@needs_sanitizers
@pytest.mark.parametrize("D, small_tiles", BOUNDS_BUILDS, ids=BOUNDS_IDS)
def test_bounds_harness_finds_no_bad_access(D, small_tiles, bounds_builds):
    """Exact-size buffers (global and shared), NaN in every padded row, tile-edge shapes (T = 0, one past a tile,
    lengths on tile edges and 0): no sanitizer report, finite outputs, padded rows exactly 0."""
    ok, output = emulate.bounds_check(D, small_tiles=small_tiles)
    assert ok, output[-4000:]
    assert output.count("ok D=") == len(emulate.tile_edge_cases(D, small_tiles))


@needs_sanitizers
def test_bounds_harness_reports_an_out_of_bounds_read(bounds_builds):
    """The harness can fail: a length past T (which the launcher refuses) makes the kernel read q beyond its end,
    and AddressSanitizer stops the run."""
    ok, output = emulate.bounds_check(32, cases=[(1, 1, 33, [0], [40])])
    assert not ok and "heap-buffer-overflow" in output, output[-2000:]
