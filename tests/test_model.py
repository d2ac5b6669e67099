"""Tests for minglm/model.py: shapes, dtypes, init, config, gradients, the KV cache and error messages."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

import minglm
import minglm.functional as F
from minglm.model import GLM, GLMConfig, KVCache, glm_loss


def tiny_config(**kw):
    values = dict(vocab_size=11, n_layer=2, n_head=2, d_model=8, max_len=12)
    values.update(kw)
    return GLMConfig(**values)


def figure2_inputs():
    """docs/figure2.md §2 (code convention) with a second, shorter, right-padded sample."""
    tokens = np.array([[1, 2, 8, 4, 8, 5, 5, 6, 5, 3], [1, 2, 8, 5, 9, 10, 0, 0, 0, 0]])
    pos = np.array([[0, 1, 2, 3, 4, 4, 4, 4, 2, 2], [0, 1, 2, 2, 2, 2, 0, 0, 0, 0]])
    block = np.array([[0, 0, 0, 0, 0, 1, 2, 3, 1, 2], [0, 0, 0, 1, 2, 3, 0, 0, 0, 0]])
    sep = np.array([5, 3])
    return tokens, pos, block, sep


def perturb(model, rng):
    """Random LN gains/biases and biases, so a test is not blind to them (they start at 1 and 0)."""
    for name, p in model.named_parameters():
        if name.endswith("bias") or "layernorm" in name:
            p.data += rng.standard_normal(p.shape).astype(p.dtype) * 0.1


def reference_forward(sd, cfg, tokens, pos, block, sep):
    """An independent float64 NumPy forward (docs/mask.md, docs/official-code.md §3), straight from the state dict."""
    g = {k: v.astype(np.float64) for k, v in sd.items()}
    B, T = tokens.shape
    C, nh = cfg.d_model, cfg.n_head
    hs = C // nh

    def ln(x, prefix):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * g[prefix + ".weight"] + g[prefix + ".bias"]

    def lin(x, prefix):
        return x @ g[prefix + ".weight"].T + g[prefix + ".bias"]

    x = g["word_embeddings.weight"][tokens] + g["position_embeddings.weight"][pos]
    x = x + g["block_position_embeddings.weight"][block]
    i = np.arange(T)
    allowed = (i[None, None, :] < sep[:, None, None]) | (i[None, None, :] <= i[None, :, None])  # (B, Tq, Tk)
    for layer in range(cfg.n_layer):
        p = f"layers.{layer}."
        qkv = lin(ln(x, p + "input_layernorm"), p + "attention.query_key_value")
        q, k, v = (qkv[..., j * C:(j + 1) * C].reshape(B, T, nh, hs).transpose(0, 2, 1, 3) for j in range(3))
        s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hs)
        s = np.where(allowed[:, None], s, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        y = (a @ v).transpose(0, 2, 1, 3).reshape(B, T, C)
        x = x + lin(y, p + "attention.dense")
        h = lin(ln(x, p + "post_attention_layernorm"), p + "mlp.dense_h_to_4h")
        h = 0.5 * h * (1 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
        x = x + lin(h, p + "mlp.dense_4h_to_h")
    x = ln(x, "final_layernorm")
    return x @ g["word_embeddings.weight"].T


def test_forward_shape_dtype_and_reference():
    cfg = tiny_config()
    model = GLM(cfg, np.random.default_rng(0))
    perturb(model, np.random.default_rng(1))
    tokens, pos, block, sep = figure2_inputs()
    logits = model(tokens, pos, block, sep)
    assert logits.shape == (2, 10, 11) and logits.dtype == np.float32
    ref = reference_forward(model.state_dict(), cfg, tokens, pos, block, sep)
    np.testing.assert_allclose(logits.numpy(), ref, atol=1e-5)


def test_everything_stays_float32():
    model = GLM(tiny_config(dropout=0.1, attn_dropout=0.1), np.random.default_rng(0))
    tokens, pos, block, sep = figure2_inputs()
    batch = SimpleNamespace(tokens=tokens, position_ids=pos, block_position_ids=block, sep=sep,
                            targets=np.roll(tokens, -1, axis=1), loss_mask=(block > 0).astype(np.float32))
    loss = glm_loss(model, batch, rng=np.random.default_rng(3))
    assert loss.dtype == np.float32
    loss.backward()
    for name, p in model.named_parameters():
        assert p.dtype == np.float32, name
        assert p.grad is not None and p.grad.dtype == np.float32 and p.grad.shape == p.shape, name


def test_parameter_names_and_count():
    cfg = tiny_config()
    model = GLM(cfg, np.random.default_rng(0))
    names = [n for n, _ in model.named_parameters()]
    assert names[:5] == ["word_embeddings.weight", "position_embeddings.weight", "block_position_embeddings.weight",
                         "layers.0.input_layernorm.weight", "layers.0.input_layernorm.bias"]
    assert names[-2:] == ["final_layernorm.weight", "final_layernorm.bias"]
    assert len(names) == 3 + 12 * cfg.n_layer + 2
    C, V, P = cfg.d_model, cfg.vocab_size, cfg.max_len + 1
    per_layer = 4 * C + (3 * C * C + 3 * C) + (C * C + C) + (4 * C * C + 4 * C) + (4 * C * C + C)
    assert model.num_parameters() == V * C + 2 * P * C + cfg.n_layer * per_layer + 2 * C
    assert model.position_embeddings.weight.shape == (cfg.max_len + 1, C)


def test_init_statistics():
    cfg = GLMConfig(vocab_size=512, n_layer=8, n_head=4, d_model=128, max_len=256)
    model = GLM(cfg, np.random.default_rng(0))
    sd = model.state_dict()
    scaled = 0.02 / math.sqrt(2 * cfg.n_layer)
    for name, value in sd.items():
        if name.endswith("layernorm.weight"):
            assert (value == 1).all(), name
        elif name.endswith("bias"):
            assert (value == 0).all(), name
        else:
            std = scaled if ("attention.dense" in name or "dense_4h_to_h" in name) else 0.02
            assert abs(value.mean()) < 3 * std / math.sqrt(value.size), name
            assert abs(value.std() / std - 1) < 0.05, (name, value.std(), std)


def test_seed_determinism():
    a = GLM(tiny_config(), np.random.default_rng(4)).state_dict()
    b = GLM(tiny_config(), np.random.default_rng(4)).state_dict()
    c = GLM(tiny_config(), np.random.default_rng(5)).state_dict()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["word_embeddings.weight"], c["word_embeddings.weight"])


def test_gradcheck_float64_sampled():
    """Central differences on a random sample of elements of several parameters, with dropout on (a fixed seed
    gives the same masks for every evaluation)."""
    cfg = tiny_config(dropout=0.1, attn_dropout=0.1)
    model = GLM(cfg, np.random.default_rng(0)).astype(np.float64)
    perturb(model, np.random.default_rng(1))
    tokens, pos, block, sep = figure2_inputs()
    targets = np.random.default_rng(2).integers(0, cfg.vocab_size, tokens.shape)
    mask = np.random.default_rng(3).random(tokens.shape) < 0.7
    weights = np.random.default_rng(4).standard_normal((2, 10, 11))  # a random upstream on the logits too

    def objective():
        logits = model(tokens, pos, block, sep, rng=np.random.default_rng(9))
        return F.cross_entropy(logits, targets, mask.astype(np.float64)) + (logits * weights).sum() * 0.1

    loss = objective()
    assert loss.dtype == np.float64
    loss.backward()
    params = dict(model.named_parameters())
    pick = np.random.default_rng(5)
    eps = 1e-6
    checked = 0
    for name in ["word_embeddings.weight", "position_embeddings.weight", "block_position_embeddings.weight",
                 "layers.0.input_layernorm.weight", "layers.0.attention.query_key_value.weight",
                 "layers.0.attention.query_key_value.bias", "layers.1.attention.dense.weight",
                 "layers.1.post_attention_layernorm.bias", "layers.1.mlp.dense_h_to_4h.weight",
                 "layers.0.mlp.dense_4h_to_h.bias", "final_layernorm.weight"]:
        p = params[name]
        flat = p.data.reshape(-1)
        rows = np.unique(tokens) if name == "word_embeddings.weight" else None
        for _ in range(6):
            if rows is not None:  # only the rows of used tokens have nonzero embedding gradients
                j = int(pick.choice(rows)) * p.shape[1] + int(pick.integers(p.shape[1]))
            else:
                j = int(pick.integers(flat.size))
            orig = flat[j]
            with minglm.no_grad():
                flat[j] = orig + eps
                up = objective().item()
                flat[j] = orig - eps
                down = objective().item()
            flat[j] = orig
            numeric = (up - down) / (2 * eps)
            analytic = p.grad.reshape(-1)[j]
            assert abs(analytic - numeric) <= 1e-6 + 1e-5 * abs(numeric), (name, j, analytic, numeric)
            checked += 1
    assert checked == 66


def test_kv_cache_matches_full_forward():
    cfg = tiny_config(max_len=20)
    model = GLM(cfg, np.random.default_rng(0)).eval()
    perturb(model, np.random.default_rng(1))
    rng = np.random.default_rng(2)
    B, n, T = 2, 6, 11
    tokens = rng.integers(0, cfg.vocab_size, (B, T))
    pos = np.concatenate([np.tile(np.arange(n), (B, 1)), np.full((B, T - n), n - 1)], axis=1)
    block = np.concatenate([np.zeros((B, n), int), np.tile(np.arange(1, T - n + 1), (B, 1))], axis=1)
    with minglm.no_grad():
        full = model(tokens, pos, block, np.full(B, n)).numpy()
        cache = KVCache(model, B, 16)
        parts = [model(tokens[:, :n], pos[:, :n], block[:, :n], np.full(B, n), cache=cache).numpy()]
        assert cache.length == n
        for t in range(n, T - 2):
            parts.append(model(tokens[:, t:t + 1], pos[:, t:t + 1], block[:, t:t + 1], 0, cache=cache).numpy())
        # the last two tokens in one chunk: causal inside the chunk
        parts.append(model(tokens[:, T - 2:], pos[:, T - 2:], block[:, T - 2:], np.zeros(B, int), cache=cache).numpy())
    assert cache.length == T
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, atol=1e-5)
    with pytest.raises(ValueError, match="KV cache"):
        with minglm.no_grad():
            model(tokens[:, :6], pos[:, :6], block[:, :6], 0, cache=cache)
    cache.truncate(n)
    assert cache.length == n
    assert KVCache(cfg, 1, 4).k.shape == (2, 1, 2, 4, 4)


def test_attention_probs():
    model = GLM(tiny_config(), np.random.default_rng(0))
    tokens, pos, block, sep = figure2_inputs()
    probs = model.attention_probs(tokens, pos, block, sep, layer=1)
    assert probs.shape == (2, 2, 10, 10)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)
    assert (probs[0, :, :5, 5:] == 0).all()  # Part A never sees Part B
    assert (probs[0, :, 5, 6:] == 0).all() and (probs[0, :, 9, :] > 0).all()
    assert (probs[1, :, 3:, :3] > 0).all()
    with pytest.raises(ValueError, match="layer"):
        model.attention_probs(tokens, pos, block, sep, layer=2)


def test_input_errors():
    model = GLM(tiny_config(max_len=12), np.random.default_rng(0))
    T = 14
    tokens = np.zeros((1, T), dtype=np.int64)
    pos = np.arange(T)[None]
    with pytest.raises(ValueError, match="max_len=12"):
        model(tokens, pos, np.zeros_like(pos), [0])
    with pytest.raises(ValueError, match="block_position_ids"):
        model(tokens[:, :5], pos[:, :5], np.full((1, 5), 13), [0])
    with pytest.raises(ValueError, match="same"):
        model(tokens[:, :5], pos[:, :4], pos[:, :4], [0])
    with pytest.raises(ValueError, match="sep"):
        model(np.zeros((2, 3), int), np.zeros((2, 3), int), np.zeros((2, 3), int), [1, 2, 3])
    with pytest.raises(ValueError, match="integers"):
        model(np.zeros((1, 3)), np.zeros((1, 3), int), np.zeros((1, 3), int), [1])


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="d_model.*n_head"):
        GLMConfig(d_model=10, n_head=4)
    with pytest.raises(ValueError, match="max_len"):
        GLMConfig(max_len=64, seq_len=128)
    for field in ("vocab_size", "n_layer", "n_head", "d_model", "max_len"):
        with pytest.raises(ValueError, match=field):
            GLMConfig(**{field: 0})
    with pytest.raises(ValueError, match="dropout"):
        GLMConfig(dropout=1.0)
    with pytest.raises(ValueError, match="unknown"):
        GLMConfig.from_dict({"n_layers": 3})
    with pytest.raises(ValueError, match="preset"):
        GLMConfig.preset("huge")


def test_presets_and_json_round_trip():
    small = GLMConfig.preset("small")
    assert (small.n_layer, small.d_model, small.n_head, small.seq_len) == (4, 256, 8, 256)
    tiny = GLMConfig.preset("tiny", vocab_size=80, dropout=0.1)
    assert tiny.vocab_size == 80 and tiny.dropout == 0.1
    assert GLMConfig.preset("tiny", seq_len=300).max_len == 300
    base = GLMConfig.preset("base")
    assert base.d_model > small.d_model
    d = json.loads(json.dumps(tiny.to_dict()))
    assert GLMConfig.from_dict(d) == tiny


def test_state_dict_round_trip_gives_same_logits():
    cfg = tiny_config()
    a, b = GLM(cfg, np.random.default_rng(0)), GLM(cfg, np.random.default_rng(1))
    tokens, pos, block, sep = figure2_inputs()
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(a(tokens, pos, block, sep).numpy(), b(tokens, pos, block, sep).numpy())
    small = GLM(tiny_config(d_model=12), np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"word_embeddings\.weight.*\(11, 8\).*\(11, 12\)"):
        small.load_state_dict(a.state_dict())


def test_bench_train_flop_count_and_smoke(capsys):
    from minglm.bench import train as bench

    dense, attention = bench.step_flops(GLMConfig.preset("small"), 8, 256)
    assert round(dense / 1e9, 1) == 39.5 and round(attention / 1e9, 1) == 6.4  # docs/performance.md's numbers
    assert bench.main(["--configs", "tiny", "--steps", "1", "--rounds", "1", "--batch", "1", "--no-torch"]) == 0
    out = capsys.readouterr().out
    assert "tiny" in out and "ms/step" in out and "NumPy-first" in out and "CPU:" in out


def test_overfits_one_batch_with_sgd():
    """The whole model learns: plain SGD on one fixed batch drives the loss well below its start."""
    cfg = tiny_config(d_model=16, n_head=2)
    model = GLM(cfg, np.random.default_rng(0))
    tokens, pos, block, sep = figure2_inputs()
    batch = SimpleNamespace(tokens=tokens, position_ids=pos, block_position_ids=block, sep=sep,
                            targets=np.roll(tokens, -1, axis=1), loss_mask=np.ones(tokens.shape, np.float32))
    losses = []
    for _ in range(60):
        model.zero_grad()
        loss = glm_loss(model, batch)
        loss.backward()
        losses.append(loss.item())
        for p in model.parameters():
            p.data -= np.float32(0.5) * p.grad
    assert losses[0] > 2.0 and losses[-1] < 0.3 * losses[0], losses[::10]
