"""AdamW over a flat buffer, the warmup + cosine schedule, clipping and gradient accumulation, against hand values."""

import math

import numpy as np
import pytest

import minglm
from minglm.nn import Parameter
from minglm.optim import AdamW, CosineSchedule, clip_by_global_norm, decays, lr_at, parameters_decayed


def _two_params():
    w = Parameter(np.array([[1.0]], dtype=np.float32))  # a (1, 1) matrix: decayed
    b = Parameter(np.array([1.0], dtype=np.float32))  # a bias: never decayed
    return w, b


def test_adamw_two_steps_by_hand():
    """lr 0.1, wd 0.1, betas (0.9, 0.95), eps 1e-8; gradients 0.5 then -0.25 for both parameters.

    step 1: m = 0.1*0.5 = 0.05, v = 0.05*0.25 = 0.0125; m̂ = 0.05/0.1 = 0.5, v̂ = 0.0125/0.05 = 0.25,
            update = 0.1 * 0.5 / (0.5 + 1e-8) = 0.1 (to 2e-9)
            w = 1.0 * (1 - 0.1*0.1) - 0.1 = 0.89           b = 1.0 - 0.1 = 0.9
    step 2: m = 0.9*0.05 + 0.1*(-0.25) = 0.02, v = 0.95*0.0125 + 0.05*0.0625 = 0.015
            m̂ = 0.02 / (1 - 0.81) = 0.105263158, v̂ = 0.015 / (1 - 0.9025) = 0.153846154, sqrt = 0.392232270
            update = 0.1 * 0.105263158 / 0.392232270 = 0.0268370380
            w = 0.89 * 0.99 - 0.0268370380 = 0.854262962    b = 0.9 - 0.0268370380 = 0.873162962
    """
    w, b = _two_params()
    opt = AdamW([("w", w), ("b", b)], lr=0.1, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for g, want_w, want_b in ((0.5, 0.89, 0.9), (-0.25, 0.854262962, 0.873162962)):
        w.grad = np.full((1, 1), g, dtype=np.float32)
        b.grad = np.full((1,), g, dtype=np.float32)
        opt.step()
        assert w.data[0, 0] == pytest.approx(want_w, abs=1e-6)
        assert b.data[0] == pytest.approx(want_b, abs=1e-6)
    assert opt.t == 2
    assert w.data.dtype == np.float32 and opt.m.dtype == np.float32 and opt.v.dtype == np.float32
    assert opt.m[0] == pytest.approx(0.02, abs=1e-7) and opt.v[0] == pytest.approx(0.015, abs=1e-7)


def test_step_lr_argument_overrides_default():
    w, b = _two_params()
    opt = AdamW([("w", w), ("b", b)], lr=123.0, weight_decay=0.0)
    b.grad = np.array([2.0], dtype=np.float32)
    opt.step(lr=0.01)  # the first Adam step moves by lr * sign(g)
    assert b.data[0] == pytest.approx(0.99, abs=1e-6)
    assert w.data[0, 0] == 1.0  # no gradient, no decay: unchanged


def test_decay_rule_on_a_glm():
    from minglm.model import GLM, GLMConfig

    model = GLM(GLMConfig(vocab_size=20, n_layer=1, n_head=2, d_model=8, max_len=16), np.random.default_rng(0))
    rule = parameters_decayed(model)
    for name, p in model.named_parameters():
        if p.ndim == 1:
            assert not rule[name], name  # every bias and every LayerNorm weight/bias
        else:
            assert rule[name], name  # linear weights and the three embedding tables
    assert rule["word_embeddings.weight"] and rule["block_position_embeddings.weight"]
    assert not any(rule[n] for n in rule if "layernorm" in n)
    assert not decays("encoder.norm.weight", np.zeros((3, 3)))  # a 2-D weight named as a norm is still excluded
    assert not decays("head.bias", np.zeros((3, 3)))


def test_parameters_become_views_of_one_flat_buffer():
    from minglm.model import GLM, GLMConfig

    model = GLM(GLMConfig(vocab_size=20, n_layer=1, n_head=2, d_model=8, max_len=16), np.random.default_rng(0))
    before = model.state_dict()
    opt = AdamW(model, lr=1e-3)
    assert opt.flat.size == model.num_parameters()
    for name, p in model.named_parameters():
        assert np.shares_memory(p.data, opt.flat), name
        np.testing.assert_array_equal(p.data, before[name])
    # decayed parameters come first, so the decay is one pass over a prefix
    n_decay = sum(p.data.size for n, p in model.named_parameters() if decays(n, p))
    assert opt.n_decay == n_decay
    # loading weights in place keeps the views (nn.Module.load_state_dict copies into .data)
    model.load_state_dict(before)
    opt.zero_grad()
    opt.step()
    # rebinding .data detaches the parameter from the buffer: the optimizer refuses to step
    p = model.word_embeddings.weight
    p.data = p.data.copy()
    with pytest.raises(RuntimeError, match="word_embeddings.weight"):
        opt.step()


def test_schedule_values():
    # peak 1.0, warmup 10, total 110, floor 10 %
    assert lr_at(0, 1.0, 10, 110) == pytest.approx(0.1)  # (0+1)/10
    assert lr_at(4, 1.0, 10, 110) == pytest.approx(0.5)
    assert lr_at(9, 1.0, 10, 110) == pytest.approx(1.0)
    assert lr_at(10, 1.0, 10, 110) == pytest.approx(1.0)  # the cosine starts at the peak
    assert lr_at(60, 1.0, 10, 110) == pytest.approx(0.55)  # halfway: 0.1 + 0.9 * 0.5 * (1 + cos(pi/2))
    assert lr_at(35, 1.0, 10, 110) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert lr_at(110, 1.0, 10, 110) == pytest.approx(0.1)
    assert lr_at(1000, 1.0, 10, 110) == pytest.approx(0.1)  # flat after the end
    assert lr_at(0, 3e-3, 0, 100) == pytest.approx(3e-3)  # no warmup
    sched = CosineSchedule(2.0, 10, 110, min_ratio=0.0)
    assert sched(110) == pytest.approx(0.0) and sched(60) == pytest.approx(1.0)
    lrs = [lr_at(s, 1.0, 10, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone decay
    with pytest.raises(ValueError, match="step"):
        lr_at(-1, 1.0, 10, 110)
    with pytest.raises(ValueError, match="min_ratio"):
        CosineSchedule(1.0, 10, 110, min_ratio=1.5)


def test_clipping_by_global_norm():
    g = np.array([3.0, 4.0], dtype=np.float32)  # norm 5
    assert clip_by_global_norm(g, 1.0) == pytest.approx(5.0)
    np.testing.assert_allclose(g, [0.6, 0.8], rtol=1e-5)
    assert g.dtype == np.float32
    g = np.array([0.3, 0.4], dtype=np.float32)  # norm 0.5 < 1: untouched
    assert clip_by_global_norm(g, 1.0) == pytest.approx(0.5)
    np.testing.assert_array_equal(g, np.array([0.3, 0.4], dtype=np.float32))
    g = np.array([np.nan, 1.0], dtype=np.float32)
    assert math.isnan(clip_by_global_norm(g, 1.0))
    assert g[1] == 1.0  # a non-finite gradient is left for the guard, not scaled


def test_clip_grad_norm_across_parameters():
    w, b = _two_params()
    opt = AdamW([("w", w), ("b", b)], lr=0.1)
    w.grad = np.array([[6.0]], dtype=np.float32)
    b.grad = np.array([8.0], dtype=np.float32)  # global norm 10 over both tensors
    assert opt.clip_grad_norm(1.0) == pytest.approx(10.0)
    np.testing.assert_allclose(opt.flat_grad[[opt.names.index("w"), opt.names.index("b")]], [0.6, 0.8], rtol=1e-5)


def test_gradient_accumulation_equals_mean_of_micro_batches():
    """Two micro-batches, each loss scaled by 1/2: the accumulated gradient is the mean of the two gradients.
    For loss = mean((x @ w)^2) over n rows, d/dw = 2/n · xᵀ (x w)."""
    rng = np.random.default_rng(0)
    x1, x2 = rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal((4, 3)).astype(np.float32)
    w = Parameter(rng.standard_normal((3, 1)).astype(np.float32))
    opt = AdamW([("w", w)], lr=0.1)
    opt.zero_grad()
    for x in (x1, x2):
        loss = ((minglm.Tensor(x) @ w) ** 2).mean()
        (loss * 0.5).backward()
    got = opt.gather_grads().reshape(3, 1)
    wd = w.data.astype(np.float64)
    want = 0.5 * sum(2.0 / 4 * x.T.astype(np.float64) @ (x.astype(np.float64) @ wd) for x in (x1, x2))
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_state_dict_resumes_bit_for_bit():
    rng = np.random.default_rng(1)
    grads = [rng.standard_normal((2, 3)).astype(np.float32) for _ in range(6)]
    init = rng.standard_normal((2, 3)).astype(np.float32)

    def run(steps, opt=None, p=None):
        if p is None:
            p = Parameter(init.copy())
            opt = AdamW([("p", p)], lr=0.05)
        for g in steps:
            p.grad = g.copy()
            opt.clip_grad_norm(1.0)
            opt.step()
        return p, opt

    full, _ = run(grads)
    half, opt = run(grads[:3])
    state = opt.state_dict()
    p2 = Parameter(half.data.copy())
    opt2 = AdamW([("p", p2)], lr=0.05)
    opt2.load_state_dict(state)
    run(grads[3:], opt2, p2)
    np.testing.assert_array_equal(p2.data, full.data)  # exactly, not approximately

    other = AdamW([("q", Parameter(np.zeros(3, dtype=np.float32)))])
    with pytest.raises(ValueError, match="other parameters"):
        other.load_state_dict(state)
    assert other.t == 0 and not other.m.any()  # a refused state changes nothing


def test_bad_arguments():
    with pytest.raises(ValueError, match="no parameters"):
        AdamW([])
    with pytest.raises(ValueError, match="float32"):
        AdamW([("x", Parameter(np.zeros(2), dtype=np.float64))])
    with pytest.raises(ValueError, match="betas"):
        AdamW([("x", Parameter(np.zeros(2, dtype=np.float32)))], betas=(1.0, 0.9))
