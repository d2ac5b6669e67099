"""The backend seam: MINGLM_BACKEND, device moves, and the rule that only the backend and kernels import cupy."""

import pathlib
import re

import numpy as np
import pytest

import minglm
from minglm import backend

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_backend_names(monkeypatch):
    monkeypatch.setenv("MINGLM_BACKEND", "numpy")
    assert backend.default_xp() is np
    monkeypatch.setenv("MINGLM_BACKEND", "tensorflow")
    with pytest.raises(ValueError, match="MINGLM_BACKEND"):
        backend.default_xp()
    monkeypatch.setenv("MINGLM_BACKEND", "auto")
    assert backend.default_xp() is (backend.cupy_module() if backend.gpu_available() else np)


@pytest.mark.skipif(backend.gpu_available(), reason="checks the no-GPU error")
def test_forced_cupy_without_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("MINGLM_BACKEND", "cupy")
    with pytest.raises(RuntimeError, match="CuPy backend needs"):
        backend.default_xp()
    with pytest.raises(RuntimeError, match="CuPy backend needs"):
        minglm.Tensor([1.0, 2.0]).to("gpu")


def test_to_cpu_and_numpy():
    t = minglm.Tensor(np.arange(6.0).reshape(2, 3), requires_grad=True)
    assert t.to("cpu") is t
    assert isinstance(t.numpy(), np.ndarray)
    assert t.device == "cpu"
    with pytest.raises(ValueError, match="device"):
        t.to("tpu")


def test_python_floats_default_to_float32():
    assert minglm.Tensor([1.0, 2.0]).dtype == np.float32
    assert minglm.Tensor(np.zeros(2)).dtype == np.float64  # NumPy arrays keep their dtype
    assert minglm.Tensor([1, 2]).dtype.kind == "i"


def test_only_backend_and_kernels_import_cupy():
    allowed = {ROOT / "minglm" / "backend.py"}
    offenders = []
    for path in list((ROOT / "minglm").rglob("*.py")) + list((ROOT / "viz").rglob("*.py")):
        if path in allowed or (ROOT / "minglm" / "kernels") in path.parents:
            continue
        if re.search(r"^\s*(import cupy|from cupy|import cupyx|from cupyx)", path.read_text(), re.M):
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, f"only minglm/backend.py and minglm/kernels/ may import cupy: {offenders}"


@pytest.mark.gpu
@pytest.mark.skipif(not backend.gpu_available(), reason="needs CuPy and a CUDA GPU")
def test_round_trip_through_the_gpu():
    t = minglm.Tensor(np.arange(4, dtype=np.float32), requires_grad=True)
    g = t.to("gpu")
    assert g.device == "gpu" and g.requires_grad
    (g * g).sum().backward()
    np.testing.assert_allclose(backend.to_numpy(g.grad), 2 * np.arange(4))
    assert g.to("cpu").device == "cpu"
