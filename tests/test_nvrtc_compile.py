"""Checks of the CUDA source that need no GPU: it compiles under NVRTC for every architecture the check builds, and
ptxas reports no register spill (through NVRTC and through nvcc).

NVRTC comes from the ``nvidia-cuda-nvrtc`` wheel (skipped when it is not installed); the nvcc check needs ``nvcc``
on PATH. A deliberately broken source, and a build squeezed into too few registers, show that the checks can fail.
The CPU emulation of the kernel is tested in test_kernels_emulation.py, the real GPU in test_kernels_gpu.py.
"""

from __future__ import annotations

import shutil

import pytest

from minglm.kernels import nvrtc_check
from minglm.kernels.cuda import HEAD_DIMS

LIBNVRTC = nvrtc_check.find_libnvrtc()
needs_nvrtc = pytest.mark.skipif(LIBNVRTC is None, reason="the nvidia-cuda-nvrtc wheel is not installed")


@needs_nvrtc
def test_flash_attn_compiles_without_spills_for_every_arch_and_build(capsys):
    """sm_75, sm_80 and sm_90, every head size, and the small-tile build at D = 128: compiled, ptxas reported both
    kernels, no spill bytes, at most 128 registers (4 blocks of 128 threads per SM, __launch_bounds__)."""
    assert nvrtc_check.main([]) == 0
    table = capsys.readouterr().out
    rows = nvrtc_check.run_nvrtc_checks(LIBNVRTC)
    assert {(r["arch"], r["head_dim"], r["small_tiles"]) for r in rows} == {
        (arch, d, small) for arch in ("sm_75", "sm_80", "sm_90") for d, small in nvrtc_check.BUILDS
    }
    for r in rows:
        assert r["ok"] and r["spill_bytes"] == 0, (r["arch"], r["head_dim"], r["small_tiles"], r["log"])
        for kernel in nvrtc_check.KERNELS:
            assert r["kernels"][kernel]["registers"] <= 128, (r["arch"], r["head_dim"], kernel)
        tiles = "small" if r["small_tiles"] else "default"
        assert any(line.split()[:4] == [r["arch"], str(r["head_dim"]), tiles, "ok"] for line in table.splitlines())


@needs_nvrtc
def test_nvrtc_check_fails_on_a_spill():
    """Asked for 16 resident blocks per SM, each kernel gets 64K / (16 * 128) = 32 registers and must spill, and
    the check must say so. (--maxrregcount would not do: __launch_bounds__ takes precedence over it.)"""
    nvrtc = nvrtc_check.NVRTC(LIBNVRTC)
    source = nvrtc_check.SOURCE_PATH.read_text()
    assert "constexpr int MIN_BLOCKS = 4;" in source
    squeezed = source.replace("constexpr int MIN_BLOCKS = 4;", "constexpr int MIN_BLOCKS = 16;")
    ok, log, _ = nvrtc.compile(squeezed, "flash_attn.cu", nvrtc_check.nvrtc_options("sm_80", 64))
    kernels = nvrtc_check.parse_ptxas_report(log)
    assert ok and kernels["glm_attn_fwd"]["registers"] <= 32, log
    assert nvrtc_check.spill_bytes(kernels) > 0
    row = {"ok": ok, "kernels": kernels, "spill_bytes": nvrtc_check.spill_bytes(kernels)}
    assert not nvrtc_check.row_passed(row)


def test_ptxas_report_parser_reads_registers_and_spills():
    log = """ptxas info    : Compiling entry function 'glm_attn_fwd' for 'sm_80'
ptxas info    : Function properties for glm_attn_fwd
ptxas         .     16 bytes stack frame, 12 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 96 registers, used 1 barriers, 16 bytes cumulative stack size, 420 bytes cmem[0]"""
    assert nvrtc_check.parse_ptxas_report(log) == {
        "glm_attn_fwd": {"stack": 16, "spill_stores": 12, "spill_loads": 12, "registers": 96}
    }
    assert nvrtc_check.spill_bytes(nvrtc_check.parse_ptxas_report(log)) == 24


@needs_nvrtc
def test_nvrtc_check_reports_a_broken_source():
    nvrtc = nvrtc_check.NVRTC(LIBNVRTC)
    source = "extern \"C\" __global__ void f(float* x) { x[0] = INFINITY; }"  # INFINITY is a host-header macro
    ok, log, size = nvrtc.compile(source, "broken.cu", nvrtc_check.nvrtc_options("sm_90", 64, verbose=False))
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
