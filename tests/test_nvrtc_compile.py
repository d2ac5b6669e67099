"""Checks of the CUDA source that need no GPU: it compiles under NVRTC, it does not spill, and it computes the right
thing when its threads are emulated on the CPU.

NVRTC comes from the ``nvidia-cuda-nvrtc`` wheel (skipped when it is not installed); the resource check needs
``nvcc`` on PATH and the emulation ``g++`` (each skipped otherwise). A deliberately broken source shows that the
NVRTC check can fail. The real-GPU tests are in test_kernels_gpu.py.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minglm.kernels import emulate, nvrtc_check, reference_attention
from minglm.kernels.cuda import HEAD_DIMS

LIBNVRTC = nvrtc_check.find_libnvrtc()
needs_nvrtc = pytest.mark.skipif(LIBNVRTC is None, reason="the nvidia-cuda-nvrtc wheel is not installed")


@needs_nvrtc
def test_flash_attn_compiles_under_nvrtc_for_every_arch_and_head_size(capsys):
    assert nvrtc_check.main([]) == 0
    table = capsys.readouterr().out
    for arch in nvrtc_check.ARCHS:
        for head_dim in HEAD_DIMS:
            assert any(line.split()[:3] == [arch, str(head_dim), "ok"] for line in table.splitlines()), table


@needs_nvrtc
def test_nvrtc_check_reports_a_broken_source():
    nvrtc = nvrtc_check.NVRTC(LIBNVRTC)
    source = "extern \"C\" __global__ void f(float* x) { x[0] = INFINITY; }"  # INFINITY is a host-header macro
    ok, log, size = nvrtc.compile(source, "broken.cu", nvrtc_check.nvrtc_options("sm_90", 64))
    assert not ok and size == 0
    assert "INFINITY" in log


@needs_nvrtc
def test_head_dim_is_required():
    nvrtc = nvrtc_check.NVRTC(LIBNVRTC)
    source = nvrtc_check.SOURCE_PATH.read_text()
    ok, log, _ = nvrtc.compile(source, "flash_attn.cu", ["-std=c++17", "-arch=sm_90"])
    assert not ok and "HEAD_DIM" in log


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_kernels_do_not_spill_registers():
    rows = nvrtc_check.nvcc_resource_report("sm_90")
    kernels = [r for r in rows if r["kernel"].startswith("glm_attn_")]
    assert {(r["head_dim"], r["kernel"]) for r in kernels} == {
        (d, name) for d in HEAD_DIMS for name in ("glm_attn_fwd", "glm_attn_bwd")
    }
    for r in kernels:
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert r["registers"] <= 128, r  # at most 128 keeps 4 blocks of 128 threads resident per SM


needs_gxx = pytest.mark.skipif(emulate.compiler() is None, reason="g++ (C++20) is not on PATH")


@needs_gxx
@pytest.mark.parametrize(
    "D, T, sep, lengths",
    [
        (32, 77, [5, 77], None),  # T not a multiple of any tile; one sample fully bidirectional
        (64, 70, [0, 33], [45, 70]),  # causal sample with padding: whole padded query/key tiles are skipped
        (128, 40, [17, 40], [30, 40]),  # D = 128 uses the smaller forward tile and > 48 KiB shared memory
    ],
)
def test_kernel_source_runs_correctly_on_the_cpu_emulation(D, T, sep, lengths):
    """The unchanged flash_attn.cu, run thread by thread on the CPU, matches the float64 reference."""
    rng = np.random.default_rng(D + T)
    B, H = 2, 1
    q, k, v, do = (rng.standard_normal((B, H, T, D)).astype(np.float32) for _ in range(4))
    sep = np.array(sep)
    lengths = None if lengths is None else np.array(lengths)
    o, lse = emulate.forward(q, k, v, sep, lengths=lengths)
    grads = emulate.backward(q, k, v, o, lse, do, sep, lengths=lengths)
    o_ref, lse_ref, backward = reference_attention(*(a.astype(np.float64) for a in (q, k, v)), sep, lengths=lengths)
    for name, got, ref in zip(("o", "lse", "dq", "dk", "dv"), (o, lse, *grads), (o_ref, lse_ref, *backward(do))):
        assert np.isfinite(got).all(), f"{name}: the kernel left entries unwritten (NaN) or produced inf/NaN"
        np.testing.assert_allclose(got, ref, atol=1e-5, err_msg=name)


@needs_gxx
def test_launcher_constants_match_the_compiled_kernel():
    """cuda.py reads the tile sizes back from the module; they must agree with the sizes the header describes."""
    for D in HEAD_DIMS:
        c = emulate.kernel_constants(D)
        fwd_bq = 32 if D == 128 else 64
        assert c["fwd_block_q"] == fwd_bq and c["bwd_block_k"] == 32
        assert c["fwd_smem_floats"] == fwd_bq * D + 32 * (D + 1) + 32 * D + 4 * 32
        assert c["bwd_smem_floats"] == 2 * 32 * (D + 1) + 2 * 32 * D + 2 * 32 * 32 + 2 * 32


@needs_gxx
def test_cuda_launcher_drives_the_emulated_kernels(monkeypatch):
    """cuda.py itself (grid, argument order, shared-memory opt-in, delta, dq zeroing) against the reference, with a
    NumPy-backed stand-in for cupy whose RawModule runs the kernels through the CPU emulation."""
    from minglm.kernels import cuda

    fake = emulate.FakeCupy()
    monkeypatch.setattr(cuda, "cupy_module", lambda: fake)
    cuda._compiled.cache_clear()
    try:
        rng = np.random.default_rng(21)
        B, H, T, D = 2, 2, 45, 128  # D = 128: both kernels need the > 48 KiB shared-memory opt-in
        q, k, v, do = (rng.standard_normal((B, H, T, D)).astype(np.float32) for _ in range(4))
        sep, lengths = np.array([20, 0]), np.array([40, 45])
        o, lse = cuda.flash_attention_forward_cuda(q, k, v, sep, 0.2, lengths=lengths)
        grads = cuda.flash_attention_backward_cuda(q, k, v, o, lse, do, sep, 0.2, lengths=lengths)
        ref = reference_attention(*(a.astype(np.float64) for a in (q, k, v)), sep, 0.2, lengths=lengths)
        for name, got, want in zip(("o", "lse", "dq", "dk", "dv"), (o, lse, *grads), (ref[0], ref[1], *ref[2](do))):
            np.testing.assert_allclose(got, want, atol=1e-5, err_msg=name)
        launched = {name: (grid, block, smem) for name, grid, block, smem in fake.launches}
        assert launched["glm_attn_fwd"] == ((2, H, B), (128,), 4 * emulate.kernel_constants(D)["fwd_smem_floats"])
        assert launched["glm_attn_bwd"] == ((2, H, B), (128,), 4 * emulate.kernel_constants(D)["bwd_smem_floats"])
    finally:
        cuda._compiled.cache_clear()


@needs_gxx
@settings(max_examples=12, deadline=None)
@given(
    D=st.sampled_from(HEAD_DIMS),
    B=st.integers(1, 3),
    H=st.integers(1, 2),
    T=st.integers(1, 140),
    use_lengths=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_emulated_kernel_matches_reference_on_random_shapes(D, B, H, T, use_lengths, seed):
    rng = np.random.default_rng(seed)
    q, k, v, do = (rng.standard_normal((B, H, T, D)).astype(np.float32) for _ in range(4))
    sep = rng.integers(0, T + 1, size=B)
    lengths = rng.integers(sep, T + 1) if use_lengths else None
    o, lse = emulate.forward(q, k, v, sep, lengths=lengths)
    grads = emulate.backward(q, k, v, o, lse, do, sep, lengths=lengths)
    o_ref, lse_ref, backward = reference_attention(*(a.astype(np.float64) for a in (q, k, v)), sep, lengths=lengths)
    for name, got, ref in zip(("o", "lse", "dq", "dk", "dv"), (o, lse, *grads), (o_ref, lse_ref, *backward(do))):
        np.testing.assert_allclose(got, ref, atol=2e-5, err_msg=name)
