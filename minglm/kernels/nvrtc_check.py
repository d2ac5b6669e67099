"""Compile ``flash_attn.cu`` with NVRTC (the compiler CuPy uses) on a machine without a GPU.

nvcc accepting a kernel does not mean NVRTC will (NVRTC has no host headers, and no ``INFINITY``), and nothing runs
CUDA C on a CPU, so CI compiles the source through NVRTC itself: ``libnvrtc`` from the ``nvidia-cuda-nvrtc`` wheel,
called through ``ctypes``. Every head size is compiled for sm_80 (A100) and sm_90 (H100) with the options the
launcher uses, and the table shows the result, the cubin size and any compiler messages.

    python -m minglm.kernels.nvrtc_check              # the NVRTC table; exit status 1 if any compile fails
    python -m minglm.kernels.nvrtc_check --resources  # also nvcc's register / spill / shared-memory report

Left out: running the code (that needs a GPU: tests/test_kernels_gpu.py) and PTX-only targets.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from minglm.kernels.cuda import COMPILE_OPTIONS, HEAD_DIMS, SOURCE_PATH

ARCHS = ("sm_80", "sm_90")
NVRTC_DISTRIBUTION = "nvidia-cuda-nvrtc"


def find_libnvrtc() -> Path | None:
    """Path of libnvrtc.so from the installed ``nvidia-cuda-nvrtc`` wheel, or None when it is not installed."""
    try:
        dist = importlib.metadata.distribution(NVRTC_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        name = Path(str(f)).name
        if name.startswith("libnvrtc.so") or name.startswith("nvrtc64_"):  # Linux, or Windows DLL
            return Path(str(dist.locate_file(f))).resolve()
    return None


class NVRTC:
    """The handful of libnvrtc entry points a compile check needs."""

    def __init__(self, path: Path):
        self.lib = ctypes.CDLL(str(path))
        self.lib.nvrtcGetErrorString.restype = ctypes.c_char_p

    def _check(self, result: int, what: str) -> None:
        if result != 0:
            raise RuntimeError(f"{what} failed: {self.lib.nvrtcGetErrorString(result).decode()}")

    def version(self) -> str:
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
        return f"{major.value}.{minor.value}"

    def compile(self, source: str, name: str, options: list[str]) -> tuple[bool, str, int]:
        """Compile; return (ok, log, cubin size in bytes)."""
        prog = ctypes.c_void_p()
        self._check(
            self.lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None),
            "nvrtcCreateProgram",
        )
        try:
            opts = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
            result = self.lib.nvrtcCompileProgram(prog, len(options), opts)
            log_size = ctypes.c_size_t()
            self._check(self.lib.nvrtcGetProgramLogSize(prog, ctypes.byref(log_size)), "nvrtcGetProgramLogSize")
            log = ctypes.create_string_buffer(log_size.value)
            self._check(self.lib.nvrtcGetProgramLog(prog, log), "nvrtcGetProgramLog")
            cubin_size = ctypes.c_size_t(0)
            if result == 0:
                self._check(self.lib.nvrtcGetCUBINSize(prog, ctypes.byref(cubin_size)), "nvrtcGetCUBINSize")
            return result == 0, log.value.decode(errors="replace").strip(), cubin_size.value
        finally:
            self.lib.nvrtcDestroyProgram(ctypes.byref(prog))


def nvrtc_options(arch: str, head_dim: int) -> list[str]:
    """What CuPy's RawModule passes: the launcher's options, -DHEAD_DIM, -ftz=true and a real architecture."""
    return [*COMPILE_OPTIONS, f"-DHEAD_DIM={head_dim}", "-ftz=true", f"-arch={arch}"]


def run_nvrtc_checks(lib_path: Path) -> list[dict]:
    """Compile every (arch, head size); one result dict per compile."""
    nvrtc = NVRTC(lib_path)
    source = SOURCE_PATH.read_text()
    rows = []
    for arch in ARCHS:
        for head_dim in HEAD_DIMS:
            t0 = time.perf_counter()
            ok, log, size = nvrtc.compile(source, SOURCE_PATH.name, nvrtc_options(arch, head_dim))
            rows.append(
                {"arch": arch, "head_dim": head_dim, "ok": ok, "seconds": time.perf_counter() - t0,
                 "cubin_bytes": size, "log": log}
            )
    return rows


def nvcc_resource_report(arch: str = "sm_90") -> list[dict]:
    """``nvcc -cubin -Xptxas -v`` per head size: registers, spill bytes, stack per kernel (needs nvcc on PATH)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise RuntimeError("nvcc_resource_report: nvcc is not on PATH")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for head_dim in HEAD_DIMS:
            cmd = [nvcc, "-cubin", f"-arch={arch}", "-Xptxas", "-v", *COMPILE_OPTIONS, f"-DHEAD_DIM={head_dim}",
                   "-o", str(Path(tmp) / "out.cubin"), str(SOURCE_PATH)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"nvcc failed for HEAD_DIM={head_dim}:\n{proc.stderr}")
            kernel = None
            for line in proc.stderr.splitlines():
                if m := re.search(r"Compiling entry function '(\w+)'", line):
                    kernel = {"head_dim": head_dim, "kernel": m.group(1)}
                    rows.append(kernel)
                elif kernel is not None and (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                                                            r"(\d+) bytes spill loads", line)):
                    kernel.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
                elif kernel is not None and (m := re.search(r"Used (\d+) registers", line)):
                    kernel["registers"] = int(m.group(1))
                    if s := re.search(r"(\d+) bytes smem", line):
                        kernel["static_smem"] = int(s.group(1))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minglm.kernels.nvrtc_check", description=__doc__.split("\n")[0])
    parser.add_argument("--resources", action="store_true", help="also print nvcc's -Xptxas -v resource report")
    args = parser.parse_args(argv)

    lib = find_libnvrtc()
    if lib is None:
        print(f"{NVRTC_DISTRIBUTION} is not installed: pip install {NVRTC_DISTRIBUTION}", file=sys.stderr)
        return 2
    print(f"NVRTC {NVRTC(lib).version()} from {lib}")
    print(f"source {SOURCE_PATH}")
    print(f"{'arch':6} {'head_dim':>8} {'result':>7} {'seconds':>8} {'cubin bytes':>12}  messages")
    rows = run_nvrtc_checks(lib)
    for r in rows:
        first = r["log"].splitlines()[0] if r["log"] else ""
        print(f"{r['arch']:6} {r['head_dim']:>8} {'ok' if r['ok'] else 'FAIL':>7} {r['seconds']:>8.2f} "
              f"{r['cubin_bytes']:>12}  {first}")
    for r in rows:
        if not r["ok"]:
            print(f"\n--- {r['arch']} HEAD_DIM={r['head_dim']} log ---\n{r['log']}", file=sys.stderr)

    if args.resources:
        print(f"\nnvcc -cubin -arch=sm_90 -Xptxas -v {' '.join(COMPILE_OPTIONS)} -DHEAD_DIM=..")
        print(f"{'head_dim':>8} {'kernel':14} {'registers':>9} {'spill st':>8} {'spill ld':>8} {'stack':>6}")
        for r in nvcc_resource_report():
            print(f"{r['head_dim']:>8} {r['kernel']:14} {r.get('registers', 0):>9} {r.get('spill_stores', 0):>8} "
                  f"{r.get('spill_loads', 0):>8} {r.get('stack', 0):>6}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
