"""Known-answer and bad-input tests for minglm's autograd engine and ops: broadcasting, a reused node, an unused
input, a second backward through a freed graph.

The op table (tests/test_ops_table.py) checks every op against NumPy and finite differences; this file checks the
*semantics* that a gradient check cannot see: broadcasting's exact gradients, a reused node, an unused input,
backward twice (accumulating with ``retain_graph=True``, a clear error without it), ``no_grad``, extreme logits, the
GLM attention mask written out by hand, a graph 5,000 ops deep, float32 staying float32, the exact GeLU against
``math.erf``, and the errors that bad input must raise (a ValueError naming the op and both shapes).

Left out: model-level tests (tests/test_model.py) and the fused kernel's own tests (tests/test_kernels_twin.py).
Reference: docs/mask.md (mask), docs/official-code.md §4 (loss).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import minglm
import minglm.functional as F
from minglm.backend import to_device, to_numpy
from minglm.tensor import Tensor


def leaf(xp, a, dtype=np.float64):
    return Tensor(to_device(np.asarray(a, dtype=dtype), xp), requires_grad=True)


# --- known answers -------------------------------------------------------------------------------------------------
def test_broadcast_add_mul_exact_gradients(xp):
    a = leaf(xp, [[1.0], [2.0], [3.0]])  # (3, 1)
    b = leaf(xp, [[10.0, 20.0, 30.0, 40.0]])  # (1, 4)
    G = np.arange(12.0).reshape(3, 4)
    y = a + b
    assert y.shape == (3, 4)
    np.testing.assert_array_equal(y.numpy(), [[11, 21, 31, 41], [12, 22, 32, 42], [13, 23, 33, 43]])
    y.backward(to_device(G, xp))
    np.testing.assert_array_equal(to_numpy(a.grad), [[6.0], [22.0], [38.0]])  # G summed over columns
    np.testing.assert_array_equal(to_numpy(b.grad), [[12.0, 15.0, 18.0, 21.0]])  # G summed over rows
    a.zero_grad()
    b.zero_grad()
    (a * b).backward(to_device(G, xp))
    np.testing.assert_array_equal(to_numpy(a.grad), [[200.0], [600.0], [1000.0]])  # Σ_j G_ij b_j
    np.testing.assert_array_equal(to_numpy(b.grad), [[32.0, 38.0, 44.0, 50.0]])  # Σ_i G_ij a_i


def test_reused_node(xp):
    x = leaf(xp, [-2.0, 0.5, 3.0])
    y = x * x + x  # x is used three times: dy/dx = 2x + 1
    y.sum().backward()
    np.testing.assert_array_equal(to_numpy(x.grad), [-3.0, 2.0, 7.0])
    x.zero_grad()
    h = x.exp()  # an intermediate node consumed twice
    (h * h).sum().backward()
    np.testing.assert_allclose(to_numpy(x.grad), 2 * np.exp(2 * np.array([-2.0, 0.5, 3.0])), rtol=1e-14)


def test_unused_input_keeps_grad_none(xp):
    x, unused = leaf(xp, [1.0, 2.0]), leaf(xp, [3.0, 4.0])
    (x * 2.0).sum().backward()
    assert unused.grad is None
    np.testing.assert_array_equal(to_numpy(x.grad), [2.0, 2.0])
    frozen = Tensor(to_device(np.ones(2), xp))  # no requires_grad: never gets a gradient
    (x * frozen).sum().backward()
    assert frozen.grad is None


def test_backward_twice_accumulates_with_retain_graph(xp):
    x = leaf(xp, [1.0, -2.0, 0.5])
    loss = (x * x * 3.0).sum()
    loss.backward(retain_graph=True)
    once = to_numpy(x.grad).copy()
    np.testing.assert_allclose(once, 6.0 * np.array([1.0, -2.0, 0.5]))
    loss.backward(retain_graph=True)
    np.testing.assert_allclose(to_numpy(x.grad), 2 * once)  # leaf gradients accumulate until zeroed
    loss.backward()  # the third pass may free the graph
    np.testing.assert_allclose(to_numpy(x.grad), 3 * once)


def test_backward_twice_retain_graph_ops_that_reuse_buffers(xp, rng):
    # CrossEntropy turns its saved probabilities into the gradient in place unless the graph is retained
    logits = leaf(xp, rng.standard_normal((4, 5)))
    w = leaf(xp, 1.0 + rng.standard_normal(5) * 0.1)
    loss = F.cross_entropy(F.layer_norm(logits, w), to_device(np.array([0, 3, 4, 1]), xp))
    loss.backward(retain_graph=True)
    g1, gw1 = to_numpy(logits.grad).copy(), to_numpy(w.grad).copy()
    loss.backward()
    np.testing.assert_allclose(to_numpy(logits.grad), 2 * g1, rtol=1e-12)
    np.testing.assert_allclose(to_numpy(w.grad), 2 * gw1, rtol=1e-12)


def test_backward_twice_without_retain_graph_raises_naming_the_op(xp):
    x = leaf(xp, [1.0, 2.0])
    loss = (x.exp() * 2.0).sum()
    loss.backward()
    first = to_numpy(x.grad).copy()
    with pytest.raises(RuntimeError, match=r"Sum.*retain_graph") as info:
        loss.backward()
    assert "second time" in str(info.value)
    np.testing.assert_array_equal(to_numpy(x.grad), first)  # nothing was silently added
    y = x.exp()
    (y * 1.0).sum().backward()
    with pytest.raises(RuntimeError, match="Exp"):  # a freed interior node is named too
        (y * 2.0).sum().backward()


def test_no_grad_records_nothing(xp):
    x = leaf(xp, [1.0, 2.0])
    with minglm.no_grad():
        y = (x * 2.0 + 1.0).exp().sum()
        assert not minglm.is_grad_enabled()
        with minglm.no_grad():
            pass
        assert not minglm.is_grad_enabled()  # the inner block restored the outer state
    assert minglm.is_grad_enabled()
    assert y.grad_fn is None and not y.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.backward()

    @minglm.no_grad()
    def evaluate(t):
        return F.softmax(t * 3.0)

    out = evaluate(x)
    assert out.grad_fn is None and not out.requires_grad
    with pytest.raises(ZeroDivisionError), minglm.no_grad():
        raise ZeroDivisionError
    assert minglm.is_grad_enabled()  # restored after an exception too
    assert (x * 2.0).grad_fn is not None


EXTREME = np.array([[1000.0, -1000.0, 0.0, 999.0], [-1000.0, -1000.0, -999.0, -1000.0]])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("op", ["softmax", "log_softmax", "cross_entropy"])
def test_extreme_logits_stay_finite(xp, op, dtype):
    x = leaf(xp, EXTREME, dtype=dtype)
    targets = to_device(np.array([1, 3]), xp)
    if op == "cross_entropy":
        out = F.cross_entropy(x, targets)
        out.backward()
    else:
        out = getattr(F, op)(x)
        out.backward(to_device(np.arange(8.0).reshape(2, 4).astype(dtype), xp))
    assert np.isfinite(to_numpy(out.data)).all(), f"{op} {dtype.__name__}: non-finite value"
    assert np.isfinite(to_numpy(x.grad)).all(), f"{op} {dtype.__name__}: non-finite gradient"
    assert out.dtype == dtype and x.grad.dtype == dtype
    if op == "softmax":
        np.testing.assert_allclose(to_numpy(out.data).sum(-1), 1.0, rtol=1e-6)
    if op == "log_softmax":
        assert to_numpy(out.data)[0, 1] == pytest.approx(-2000.0 - math.log1p(math.exp(-1.0)), rel=1e-6)


# A loss computed as -log(max(p_t, tiny)) would be floored at about 87 (float32) / 708 (float64) here.
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cross_entropy_extreme_logits_exact_value(xp, dtype):
    # loss = logsumexp(z) - z[t]; row 0: 1000 + log(1 + e^-2000) - (-1000) = 2000; row 1: log 2
    z = leaf(xp, [[1000.0, -1000.0], [0.0, 0.0]], dtype=dtype)
    loss = F.cross_entropy(z, to_device(np.array([1, 0]), xp))
    assert loss.item() == pytest.approx((2000.0 + math.log(2.0)) / 2, rel=1e-6)
    loss.backward()
    np.testing.assert_allclose(to_numpy(z.grad), [[0.5, -0.5], [-0.25, 0.25]], atol=1e-7)


def test_attention_sep_equals_dense_mask_by_hand(xp, rng):
    B, H, T, D = 3, 2, 6, 4
    sep = np.array([0, 2, 6])
    q, k, v = (rng.standard_normal((B, H, T, D)) for _ in range(3))
    out = F.scaled_dot_product_attention(*(leaf(xp, a) for a in (q, k, v)), sep=to_device(sep, xp), impl="plain")
    expected = np.empty((B, H, T, D))
    for b in range(B):  # the dense GLM mask, one sample at a time: causal (tril) plus the first sep[b] columns
        allowed = np.tril(np.ones((T, T), dtype=bool)) | (np.arange(T)[None, :] < sep[b])
        s = q[b] @ k[b].transpose(0, 2, 1) / math.sqrt(D)  # (H, T, T)
        s = np.where(allowed, s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        expected[b] = (p / p.sum(-1, keepdims=True)) @ v[b]
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12, atol=1e-12)
    # sep = T is fully bidirectional, sep = 0 purely causal: check the two extremes against the unmasked formula
    s_full = q[2] @ k[2].transpose(0, 2, 1) / math.sqrt(D)
    p_full = np.exp(s_full - s_full.max(-1, keepdims=True))
    np.testing.assert_allclose(out.numpy()[2], (p_full / p_full.sum(-1, keepdims=True)) @ v[2], rtol=1e-12)


def test_attention_masked_keys_get_no_gradient(xp, rng):
    B, H, T, D = 2, 1, 5, 3
    sep = np.array([1, 3])
    q, k, v = (leaf(xp, rng.standard_normal((B, H, T, D))) for _ in range(3))
    out = F.scaled_dot_product_attention(q, k, v, sep=to_device(sep, xp), impl="plain")
    g = np.zeros((B, H, T, D))
    g[:, :, 0] = 1.0  # only query 0's output: it sees keys j < max(sep, 1)
    out.backward(to_device(g, xp))
    for b in range(B):
        visible = max(sep[b], 1)
        assert np.abs(to_numpy(k.grad)[b, :, visible:]).max() == 0.0
        assert np.abs(to_numpy(v.grad)[b, :, visible:]).max() == 0.0
        assert np.abs(to_numpy(v.grad)[b, :, :visible]).max() > 0.0


def test_deep_chain_backpropagates_without_recursion(xp):
    x = leaf(xp, [0.5, -1.0])
    y = x
    for _ in range(5000):
        y = y + x * 1.0  # two ops per step: 10,000 nodes deep
    y.sum().backward()
    np.testing.assert_array_equal(to_numpy(x.grad), [5001.0, 5001.0])
    del y  # dropping a deep graph must not overflow the stack either


def _graph_tensors(root):
    seen, stack, out = set(), [root], []
    while stack:
        t = stack.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        out.append(t)
        if t.grad_fn is not None:
            stack.extend(i for i in t.grad_fn.inputs if i is not None)
    return out


def test_float32_graph_stays_float32(xp, rng):
    def p(*shape, scale=0.3):
        return leaf(xp, rng.standard_normal(shape) * scale, dtype=np.float32)

    x, W1, b1, W2, b2, ln_w, ln_b, emb = p(4, 5, 6), p(8, 6), p(8), p(7, 8), p(7), p(8), p(8), p(7, 6)
    ids = to_device(rng.integers(0, 7, size=(4, 5)), xp)
    h = F.embedding(ids, emb) + x * 0.5 - 1.0  # (4, 5, 6)
    h = F.gelu(F.linear(h, W1, b1))  # (4, 5, 8)
    h = F.layer_norm(h, ln_w, ln_b) / 3.0 + np.float64(0.25) * h  # a NumPy float64 scalar must not upcast
    h = h + F.gelu(h, approximate="none") * 0.1 + F.sigmoid(h) ** 2 + (h * h + 1.0).sqrt().log()
    q = h.reshape(4, 5, 2, 4).transpose(0, 2, 1, 3)  # (B, H, T, D)
    a = F.scaled_dot_product_attention(q, q * 0.9, q, sep=to_device(np.array([1, 2, 3, 5]), xp), impl="plain")
    a = F.dropout(a, 0.1, True, np.random.default_rng(1)).transpose(0, 2, 1, 3).reshape(4, 5, 8)
    logits = F.linear(F.relu(a + h.tanh()), W2, b2)  # (4, 5, 7)
    loss = F.cross_entropy(logits, ids, mask=to_device(np.ones((4, 5), dtype=np.float32), xp))
    loss = loss + F.log_softmax(logits).mean() * 0.01 + F.softmax(logits, axis=1).max() * 0.01
    loss = loss + 2.0 / logits.exp().sum()
    for t in _graph_tensors(loss):
        assert t.dtype == np.float32, f"{t.grad_fn.name if t.grad_fn else 'leaf'} produced {t.dtype}"
    loss.backward()
    for name, t in {"x": x, "W1": W1, "b1": b1, "W2": W2, "b2": b2, "ln_w": ln_w, "ln_b": ln_b, "emb": emb}.items():
        assert t.grad is not None and t.grad.dtype == np.float32, f"{name}: grad dtype {getattr(t.grad, 'dtype', None)}"


def test_python_floats_default_to_float32():
    assert minglm.Tensor(1.5).dtype == np.float32
    assert minglm.Tensor([1.0, 2.0]).dtype == np.float32
    assert minglm.Tensor(np.ones(2)).dtype == np.float64  # NumPy arrays keep their dtype


def test_gelu_exact_matches_math_erf():
    x = np.concatenate([np.linspace(-9.0, 9.0, 3601), [-3.0, 3.0, -3.0000001, 3.0000001, 0.0, 1e-8, -40.0, 40.0]])
    t = Tensor(x, requires_grad=True)
    y = F.gelu(t, approximate="none")
    expected = np.array([0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))) for v in x])
    np.testing.assert_allclose(y.numpy(), expected, rtol=0, atol=1e-7)
    np.testing.assert_allclose(y.numpy(), expected, rtol=0, atol=1e-12)  # it is in fact far better than 1e-7
    y.sum().backward()
    dexp = np.array([0.5 * (1 + math.erf(v / math.sqrt(2))) + v * math.exp(-v * v / 2) / math.sqrt(2 * math.pi)
                     for v in x])
    np.testing.assert_allclose(t.grad, dexp, rtol=0, atol=1e-7)


def test_gelu_tanh_differs_from_exact_by_little():
    x = np.linspace(-5.0, 5.0, 1001)
    diff = F.gelu(Tensor(x)).numpy() - F.gelu(Tensor(x), approximate="none").numpy()
    assert 1e-4 < np.abs(diff).max() < 1e-3  # the tanh form is an approximation, but a close one


def test_max_ties_share_the_gradient(xp):
    x = leaf(xp, [[1.0, 3.0, 3.0], [2.0, 0.0, -1.0]])
    x.max(axis=1).backward(to_device(np.array([1.0, 1.0]), xp))
    np.testing.assert_array_equal(to_numpy(x.grad), [[0.0, 0.5, 0.5], [1.0, 0.0, 0.0]])


def test_dropout_identity_and_expectation():
    x = Tensor(np.ones((200, 200)), requires_grad=True)
    assert F.dropout(x, 0.5, training=False, rng=None) is x
    assert F.dropout(x, 0.0, training=True, rng=None) is x
    y = F.dropout(x, 0.25, training=True, rng=np.random.default_rng(0))
    assert set(np.unique(y.numpy())) <= {0.0, 1.0 / 0.75}
    assert y.numpy().mean() == pytest.approx(1.0, abs=0.02)


def test_cross_entropy_all_masked_is_zero_not_nan(xp):
    z = leaf(xp, np.ones((2, 3)))
    loss = F.cross_entropy(z, to_device(np.array([0, 1]), xp), mask=to_device(np.zeros(2), xp))
    loss.backward()
    assert loss.item() == 0.0 and np.all(to_numpy(z.grad) == 0.0)


# --- bad input ----------------------------------------------------------------------------------------------------
def _t(shape, dtype=np.float64):
    return Tensor(np.ones(shape, dtype=dtype), requires_grad=np.dtype(dtype).kind == "f")


def _raises_naming(fn, op: str, *shapes):
    with pytest.raises(ValueError) as info:
        fn()
    msg = str(info.value)
    assert op in msg, f"error does not name {op!r}: {msg}"
    for shape in shapes:
        assert str(tuple(shape)) in msg, f"error does not name shape {tuple(shape)}: {msg}"


@pytest.mark.parametrize("op", ["add", "sub", "mul", "div", "pow"])
def test_elementwise_shape_mismatch(op):
    symbol = {"add": "__add__", "sub": "__sub__", "mul": "__mul__", "div": "__truediv__", "pow": "__pow__"}[op]
    _raises_naming(lambda: getattr(_t((3, 4)), symbol)(_t((2, 4))), op, (3, 4), (2, 4))


def test_matmul_shape_mismatch():
    _raises_naming(lambda: _t((3, 4)) @ _t((5, 6)), "matmul", (3, 4), (5, 6))
    _raises_naming(lambda: _t((4,)) @ _t((3,)), "matmul", (4,), (3,))
    with pytest.raises(ValueError, match="matmul"):
        _t(()) @ _t((3,))


def test_matmul_batch_shape_mismatch():
    _raises_naming(lambda: _t((2, 3, 4)) @ _t((3, 4, 5)), "matmul", (2, 3, 4), (3, 4, 5))


def test_linear_shape_mismatch():
    _raises_naming(lambda: F.linear(_t((2, 4)), _t((3, 5)), _t((3,))), "linear", (2, 4), (3, 5))


def test_layer_norm_shape_mismatch():
    _raises_naming(lambda: F.layer_norm(_t((2, 8)), _t((7,)), _t((7,))), "layer_norm", (2, 8), (7,))


def test_cross_entropy_bad_input():
    _raises_naming(lambda: F.cross_entropy(_t((4, 5)), np.zeros(3, dtype=np.int64)), "cross_entropy", (4, 5), (3,))
    _raises_naming(lambda: F.cross_entropy(_t((4, 5)), np.zeros(4, dtype=np.int64), mask=np.ones(3)),
                   "cross_entropy", (3,), (4,))
    with pytest.raises(ValueError, match=r"cross_entropy.*\[0, 5\)"):
        F.cross_entropy(_t((2, 5)), np.array([0, 5]))


def test_attention_shape_mismatch():
    q, k = _t((2, 2, 4, 3)), _t((2, 2, 4, 5))
    _raises_naming(lambda: F.scaled_dot_product_attention(q, k, k), "scaled_dot_product_attention", q.shape, k.shape)
    _raises_naming(lambda: F.scaled_dot_product_attention(_t((2, 4, 3)), k, k), "scaled_dot_product_attention",
                   (2, 4, 3))
    with pytest.raises(ValueError, match="sep"):
        F.scaled_dot_product_attention(q, q, q, sep=np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="rng"):
        F.scaled_dot_product_attention(q, q, q, dropout_p=0.1)


def test_requires_grad_on_integer_tensor_refused():
    with pytest.raises(ValueError, match="requires_grad.*int64"):
        minglm.Tensor(np.arange(3), requires_grad=True)
    with pytest.raises(ValueError, match="requires_grad"):
        minglm.Tensor([True, False], requires_grad=True)


def test_backward_on_non_scalar_needs_a_gradient():
    y = _t((2, 3)) * 2.0
    with pytest.raises(RuntimeError, match=r"non-scalar.*\(2, 3\)"):
        y.backward()
    with pytest.raises(ValueError, match=r"gradient shape \(3,\) != tensor shape \(2, 3\)"):
        y.backward(np.ones(3))


def test_other_bad_arguments():
    x = _t((2, 4))
    with pytest.raises(ValueError, match="dropout.*p"):
        F.dropout(x, 1.0, True, np.random.default_rng(0))
    with pytest.raises(ValueError, match="dropout.*rng"):
        F.dropout(x, 0.5, True, None)
    with pytest.raises(ValueError, match="gelu.*'exact'"):
        F.gelu(x, approximate="exact")
    with pytest.raises(ValueError, match="embedding.*integers"):
        F.embedding(np.zeros(3), _t((4, 2)))
    with pytest.raises(ValueError, match=r"embedding.*\[0, 4\)"):
        F.embedding(np.array([0, 4]), _t((4, 2)))
    with pytest.raises(ValueError, match=r"reshape.*\(2, 4\).*\(3, 3\)"):
        x.reshape(3, 3)
    with pytest.raises(ValueError, match="transpose"):
        x.transpose(0, 0)
    with pytest.raises(ValueError, match="split"):
        F.split(x, 3, axis=1)
    with pytest.raises(ValueError, match="split"):
        F.split(x, [1, 2], axis=1)
    with pytest.raises(ValueError, match="concat"):
        F.concat([x, _t((3, 3))], axis=0)
    with pytest.raises(ValueError, match="stack"):
        F.stack([x, _t((2, 3))])
    with pytest.raises(ValueError, match="axis 2"):
        x.sum(axis=2)
    with pytest.raises(IndexError, match="getitem"):
        x[5]


def test_attention_impl_is_an_argument_not_the_environment(monkeypatch):
    q = Tensor(np.ones((1, 1, 4, 2), np.float32))
    with pytest.raises(ValueError, match="impl must be one of"):
        F.scaled_dot_product_attention(q, q, q, sep=np.array([2]), impl="fastest")
    monkeypatch.setenv("MINGLM_ATTENTION", "fastest")  # nothing below the command line reads it
    assert F.scaled_dot_product_attention(q, q, q, sep=np.array([2])).shape == (1, 1, 4, 2)


def test_equality_is_elementwise_and_truth_needs_one_element():
    """`t == 0` is a bool Tensor like `t > 0`, never a silent False; `if t == 0` on many elements is an error."""
    t = minglm.Tensor(np.array([0.0, 1.0, 2.0]))
    np.testing.assert_array_equal((t == 0).numpy(), [True, False, False])
    np.testing.assert_array_equal((t != 0).numpy(), [False, True, True])
    np.testing.assert_array_equal((t == minglm.Tensor(np.array([0.0, 5.0, 2.0]))).numpy(), [True, False, True])
    assert not (t == 0).requires_grad and (t == 0).grad_fn is None
    with pytest.raises(ValueError, match="ambiguous"):
        bool(t == 0)
    assert bool(minglm.Tensor(3.0) == 3.0) and not bool(minglm.Tensor(3.0) != 3.0)
    assert t in {t} and len({t, minglm.Tensor(np.array([0.0, 1.0, 2.0]))}) == 2  # still hashed by identity


def test_minglm_tensor_is_the_module():
    import minglm.tensor

    assert minglm.tensor.Tensor is minglm.Tensor and callable(minglm.tensor.no_grad)
