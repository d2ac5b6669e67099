"""Tests for minglm/nn.py: registration, naming, state dicts, modes and the basic layers."""

import numpy as np
import pytest

import minglm
from minglm.nn import Dropout, Embedding, LayerNorm, Linear, Module, ModuleList, Parameter


class Two(Module):
    def __init__(self, rng):
        super().__init__()
        self.first = Linear(3, 4, rng)
        self.scale = Parameter(np.ones(4, dtype=np.float32))
        self.blocks = ModuleList([Linear(4, 4, rng, bias=False), LayerNorm(4)])
        self.drop = Dropout(0.5)

    def forward(self, x, rng=None):
        h = self.first(x) * self.scale
        h = self.blocks[1](self.blocks[0](h))
        return self.drop(h, rng)


def test_parameter_is_a_leaf_that_requires_grad():
    p = Parameter(np.zeros(3, dtype=np.float32))
    assert p.requires_grad and p.grad_fn is None and p.dtype == np.float32
    with pytest.raises(ValueError):
        Parameter(np.zeros(3, dtype=np.int64))


def test_names_follow_assignment_order():
    m = Two(np.random.default_rng(0))
    names = [n for n, _ in m.named_parameters()]
    assert names == ["scale", "first.weight", "first.bias", "blocks.0.weight", "blocks.1.weight", "blocks.1.bias"]
    assert m.num_parameters() == 4 + 12 + 4 + 16 + 4 + 4
    assert len(m.parameters()) == 6
    assert len(m.blocks) == 2 and isinstance(list(m.blocks)[1], LayerNorm)


def test_reassigning_an_attribute_replaces_its_registration():
    m = Two(np.random.default_rng(0))
    m.scale = None
    assert "scale" not in dict(m.named_parameters())


def test_module_init_must_run_first():
    class Bad(Module):
        def __init__(self):
            self.w = Parameter(np.zeros(2, dtype=np.float32))

    with pytest.raises(RuntimeError, match="Module.__init__"):
        Bad()


def test_linear_matches_numpy_and_stores_out_in():
    rng = np.random.default_rng(1)
    lin = Linear(5, 3, rng)
    assert lin.weight.shape == (3, 5) and lin.bias.shape == (3,)
    lin.bias.data[:] = rng.standard_normal(3).astype(np.float32)
    x = rng.standard_normal((2, 4, 5)).astype(np.float32)
    y = lin(minglm.Tensor(x))
    np.testing.assert_allclose(y.numpy(), x @ lin.weight.data.T + lin.bias.data, rtol=1e-6, atol=1e-6)
    assert y.dtype == np.float32


def test_embedding_and_layernorm():
    rng = np.random.default_rng(2)
    emb = Embedding(7, 4, rng)
    ids = np.array([[0, 6, 6]])
    np.testing.assert_array_equal(emb(ids).numpy(), emb.weight.data[ids])
    ln = LayerNorm(4)
    assert ln.eps == 1e-5
    x = rng.standard_normal((3, 4)).astype(np.float32) * 5 + 2
    y = ln(minglm.Tensor(x)).numpy()
    ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(y, ref, atol=1e-5)


def test_init_uses_only_the_given_generator():
    a = Linear(4, 4, np.random.default_rng(3)).weight.data
    b = Linear(4, 4, np.random.default_rng(3)).weight.data
    np.testing.assert_array_equal(a, b)
    with pytest.raises(TypeError):
        Linear(4, 4, rng=3)


def test_train_eval_and_dropout():
    m = Two(np.random.default_rng(0))
    x = minglm.Tensor(np.ones((2, 3), dtype=np.float32))
    assert m.training and m.drop.training
    with pytest.raises(ValueError, match="rng"):
        m(x)  # training-mode dropout needs an explicit generator
    y1 = m(x, np.random.default_rng(5)).numpy()
    y2 = m(x, np.random.default_rng(5)).numpy()
    np.testing.assert_array_equal(y1, y2)
    assert (y1 == 0).any()
    m.eval()
    assert not m.drop.training and not m.blocks[0].training
    y3 = m(x).numpy()
    kept = y1 != 0
    np.testing.assert_allclose(y1[kept], 2.0 * y3[kept], rtol=1e-6)
    with pytest.raises(ValueError):
        Dropout(1.0)


def test_zero_grad():
    m = Two(np.random.default_rng(0)).eval()
    m(minglm.Tensor(np.ones((2, 3), dtype=np.float32))).sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    m.zero_grad()
    assert all(p.grad is None for p in m.parameters())


def test_state_dict_round_trip_in_place():
    a, b = Two(np.random.default_rng(0)), Two(np.random.default_rng(1))
    sd = a.state_dict()
    assert all(isinstance(v, np.ndarray) for v in sd.values())
    sd["first.weight"][...] = 7.0  # a copy: the model must not change
    assert not (a.first.weight.data == 7.0).any()
    sd = a.state_dict()
    buffer = b.first.weight.data
    missing, unexpected = b.load_state_dict(sd)
    assert missing == [] and unexpected == []
    assert b.first.weight.data is buffer  # loaded in place: views held by an optimiser stay valid
    for (n1, p1), (n2, p2) in zip(a.named_parameters(), b.named_parameters()):
        assert n1 == n2
        np.testing.assert_array_equal(p1.data, p2.data)


def test_load_state_dict_strict_errors():
    m = Two(np.random.default_rng(0))
    sd = m.state_dict()
    missing = dict(sd)
    del missing["first.bias"]
    with pytest.raises(KeyError, match="first.bias"):
        m.load_state_dict(missing)
    extra = dict(sd, bogus=np.zeros(1))
    with pytest.raises(KeyError, match="bogus"):
        m.load_state_dict(extra)
    assert m.load_state_dict(extra, strict=False) == ([], ["bogus"])
    bad = dict(sd)
    bad["blocks.0.weight"] = np.zeros((4, 5), dtype=np.float32)
    before = m.first.weight.data.copy()
    with pytest.raises(ValueError, match=r"blocks\.0\.weight.*\(4, 5\).*\(4, 4\)"):
        m.load_state_dict(bad)
    np.testing.assert_array_equal(m.first.weight.data, before)  # a failed load changes nothing


def test_astype_and_to_cpu():
    m = Two(np.random.default_rng(0)).astype(np.float64)
    assert all(p.dtype == np.float64 for p in m.parameters())
    assert m.to("cpu") is m
    assert all(isinstance(p.data, np.ndarray) for p in m.parameters())
    with pytest.raises(ValueError):
        m.to("tpu")
