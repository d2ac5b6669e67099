"""Device-aware dispatch of the fused kernel (minglm/kernels/cuda.py), on a CPU.

``emulate.FakeCupy`` stands in for cupy: its device reports a shared-memory limit of our choosing, its kernel
attribute setter refuses to opt in above that limit (as the driver does), and its RawModule runs the kernels
through the CPU emulation. So the real launcher is driven end to end: which build of which kernel it picks on an
H100-like (227 KiB), T4-like (64 KiB) and Pascal-like (48 KiB) device, that it says so once, that it falls back to
the twin when nothing fits, and that compiled kernels are cached per device and head size. Needs ``g++``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from minglm.kernels import cuda, emulate, reference_attention

pytestmark = pytest.mark.skipif(emulate.compiler() is None, reason="g++ (C++20) is not on PATH")
KIB = 1024


def _case(D, T=45, seed=21):
    """Two samples, two heads: sep 20 with padding from row 40 (T >= 40), and a causal sample without padding."""
    rng = np.random.default_rng(seed)
    q, k, v, do = (rng.standard_normal((2, 2, T, D)).astype(np.float32) for _ in range(4))
    return q, k, v, do, np.array([min(20, T), 0]), np.array([min(40, T), T])


def _run_and_check(q, k, v, do, sep, lengths, scale=0.2):
    """The launcher's forward and backward against the float64 reference."""
    o, lse = cuda.flash_attention_forward_cuda(q, k, v, sep, scale, lengths=lengths)
    grads = cuda.flash_attention_backward_cuda(q, k, v, o, lse, do, sep, scale, lengths=lengths)
    ref = reference_attention(*(a.astype(np.float64) for a in (q, k, v)), sep, scale, lengths=lengths)
    for name, got, want in zip(("o", "lse", "dq", "dk", "dv"), (o, lse, *grads), (ref[0], ref[1], *ref[2](do))):
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=name)


def _smem(launches, kernel):
    return {smem for name, _, _, smem in launches if name == kernel}


def test_cuda_launcher_drives_the_emulated_kernels():
    """cuda.py itself (grid, argument order, shared-memory opt-in, delta, dq zeroing) against the reference, on a
    device with room for the default tiles (227 KiB, an H100): no warning, the default builds only."""
    with emulate.fake_cupy_installed(emulate.FakeCupy(smem_optin=227 * KIB)) as fake, warnings.catch_warnings():
        warnings.simplefilter("error")  # any fallback warning fails the test
        q, k, v, do, sep, lengths = _case(128)
        _run_and_check(q, k, v, do, sep, lengths)
        c = emulate.kernel_constants(128)
        launched = {name: (grid, block, smem) for name, grid, block, smem in fake.launches}
        assert launched["glm_attn_fwd"] == ((2, 2, 2), (128,), 4 * c["fwd_smem_floats"])  # 49,792 B
        assert launched["glm_attn_bwd"] == ((2, 2, 2), (128,), 4 * c["bwd_smem_floats"])  # 74,240 B
        assert all("-DSMALL_TILES=1" not in options for _, options in fake.modules)


def test_a_64_kib_device_runs_the_small_tile_backward_and_says_so_once():
    """T4: the D = 128 forward (49,792 B) fits in 64 KiB, the backward (74,240 B) does not. The old launcher opted
    in to 74,240 B and failed on every call; now the backward runs its -DSMALL_TILES=1 build (43,328 B)."""
    with emulate.fake_cupy_installed(emulate.FakeCupy(smem_optin=64 * KIB)) as fake:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for seed in (1, 2):  # two calls: one warning, one compile of each build
                _run_and_check(*_case(128, seed=seed))
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(messages) == 1 and "glm_attn_bwd" in messages[0] and "smaller-tile" in messages[0], messages
        assert "65,536 B" in messages[0] and "74,240 B" in messages[0]
        assert _smem(fake.launches, "glm_attn_fwd") == {49_792}
        assert _smem(fake.launches, "glm_attn_bwd") == {43_328}
        assert len(fake.modules) == 2  # the default build and the small-tile build, each once


def test_a_48_kib_device_runs_both_small_tile_kernels_at_d128_and_default_tiles_below():
    """Pascal (48 KiB): at D = 128 neither default kernel fits; at D = 64 both do (33,408 B and 41,472 B)."""
    with emulate.fake_cupy_installed(emulate.FakeCupy(smem_optin=48 * KIB)) as fake:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _run_and_check(*_case(128))
        assert sorted(str(w.message).split()[2] for w in caught) == ["glm_attn_bwd", "glm_attn_fwd"]
        assert _smem(fake.launches, "glm_attn_fwd") == {41_600}
        assert _smem(fake.launches, "glm_attn_bwd") == {43_328}
        fake.launches.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _run_and_check(*_case(64))
        assert _smem(fake.launches, "glm_attn_fwd") == {33_408}
        assert _smem(fake.launches, "glm_attn_bwd") == {41_472}


def test_the_twin_runs_when_not_even_the_small_tiles_fit():
    """A (pretend) 16 KiB device: nothing at D = 64 fits, so the twin computes on the same arrays, in the
    kernel's dtypes (o as the input, lse float32), and no kernel is launched."""
    with emulate.fake_cupy_installed(emulate.FakeCupy(smem_optin=16 * KIB)) as fake:
        with pytest.warns(RuntimeWarning, match="NumPy twin"):
            q, k, v, do, sep, lengths = _case(64)
            _run_and_check(q, k, v, do, sep, lengths)
            o, lse = cuda.flash_attention_forward_cuda(q.astype(np.float16), k.astype(np.float16),
                                                       v.astype(np.float16), sep, lengths=lengths)
        assert o.dtype == np.float16 and lse.dtype == np.float32
        assert not [name for name, *_ in fake.launches if name.startswith("glm_attn")]
        assert cuda.kernel_plan(64).fwd is None and cuda.kernel_plan(64).bwd is None


def test_compiled_kernels_are_cached_per_device_and_head_size():
    """Device 0 is an H100, device 1 a 48 KiB GPU. A module belongs to one device, so each (device, head size)
    compiles once; coming back to a device reuses its kernels, with that device's choice of tiles."""
    fake = emulate.FakeCupy(smem_optin={0: 227 * KIB, 1: 48 * KIB})
    with emulate.fake_cupy_installed(fake), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run_and_check(*_case(128))
        assert len(fake.modules) == 1 and not caught
        fake.device_id = 1
        _run_and_check(*_case(128))
        assert [device for device, _ in fake.modules] == [0, 1, 1]  # default and small-tile builds on device 1
        assert len(caught) == 2  # fwd and bwd fall back to small tiles there
        fake.device_id = 0
        _run_and_check(*_case(128))
        _run_and_check(*_case(32, T=20))
        assert [device for device, _ in fake.modules] == [0, 1, 1, 0]  # only the new head size compiled
        assert len(caught) == 2
        assert cuda.kernel_plan(128).bwd.small_tiles is False
        fake.device_id = 1
        assert cuda.kernel_plan(128).bwd.small_tiles is True and cuda.kernel_plan(128).smem_limit == 48 * KIB


def test_the_fake_driver_refuses_an_opt_in_above_the_device_limit():
    """What the old launcher did on a T4 at D = 128, and why every such call failed."""
    fake = emulate.FakeCupy(smem_optin=64 * KIB)
    kernel = fake.RawModule(code="", options=("-DHEAD_DIM=128",)).get_function("glm_attn_bwd")
    kernel.max_dynamic_shared_size_bytes = 64 * KIB
    with pytest.raises(RuntimeError, match="cannot opt in to 74240 B"):
        kernel.max_dynamic_shared_size_bytes = 74_240


def test_empty_inputs_launch_nothing():
    with emulate.fake_cupy_installed(emulate.FakeCupy()) as fake:
        q = np.zeros((2, 1, 0, 32), np.float32)
        o, lse = cuda.flash_attention_forward_cuda(q, q, q, np.array([0, 0]))
        grads = cuda.flash_attention_backward_cuda(q, q, q, o, lse, q, np.array([0, 0]))
        assert o.shape == q.shape and lse.shape == (2, 1, 0) and all(g.shape == q.shape for g in grads)
        assert fake.launches == [] and fake.modules == []
