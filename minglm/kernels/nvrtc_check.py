"""Compile ``flash_attn.cu`` with NVRTC (the compiler CuPy uses) on a machine without a GPU, and check its resources.

nvcc accepting a kernel does not mean NVRTC will (NVRTC has no host headers, and no ``INFINITY``), and nothing runs
CUDA C on a CPU, so CI compiles the source through NVRTC itself: ``libnvrtc`` from the ``nvidia-cuda-nvrtc`` wheel,
called through ``ctypes``. Every head size is compiled for sm_75 (T4), sm_80 (A100) and sm_90 (H100) with the
options the launcher uses, plus the small-tile build (``-DSMALL_TILES=1``) at head size 128, the only size where
a real GPU needs it. ``--ptxas-options=-v`` (NVRTC's ``-Xptxas -v``) makes ptxas write each kernel's registers,
stack and spill bytes into the program log; the table shows them, and any spill is a failure: a spilling kernel
moves its per-thread state through local memory on every tile, which costs more than anything the tiles save.

    python -m minglm.kernels.nvrtc_check              # the NVRTC table; exit status 1 on a failed compile or a spill
    python -m minglm.kernels.nvrtc_check --resources  # also nvcc's register / spill / shared-memory report

Left out: running the code (that needs a GPU: tests/test_kernels_gpu.py) and PTX-only targets.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from minglm.kernels.cuda import COMPILE_OPTIONS, HEAD_DIMS, SOURCE_PATH

ARCHS = ("sm_75", "sm_80", "sm_90")
BUILDS = tuple((d, False) for d in HEAD_DIMS) + ((128, True),)  # (head size, small tiles) pairs to compile
KERNELS = ("glm_attn_fwd", "glm_attn_bwd")
PTXAS_VERBOSE = "--ptxas-options=-v"
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


def nvrtc_options(arch: str, head_dim: int, small_tiles: bool = False, verbose: bool = True) -> list[str]:
    """What CuPy's RawModule passes (the launcher's options, -DHEAD_DIM, -ftz=true, a real architecture), plus the
    small-tile define and ptxas's resource report."""
    return [*COMPILE_OPTIONS, f"-DHEAD_DIM={head_dim}", *(["-DSMALL_TILES=1"] if small_tiles else []), "-ftz=true",
            f"-arch={arch}", *([PTXAS_VERBOSE] if verbose else [])]


def parse_ptxas_report(text: str) -> dict[str, dict[str, int]]:
    """Registers, stack and spill bytes per kernel from ptxas's ``-v`` output (NVRTC's log or nvcc's stderr)."""
    kernels: dict[str, dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)'", line):
            current = kernels.setdefault(m.group(1), {})
        elif current is not None and (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                                                     r"(\d+) bytes spill loads", line)):
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif current is not None and (m := re.search(r"Used (\d+) registers", line)):
            current["registers"] = int(m.group(1))
            if s := re.search(r"(\d+) bytes smem", line):
                current["static_smem"] = int(s.group(1))
    return kernels


def spill_bytes(kernels: dict[str, dict[str, int]]) -> int:
    """Spill stores plus spill loads over the attention kernels (0 for a clean build)."""
    return sum(kernels.get(k, {}).get("spill_stores", 0) + kernels.get(k, {}).get("spill_loads", 0) for k in KERNELS)


@functools.cache
def compile_report(lib_path: str, arch: str, head_dim: int, small_tiles: bool = False) -> dict:
    """Compile one build through NVRTC (once per process) and return its row: ok, seconds, cubin bytes, log, and
    ptxas's resources per kernel."""
    t0 = time.perf_counter()
    ok, log, size = NVRTC(Path(lib_path)).compile(SOURCE_PATH.read_text(), SOURCE_PATH.name,
                                                  nvrtc_options(arch, head_dim, small_tiles))
    kernels = parse_ptxas_report(log)
    return {"arch": arch, "head_dim": head_dim, "small_tiles": small_tiles, "ok": ok,
            "seconds": time.perf_counter() - t0, "cubin_bytes": size, "log": log, "kernels": kernels,
            "spill_bytes": spill_bytes(kernels)}


def run_nvrtc_checks(lib_path: Path) -> list[dict]:
    """Compile every (arch, build), on all CPU cores (NVRTC is thread-safe and ctypes releases the GIL); one row
    per compile (see ``compile_report``)."""
    jobs = [(str(lib_path), arch, d, small) for arch in ARCHS for d, small in BUILDS]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(lambda job: compile_report(*job), jobs))


def row_passed(row: dict) -> bool:
    """A build passes when it compiles, ptxas reported on both kernels, and neither spills."""
    return row["ok"] and all("registers" in row["kernels"].get(k, {}) for k in KERNELS) and row["spill_bytes"] == 0


def messages(log: str) -> str:
    """The first line of the log that is not ptxas's resource report (a warning or an error), or ""."""
    return next((line for line in log.splitlines() if line.strip() and not line.startswith("ptxas")), "")


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
            for kernel, resources in parse_ptxas_report(proc.stderr).items():
                rows.append({"head_dim": head_dim, "kernel": kernel, **resources})
    return rows


def _resources(row: dict, kernel: str) -> str:
    r = row["kernels"].get(kernel)
    if not r or "registers" not in r:
        return "-"
    return f"{r['registers']} / {r.get('spill_stores', 0) + r.get('spill_loads', 0)} B"


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
    options = f"{' '.join(COMPILE_OPTIONS)} -DHEAD_DIM=<D> [-DSMALL_TILES=1] -ftz=true -arch=<arch> {PTXAS_VERBOSE}"
    print(f"options {options}")
    print(f"{'arch':6} {'D':>4} {'tiles':7} {'result':>6} {'seconds':>8} {'cubin B':>8}  "
          f"{'fwd regs / spill':>17} {'bwd regs / spill':>17}  messages")
    rows = run_nvrtc_checks(lib)
    for r in rows:
        result = "ok" if row_passed(r) else ("SPILL" if r["ok"] else "FAIL")
        print(f"{r['arch']:6} {r['head_dim']:>4} {'small' if r['small_tiles'] else 'default':7} {result:>6} "
              f"{r['seconds']:>8.2f} {r['cubin_bytes']:>8}  {_resources(r, 'glm_attn_fwd'):>17} "
              f"{_resources(r, 'glm_attn_bwd'):>17}  {messages(r['log'])}")
    for r in rows:
        if not row_passed(r):
            print(f"\n--- {r['arch']} HEAD_DIM={r['head_dim']} small_tiles={r['small_tiles']} log ---\n{r['log']}",
                  file=sys.stderr)

    if args.resources:
        print(f"\nnvcc -cubin -arch=sm_90 -Xptxas -v {' '.join(COMPILE_OPTIONS)} -DHEAD_DIM=..")
        print(f"{'head_dim':>8} {'kernel':14} {'registers':>9} {'spill st':>8} {'spill ld':>8} {'stack':>6}")
        for r in nvcc_resource_report():
            print(f"{r['head_dim']:>8} {r['kernel']:14} {r.get('registers', 0):>9} {r.get('spill_stores', 0):>8} "
                  f"{r.get('spill_loads', 0):>8} {r.get('stack', 0):>6}")
    return 0 if all(row_passed(r) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
