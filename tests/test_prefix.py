"""Tests for prefix tuning (minglm/prefix.py, P-tuning v2 style)."""

from __future__ import annotations

import numpy as np
import pytest

import minglm.functional as F
from minglm import finetune as FT
from minglm import prefix
from minglm.model import GLM, GLMConfig, KVCache
from minglm.tensor import no_grad
from minglm.testing import cached_and_recomputed
from minglm.tokenizer import CharTokenizer

TOK = CharTokenizer.from_texts(["abcdefghijklmnopqrstuvwxyz .,!?\n"])
CFG = dict(vocab_size=TOK.vocab_size, n_layer=2, n_head=2, d_model=32, max_len=48)


def model_and_input(seed: int = 0, **overrides):
    model = GLM(GLMConfig(**{**CFG, **overrides}), np.random.default_rng(seed))
    model.eval()
    rng = np.random.default_rng(seed + 100)
    tokens = rng.integers(8, TOK.vocab_size, size=(2, 12))
    pos = np.tile(np.arange(12), (2, 1))
    block = np.zeros((2, 12), dtype=np.int64)
    block[:, 8:] = np.arange(1, 5)
    pos[:, 8:] = 3
    return model, (tokens, pos, block, np.array([8, 8]))


def logits(model, inputs) -> np.ndarray:
    with no_grad():
        return model(*inputs).numpy()


def test_apply_freezes_the_base_and_counts_parameters(capsys):
    model, inputs = model_and_input()
    names_before = [n for n, _ in model.named_parameters()]
    layers = prefix.apply_prefix(model, length=5, rng=np.random.default_rng(0))
    assert len(layers) == 2
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert sum(p.size for _, p in trainable) == 2 * 2 * 5 * 32  # layers × (key, value) × P × C
    assert sorted(n for n, _ in trainable) == sorted(f"layers.{i}.attention.prefix_{kv}" for i in range(2)
                                                      for kv in ("key", "value"))
    # the base parameters keep their names, so a pretrained checkpoint still loads (the attention's come last now)
    assert sorted(n for n, _ in model.named_parameters() if "prefix_" not in n) == sorted(names_before)
    print(prefix.prefix_summary(model))
    assert "640 trainable" in capsys.readouterr().out
    with pytest.raises(ValueError, match="already"):
        prefix.apply_prefix(model, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="rng"):
        prefix.apply_prefix(model_and_input()[0], length=4)


def test_the_prefix_is_part_a_of_every_sequence():
    """With the prefix's own keys and values, the layer equals attention over [prefix; sequence] with sep + P: every
    query sees the prefix, and Part B stays causal."""
    model, (tokens, pos, block, sep) = model_and_input(1)
    prefix.apply_prefix(model, length=3, rng=np.random.default_rng(0))
    attn = model.layers[0].attention
    rng = np.random.default_rng(2)
    q, k, v = (F.Tensor(rng.standard_normal((2, 2, 12, 16)).astype(np.float32)) for _ in range(3))
    got = attn.attend(q, k, v, sep, 0).numpy()
    pk = np.broadcast_to(attn.prefix_key.data, (2, 2, 3, 16))
    pv = np.broadcast_to(attn.prefix_value.data, (2, 2, 3, 16))
    kk, vv = np.concatenate([pk, k.numpy()], 2), np.concatenate([pv, v.numpy()], 2)
    s = q.numpy() @ kk.transpose(0, 1, 3, 2) / 4.0  # (B, nh, 12, 15)
    j, i = np.arange(15)[None, :], np.arange(12)[:, None] + 3
    allowed = (j[None] < (sep + 3)[:, None, None]) | (j <= i)[None]  # (B, 12, 15)
    assert allowed[:, :, :3].all()
    s = np.where(allowed[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    np.testing.assert_allclose(got, (p / p.sum(-1, keepdims=True)) @ vv, rtol=0, atol=1e-5)


def test_only_the_prefixes_get_gradients():
    model, inputs = model_and_input(2, dropout=0.1, attn_dropout=0.1)
    prefix.apply_prefix(model, length=4, rng=np.random.default_rng(0))
    model.train()
    F.cross_entropy(model(*inputs, rng=np.random.default_rng(3)), inputs[0]).backward()
    for name, p in model.named_parameters():
        if "prefix_" in name:
            assert p.grad is not None and p.grad.shape == p.shape and np.abs(p.grad).max() > 0, name
        else:
            assert p.grad is None, name


def test_gradcheck_of_the_prefixes_float64():
    model, inputs = model_and_input(3, position="rope2d")
    model.astype(np.float64)
    prefix.apply_prefix(model, length=2, rng=np.random.default_rng(0))
    weights = np.random.default_rng(4).standard_normal((2, 12, TOK.vocab_size))

    def objective():
        return (model(*inputs) * weights).sum()

    objective().backward()
    for name in ("layers.0.attention.prefix_key", "layers.1.attention.prefix_value"):
        p = dict(model.named_parameters())[name]
        flat = p.data.reshape(-1)
        for j in range(0, flat.size, 7):
            orig = flat[j]
            with no_grad():
                flat[j] = orig + 1e-6
                up = objective().item()
                flat[j] = orig - 1e-6
                down = objective().item()
            flat[j] = orig
            numeric = (up - down) / 2e-6
            assert abs(p.grad.reshape(-1)[j] - numeric) <= 1e-6 + 1e-5 * abs(numeric), (name, j)


@pytest.mark.parametrize("position", ["learned2d", "rope1d"])
def test_decoding_with_a_cache_sees_the_prefix(position):
    model, (tokens, pos, block, sep) = model_and_input(4, position=position)
    prefix.apply_prefix(model, length=4, rng=np.random.default_rng(0))
    full = logits(model, (tokens, pos, block, sep))
    cache = KVCache(model, 2, 12)
    with no_grad():
        parts = [model(tokens[:, :8], pos[:, :8], block[:, :8], sep, cache=cache).numpy()]
        for t in range(8, 12):
            parts.append(model(tokens[:, t:t + 1], pos[:, t:t + 1], block[:, t:t + 1], 0, cache=cache).numpy())
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["fast", "cached"])
def test_fill_with_a_prefix_matches_recompute(kind):
    """``PrefixSelfAttention`` overrides ``attend_array`` as well as ``attend``, so both decoders see the prefix."""
    from minglm import generate as G

    model, _ = model_and_input(7, position="rope2d", norm="deepnorm")
    prefix.apply_prefix(model, length=4, rng=np.random.default_rng(0))
    for m in prefix.prefix_layers(model).values():
        m.prefix_value.data += np.float32(0.3)
    _, got, ref = cached_and_recomputed(model, TOK, "ab [MASK] cd [MASK]", G.Sampling(max_new_tokens=4),
                                        np.random.default_rng(1), kind)
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5)


def test_save_load_and_remove(tmp_path):
    model, inputs = model_and_input(5)
    base = logits(model, inputs)
    prefix.apply_prefix(model, length=3, rng=np.random.default_rng(0))
    for m in prefix.prefix_layers(model).values():  # as if trained
        m.prefix_value.data += np.float32(0.5)
    tuned = logits(model, inputs)
    assert np.abs(tuned - base).max() > 1e-4
    npz, meta = prefix.save_prefix(model, tmp_path / "prefix")
    assert npz.stat().st_size < 0.1 * sum(p.size * 4 for p in model.parameters())  # prefixes only
    fresh, _ = model_and_input(5)
    prefix.load_prefix(fresh, npz)
    np.testing.assert_array_equal(logits(fresh, inputs), tuned)
    other, _ = model_and_input(5)
    prefix.apply_prefix(other, length=4, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="shape"):
        prefix.load_prefix(other, meta)
    with pytest.raises(FileNotFoundError):
        prefix.load_prefix(fresh, tmp_path / "nothing")
    prefix.remove_prefix(fresh)
    assert not prefix.prefix_layers(fresh) and all(p.requires_grad for p in fresh.parameters())
    np.testing.assert_array_equal(logits(fresh, inputs), base)


def test_prefix_tuning_beats_zero_shot_on_a_synthetic_task():
    """A prefix cannot change a weight, only what attention reads, so it needs a base whose attention carries the
    input: random N(0, 0.02) weights carry almost nothing (accuracy stays at chance, measured), random N(0, 0.3)
    ones stand in for a pretrained model here."""
    rng = np.random.default_rng(0)
    model, _ = model_and_input(6, init_std=0.3)
    scorer = FT.ClozeScorer(TOK, FT.ClozeTask("{text} is [MASK].", ["good", "bad"]), CFG["max_len"])

    def task(n):
        texts, labels = [], []
        for i in range(n):
            letters = np.array(list("abcde" if i % 2 == 0 else "vwxyz"))
            texts.append("".join(rng.choice(letters, size=6)))
            labels.append(i % 2)
        return scorer.encode(texts), labels

    train_ex, train_y = task(48)
    test_ex, test_y = task(40)
    zero = scorer.accuracy(model, test_ex, test_y)
    prefix.apply_prefix(model, length=8, rng=np.random.default_rng(0))
    frozen = {n: p.data.copy() for n, p in model.named_parameters() if "prefix_" not in n}
    FT.finetune(model, scorer, train_ex, train_y, steps=60, batch_size=8, lr=0.1, rng=np.random.default_rng(1),
                weight_decay=0.0)
    tuned = scorer.accuracy(model, test_ex, test_y)
    assert tuned >= 0.9 and tuned > zero, (zero, tuned)
    for n, p in model.named_parameters():  # the base did not move
        if n in frozen:
            np.testing.assert_array_equal(p.data, frozen[n], err_msg=n)
