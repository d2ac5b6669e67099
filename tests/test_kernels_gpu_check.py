"""The acceptance script ``python -m minglm.kernels.gpu_check`` without a GPU.

Its CPU-side mode must run its CPU parts and name every GPU part it skipped; ``--require-gpu`` and a used-up time
budget must fail; and its kernel checks (lengths, non-contiguous views, float16, determinism, stress) are run
here on the CPU emulation of the kernel, so that the code the first GPU will run has run somewhere, and shown to
catch a kernel that lets NaN out of its padding. The emulation parts need ``g++``.
"""

from __future__ import annotations

import numpy as np
import pytest

from minglm import backend
from minglm.kernels import emulate, gpu_check
from minglm.kernels.cuda import SOURCE_PATH

needs_gxx = pytest.mark.skipif(emulate.compiler() is None, reason="g++ (C++20) is not on PATH")
GPU_PARTS = [name for name, (side, _) in gpu_check.CHECKS.items() if side == "gpu"]


@pytest.fixture
def no_gpu(monkeypatch):
    """Pretend there is no GPU, even on a machine that has one."""
    monkeypatch.setattr(backend, "gpu_available", lambda: False)


def test_cpu_side_mode_runs_the_cpu_parts_and_names_the_skipped_gpu_parts(no_gpu, capsys, monkeypatch):
    monkeypatch.setattr(emulate, "bounds_check", lambda D, small_tiles=False: (True, "ok"))  # tested elsewhere
    assert gpu_check.main([]) == 0
    out = capsys.readouterr().out
    rows = {}  # part -> result, from the table's rows ("name side result seconds detail")
    for line in out.splitlines():
        words = line.split()
        if len(words) >= 3 and words[0] in gpu_check.CHECKS:
            rows[words[0]] = words[2]
    assert rows["facts"] == "ok"
    for name in ("nvrtc", "emulator", "bounds"):
        assert rows[name] in ("ok", "skipped"), out  # skipped only when the wheel or g++ is missing
    assert all(rows[name] == "skipped" for name in GPU_PARTS), out
    not_run = next(line for line in out.splitlines() if line.startswith("GPU parts NOT run:"))
    assert all(f"{name} (no GPU" in not_run for name in GPU_PARTS), not_run
    assert "NOT ACCEPTED" not in out


def test_require_gpu_fails_without_a_gpu(no_gpu, capsys):
    assert gpu_check.main(["--only", "facts", "--require-gpu"]) == 1
    assert "--require-gpu, but no GPU was used" in capsys.readouterr().out


def test_a_used_up_time_budget_fails(no_gpu, capsys):
    assert gpu_check.main(["--only", "facts", "emulator", "--budget", "0"]) == 1
    out = capsys.readouterr().out
    assert "time budget" in out and "not run within the time budget: facts, emulator" in out


def test_a_failing_part_fails_the_run_and_the_run_goes_on(no_gpu, capsys, monkeypatch):
    def broken(ctx):
        raise AssertionError("o: max error 0.5 > 1e-05")

    monkeypatch.setitem(gpu_check.CHECKS, "emulator", ("cpu", broken))
    assert gpu_check.main(["--only", "emulator", "facts"]) == 1
    out = capsys.readouterr().out
    assert "emulator     cpu  FAIL" in out and "o: max error 0.5" in out
    assert "facts        cpu  ok" in out and "failed: emulator" in out


@needs_gxx
def test_kernel_checks_pass_on_the_emulated_kernel(capsys):
    """--emulate: the GPU kernel checks, at small sizes, through cuda.py and the CPU emulation."""
    parts = ["lengths", "noncontig", "float16", "determinism", "stress", "sanitizer"]
    assert gpu_check.main(["--emulate", "--only", *parts]) == 0
    out = capsys.readouterr().out
    for name in parts[:-1]:
        assert f"{name:12} gpu  ok" in out, out
    assert "needs a real GPU" in out  # compute-sanitizer needs the device


@needs_gxx
def test_the_lengths_check_catches_nan_leaking_from_padding(tmp_path):
    """A kernel that loads padded keys (k >= len) instead of zeros: the NaN there reaches real rows through
    0 * NaN, and the lengths check must fail."""
    source = SOURCE_PATH.read_text()
    leaky = source.replace("const bool in = j0 + c < len;  // padded keys load as 0: 0 * NaN would poison real rows",
                           "const bool in = j0 + c < T;")
    assert leaky != source
    path = tmp_path / "leaky.cu"
    path.write_text(leaky)
    with emulate.fake_cupy_installed(emulate.FakeCupy(source=str(path))) as fake:
        with pytest.raises(AssertionError, match="not finite"):
            gpu_check.check_lengths(fake, small=True)


def test_relative_error_helper():
    assert gpu_check._rel_err(np.zeros(0), np.zeros(0)) == 0.0
    assert gpu_check._rel_err(np.array([1.0, 2.5]), np.array([1.0, 2.0])) == pytest.approx(0.25)
    assert gpu_check._rel_err(np.array([0.1]), np.array([0.0])) == pytest.approx(0.1)  # scale at least 1
