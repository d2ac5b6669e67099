"""GLM-130B's changes to GLM (Zeng et al. 2022, "GLM-130B", §2.1-§3, App. B), each a switch on ``GLMConfig``.

The ops' gradient checks are rows of tests/test_ops_table.py (geglu, rope_1d/2d against the complex rotation,
grad_scale, attention_fp32_softmax). Here: the known answers behind each switch (erf, the FP32-softmax trick in
float32 and float16, EGS's forward and gradient, RoPE's relative positions), the DeepNorm and GeGLU layers against
hand-written NumPy, the 2-D RoPE model against SAT's ``glm130B_model.py`` (tests/fixtures/make_sat130b_fixture.py),
decoding with a cache for every switch, and the bad inputs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import minglm.functional as F
from minglm.tensor import Tensor
from minglm.testing import cached_and_recomputed

# --- the ops ------------------------------------------------------------------------------------------------------


def test_erf_float64_is_exact_to_an_ulp_and_float32_to_4e7():
    x = np.concatenate([np.linspace(-9.0, 9.0, 36001), [0.0, -0.0, 1e-300, 0.84375, 1.25, 1 / 0.35, 6.0, 40.0]])
    want = np.array([math.erf(v) for v in x])
    np.testing.assert_allclose(F._erf(x), want, rtol=0, atol=2.3e-16)
    x32 = x.astype(np.float32)
    got32 = F._erf(x32)
    assert got32.dtype == np.float32
    np.testing.assert_allclose(got32, [math.erf(float(v)) for v in x32], rtol=0, atol=4e-7)
    assert np.isnan(F._erf(np.array([np.nan]))).all()
    assert F._erf(np.array([np.inf, -np.inf])).tolist() == [1.0, -1.0]


def _attn_args(rng, B=2, H=2, T=6, D=4, dtype=np.float32, scale=1.0):
    q, k, v = (rng.standard_normal((B, H, T, D)) * scale for _ in range(3))
    return [Tensor(a.astype(dtype)) for a in (q, k, v)], np.array([2, 4])


def test_fp32_softmax_equals_plain_softmax_in_float32():
    (q, k, v), sep = _attn_args(np.random.default_rng(0), scale=3.0)
    plain = F.scaled_dot_product_attention(q, k, v, sep, impl="plain").numpy()
    for coeff in (1.0, 4.0, 70.0):
        scaled = F.scaled_dot_product_attention(q, k, v, sep, softmax_coeff=coeff).numpy()
        assert scaled.dtype == np.float32
        np.testing.assert_allclose(scaled, plain, rtol=1e-5, atol=1e-6)


def test_fp32_softmax_keeps_float16_scores_finite_where_plain_float16_overflows():
    # q·k/√D between 7e4 and 3e5, above 65504 (float16's largest value), as in a deep layer of a large fp16 model;
    # divided by c = 8 first, the scores stay below 4e4.
    rng = np.random.default_rng(1)
    q, k = (Tensor((rng.uniform(0.5, 1.0, (2, 2, 6, 4)) * 370).astype(np.float16)) for _ in range(2))
    v = Tensor(rng.standard_normal((2, 2, 6, 4)).astype(np.float16))
    sep = np.array([2, 4])
    with np.errstate(over="ignore", invalid="ignore"):
        plain = F.scaled_dot_product_attention(q, k, v, sep, impl="plain").numpy()
        scaled = F.scaled_dot_product_attention(q, k, v, sep, softmax_coeff=8.0).numpy()
    assert not np.isfinite(plain).all(), "the plain float16 path should overflow on these scores"
    assert scaled.dtype == np.float16 and np.isfinite(scaled).all()
    vv = v.numpy()  # each output is a convex combination of the values of its head
    assert (scaled >= vv.min(axis=2, keepdims=True) - 1e-3).all()
    assert (scaled <= vv.max(axis=2, keepdims=True) + 1e-3).all()


def test_grad_scale_keeps_the_forward_and_scales_the_gradient():
    x = Tensor(np.random.default_rng(2).standard_normal((3, 4)), requires_grad=True)
    y = F.grad_scale(x, 0.1)
    np.testing.assert_array_equal(y.numpy(), x.numpy())
    g = np.random.default_rng(3).standard_normal((3, 4))
    y.backward(g)
    np.testing.assert_allclose(x.grad, 0.1 * g, rtol=1e-15)


def test_rope_scores_depend_only_on_the_position_difference():
    """RoPE's point: after rotating q by position m and k by n, q·k is a function of m − n (per head)."""
    rng = np.random.default_rng(4)
    q, k = rng.standard_normal((1, 1, 1, 8)), rng.standard_normal((1, 1, 1, 8))

    def score(m, n):
        rq = F.rope(Tensor(q), *F.rotary_tables([np.array([[m]])], 8, np.float64)).numpy()
        rk = F.rope(Tensor(k), *F.rotary_tables([np.array([[n]])], 8, np.float64)).numpy()
        return float((rq * rk).sum())

    assert score(7, 3) == pytest.approx(score(14, 10), abs=1e-12)
    assert score(7, 3) == pytest.approx(score(4, 0), abs=1e-12)
    assert score(0, 0) == pytest.approx(float((q * k).sum()), abs=1e-12)
    assert abs(score(7, 3) - score(3, 7)) > 1e-3  # the direction matters


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("top", [3, 60, 10_000])  # few ids (a table of 0..max) or more ids than entries (directly)
def test_rotary_tables_are_the_angles_of_each_id(groups, top):
    """The tables hold cos and sin of id·θ_i computed in float64, laid out [θ | θ] per chunk, whichever way
    ``rotary_tables`` gets there (a batch of positions looks them up in a table of 0..max)."""
    rng = np.random.default_rng(5)
    ids = [rng.integers(0, top, size=(4, 9)) for _ in range(groups)]
    cos, sin = F.rotary_tables(ids, 16, np.float32)
    d = 16 // groups
    theta = 1.0 / 10000.0 ** (np.arange(0, d, 2, dtype=np.float64) / d)
    angles = np.concatenate([np.concatenate([a[..., None] * theta] * 2, axis=-1) for a in ids], axis=-1)[:, None]
    assert cos.dtype == sin.dtype == np.float32 and cos.shape == (4, 1, 9, 16)
    np.testing.assert_array_equal(cos, np.cos(angles).astype(np.float32))
    np.testing.assert_array_equal(sin, np.sin(angles).astype(np.float32))


def test_rope_refuses_an_odd_head_size():
    with pytest.raises(ValueError, match="even"):
        F.rotary_tables([np.zeros((1, 2), dtype=np.int64)], 7)
    with pytest.raises(ValueError, match="2 chunk"):
        F.rotary_tables([np.zeros((1, 2), dtype=np.int64)] * 2, 6)


# --- the model: each switch against a hand-written NumPy forward --------------------------------------------------

import minglm  # noqa: E402
from minglm.model import GLM, GMASK_ID, GLMConfig, KVCache  # noqa: E402

_erf = np.vectorize(math.erf)
SWITCH_CASES = {  # name -> GLMConfig overrides; "all" is the glm-130b preset's recipe (with 2-D RoPE)
    "glm1": {},
    "rope1d": dict(position="rope1d"),
    "rope1d_gmask": dict(position="rope1d", gmask_positions="continue"),  # GLM-130B's [gMASK] positions
    "rope2d": dict(position="rope2d"),
    "deepnorm": dict(norm="deepnorm"),
    "geglu": dict(ffn="geglu"),
    "egs": dict(embedding_grad_scale=0.1),
    "softmax_scaling": dict(softmax_scaling=True),
    "all": dict(position="rope2d", norm="deepnorm", ffn="geglu", embedding_grad_scale=0.1, softmax_scaling=True),
}


def small_config(**kw) -> GLMConfig:
    values = dict(vocab_size=13, n_layer=2, n_head=2, d_model=16, max_len=12)
    values.update(kw)
    return GLMConfig(**values)


def batch():
    """The GLM paper's Figure 2 (0-based, as the official make_block_data) and a second, right-padded sample whose
    blank is a [gMASK] (id 4) at index 2, filled by <sop> x x."""
    tokens = np.array([[1, 2, 8, 4, 8, 5, 5, 6, 5, 3], [1, 2, 4, 5, 9, 10, 0, 0, 0, 0]])
    pos = np.array([[0, 1, 2, 3, 4, 4, 4, 4, 2, 2], [0, 1, 2, 2, 2, 2, 0, 0, 0, 0]])
    block = np.array([[0, 0, 0, 0, 0, 1, 2, 3, 1, 2], [0, 0, 0, 1, 2, 3, 0, 0, 0, 0]])
    return tokens, pos, block, np.array([5, 3])


def perturbed(cfg: GLMConfig, seed: int = 0, dtype=np.float64) -> GLM:
    model = GLM(cfg, np.random.default_rng(seed)).astype(dtype).eval()
    rng = np.random.default_rng(seed + 100)
    for name, p in model.named_parameters():  # LN gains/biases and biases start at 1 and 0: make them count
        if name.endswith("bias") or "layernorm" in name:
            p.data += rng.standard_normal(p.shape).astype(p.dtype) * 0.1
    return model


def rope_ref(x, ids, base=10000.0):
    """x (B, nh, T, hs) turned by one (B, T) id array per chunk, as complex numbers (the paper's form)."""
    d = x.shape[-1] // len(ids)
    theta = base ** (-2.0 * np.arange(d // 2) / d)
    out = []
    for g, chunk_ids in enumerate(ids):
        c = x[..., g * d:(g + 1) * d]
        z = (c[..., :d // 2] + 1j * c[..., d // 2:]) * np.exp(1j * chunk_ids[:, None, :, None] * theta)
        out += [z.real, z.imag]
    return np.concatenate(out, axis=-1)


def reference_forward(sd, cfg: GLMConfig, tokens, pos, block, sep):
    """GLM with GLM-130B's switches, in float64 NumPy straight from the state dict (GLM-130B §2.1, App. B; SAT
    ``glm130B_model.py``): RoPE by complex rotation, DeepNorm as a = LN1(x), h = α·a + Attn(a), m = LN2(h),
    out = α·m + MLP(m), GeGLU with math.erf. EGS and the FP32 softmax change no forward value."""
    g = {k: v.astype(np.float64) for k, v in sd.items()}
    B, T = tokens.shape
    C, nh = cfg.d_model, cfg.n_head
    hs = C // nh
    alpha = math.sqrt(2 * cfg.n_layer)

    def ln(x, prefix):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * g[prefix + ".weight"] + g[prefix + ".bias"]

    def lin(x, prefix):
        return x @ g[prefix + ".weight"].T + g[prefix + ".bias"]

    x = g["word_embeddings.weight"][tokens]
    if cfg.position == "learned2d":
        x = x + g["position_embeddings.weight"][pos] + g["block_position_embeddings.weight"][block]
    i = np.arange(T)
    allowed = (i[None, None, :] < sep[:, None, None]) | (i[None, None, :] <= i[None, :, None])  # (B, Tq, Tk)

    def attention(h, p):
        qkv = lin(h, p + "attention.query_key_value")
        q, k, v = (qkv[..., j * C:(j + 1) * C].reshape(B, T, nh, hs).transpose(0, 2, 1, 3) for j in range(3))
        if cfg.position != "learned2d":
            ids = [pos] if cfg.position == "rope1d" else [pos, block]
            if cfg.gmask_positions == "continue":  # a [gMASK] fill counts on from its blank (GLM-130B App. B.3)
                ids = [np.where((block > 0) & (np.take_along_axis(tokens, pos, 1) == GMASK_ID), pos + block, pos)]
            q, k = rope_ref(q, ids), rope_ref(k, ids)
        s = np.where(allowed[:, None], q @ k.transpose(0, 1, 3, 2) / math.sqrt(hs), -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        return lin((a @ v).transpose(0, 2, 1, 3).reshape(B, T, C), p + "attention.dense")

    def mlp(h, p):
        u = lin(h, p + "mlp.dense_h_to_4h")
        if cfg.ffn == "geglu":
            a, b = np.split(u, 2, axis=-1)
            u = a * 0.5 * b * (1 + _erf(b / math.sqrt(2)))
        else:
            u = 0.5 * u * (1 + np.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u**3)))
        return lin(u, p + "mlp.dense_4h_to_h")

    for layer in range(cfg.n_layer):
        p = f"layers.{layer}."
        if cfg.norm == "deepnorm":
            a = ln(x, p + "input_layernorm")
            m = ln(alpha * a + attention(a, p), p + "post_attention_layernorm")
            x = alpha * m + mlp(m, p)
        else:
            x = x + attention(ln(x, p + "input_layernorm"), p)
            x = x + mlp(ln(x, p + "post_attention_layernorm"), p)
    return ln(x, "final_layernorm") @ g["word_embeddings.weight"].T


@pytest.mark.parametrize("case", list(SWITCH_CASES))
def test_model_matches_the_numpy_reference(case):
    cfg = small_config(**SWITCH_CASES[case])
    model = perturbed(cfg)
    tokens, pos, block, sep = batch()
    with minglm.no_grad():
        got = model(tokens, pos, block, sep).numpy()
    np.testing.assert_allclose(got, reference_forward(model.state_dict(), cfg, tokens, pos, block, sep),
                               rtol=0, atol=1e-11)


def test_glm1_is_unchanged_by_the_switches():
    cfg = small_config()
    assert cfg.to_dict() == dict(vocab_size=13, n_layer=2, n_head=2, d_model=16, max_len=12, seq_len=None,
                                 dropout=0.0, attn_dropout=0.0, layernorm_eps=1e-5, init_std=0.02)
    assert GLMConfig.from_dict(cfg.to_dict()) == cfg
    on = small_config(**SWITCH_CASES["all"])
    assert GLMConfig.from_dict(on.to_dict()) == on and on.to_dict()["position"] == "rope2d"
    names = [n for n, _ in GLM(cfg, np.random.default_rng(0)).named_parameters()]
    assert names[:3] == ["word_embeddings.weight", "position_embeddings.weight", "block_position_embeddings.weight"]


def test_rope_models_have_no_position_tables_and_use_the_right_ids():
    tokens, pos, block, sep = batch()
    for position in ("rope1d", "rope2d"):
        model = perturbed(small_config(position=position))
        names = {n for n, _ in model.named_parameters()}
        assert not any("position_embeddings" in n for n in names)
        with minglm.no_grad():
            base = model(tokens, pos, block, sep).numpy()
            other_block = model(tokens, pos, (block * 2) % 12, sep).numpy()
        if position == "rope1d":  # 1-D: the block ids do not exist for the model (Part B = its blank's position)
            np.testing.assert_array_equal(base, other_block)
        else:  # float64 and small random weights: a real change, far above rounding
            assert np.abs(base - other_block).max() > 1e-6


def test_softmax_scaling_equals_plain_softmax_in_the_model():
    tokens, pos, block, sep = batch()
    for dtype, atol in ((np.float64, 1e-12), (np.float32, 1e-5)):
        plain = perturbed(small_config(n_layer=3), dtype=dtype)
        scaled = perturbed(small_config(n_layer=3, softmax_scaling=True), dtype=dtype)
        with minglm.no_grad():
            a, b = plain(tokens, pos, block, sep).numpy(), scaled(tokens, pos, block, sep).numpy()
        np.testing.assert_allclose(a, b, rtol=0, atol=atol)


def test_egs_keeps_the_logits_and_scales_only_the_word_embedding_lookup_gradient():
    """The table is also the tied output head, so its gradient is head + alpha·lookup: linear in alpha, equal to the
    plain gradient at alpha = 1. The other parameters' gradients do not change."""
    tokens, pos, block, sep = batch()
    upstream = np.random.default_rng(7).standard_normal((2, 10, 13))
    grads, logits = {}, {}
    for alpha in (0.0, 0.1, 1.0):
        model = perturbed(small_config(embedding_grad_scale=alpha))
        out = model.train()(tokens, pos, block, sep)
        logits[alpha] = out.numpy()
        (out * upstream).sum().backward()
        grads[alpha] = {n: p.grad.copy() for n, p in model.named_parameters()}
    np.testing.assert_array_equal(logits[0.1], logits[1.0])
    np.testing.assert_array_equal(logits[0.0], logits[1.0])
    w = "word_embeddings.weight"
    head, lookup = grads[0.0][w], grads[1.0][w] - grads[0.0][w]
    assert np.abs(lookup).max() > 1e-3
    np.testing.assert_allclose(grads[0.1][w], head + 0.1 * lookup, rtol=0, atol=1e-12)
    for name in grads[1.0]:
        if name != w:
            np.testing.assert_allclose(grads[0.1][name], grads[1.0][name], rtol=0, atol=1e-12, err_msg=name)


def test_deepnorm_init_is_xavier_normal_with_gain_beta():
    cfg = GLMConfig(vocab_size=10, n_layer=8, n_head=4, d_model=96, max_len=8, norm="deepnorm", ffn="geglu")
    sd = GLM(cfg, np.random.default_rng(0)).state_dict()
    C, Fw, beta = 96, cfg.ffn_size, 1 / math.sqrt(16)
    assert Fw == 256 and cfg.deepnorm_alpha == pytest.approx(4.0)
    qkv = sd["layers.3.attention.query_key_value.weight"]
    want = {
        "q": (qkv[:C], math.sqrt(2 / (2 * C))), "k": (qkv[C:2 * C], math.sqrt(2 / (2 * C))),
        "v": (qkv[2 * C:], beta * math.sqrt(2 / (2 * C))),
        "dense": (sd["layers.3.attention.dense.weight"], beta * math.sqrt(2 / (2 * C))),
        "h_to_4h": (sd["layers.3.mlp.dense_h_to_4h.weight"], beta * math.sqrt(2 / (C + 2 * Fw))),
        "4h_to_h": (sd["layers.3.mlp.dense_4h_to_h.weight"], beta * math.sqrt(2 / (Fw + C))),
    }
    for name, (w, std) in want.items():
        assert abs(w.std() / std - 1) < 0.05, (name, w.std(), std)
        assert abs(w.mean()) < 4 * std / math.sqrt(w.size), name
    assert sd["layers.3.mlp.dense_h_to_4h.weight"].shape == (2 * Fw, C)
    assert (sd["layers.3.mlp.dense_h_to_4h.bias"] == 0).all()


def test_gradcheck_of_a_model_with_every_switch():
    """Central differences on sampled elements of every kind of parameter, dropout on (fixed seed), EGS included:
    the word-embedding check uses alpha = 1 (EGS's own gradient rule is GradScale's row in test_ops_table.py)."""
    cfg = small_config(**{**SWITCH_CASES["all"], "embedding_grad_scale": 1.0}, dropout=0.1, attn_dropout=0.1)
    model = perturbed(cfg).train()
    tokens, pos, block, sep = batch()
    weights = np.random.default_rng(4).standard_normal((2, 10, 13))

    def objective():
        return (model(tokens, pos, block, sep, rng=np.random.default_rng(9)) * weights).sum()

    objective().backward()
    params = dict(model.named_parameters())
    pick, eps = np.random.default_rng(5), 1e-6
    for name in ["word_embeddings.weight", "layers.0.input_layernorm.weight",
                 "layers.0.attention.query_key_value.weight", "layers.1.attention.dense.bias",
                 "layers.1.post_attention_layernorm.bias",
                 "layers.0.mlp.dense_h_to_4h.weight", "layers.1.mlp.dense_4h_to_h.weight", "final_layernorm.weight"]:
        p = params[name]
        flat = p.data.reshape(-1)
        for _ in range(5):
            j = int(pick.integers(flat.size))
            orig = flat[j]
            with minglm.no_grad():
                flat[j] = orig + eps
                up = objective().item()
                flat[j] = orig - eps
                down = objective().item()
            flat[j] = orig
            numeric = (up - down) / (2 * eps)
            assert abs(p.grad.reshape(-1)[j] - numeric) <= 1e-6 + 1e-5 * abs(numeric), (name, j)


# --- decoding with a cache ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(SWITCH_CASES))
def test_kv_cache_equals_recompute_for_every_switch(case):
    """Encode a context once (sep = its length), then feed Part B one token at a time and two at once: the logits
    equal one full forward. RoPE turns each new key by its own position before it is cached."""
    cfg = small_config(max_len=20, **SWITCH_CASES[case])
    model = perturbed(cfg, dtype=np.float32)
    rng = np.random.default_rng(2)
    B, n, T = 2, 6, 11
    tokens = rng.integers(0, cfg.vocab_size, (B, T))
    pos = np.concatenate([np.tile(np.arange(n), (B, 1)), np.full((B, T - n), 3)], axis=1)  # Part B at blank 3
    block = np.concatenate([np.zeros((B, n), int), np.tile(np.arange(1, T - n + 1), (B, 1))], axis=1)
    with minglm.no_grad():
        full = model(tokens, pos, block, np.full(B, n)).numpy()
        cache = KVCache(model, B, 16)
        parts = [model(tokens[:, :n], pos[:, :n], block[:, :n], np.full(B, n), cache=cache).numpy()]
        for t in range(n, T - 2):
            parts.append(model(tokens[:, t:t + 1], pos[:, t:t + 1], block[:, t:t + 1], 0, cache=cache).numpy())
        parts.append(model(tokens[:, T - 2:], pos[:, T - 2:], block[:, T - 2:], 0, cache=cache).numpy())
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, rtol=0, atol=2e-5)


@pytest.mark.parametrize("kind", ["fast", "cached"])
@pytest.mark.parametrize("case", list(SWITCH_CASES))
def test_fill_decoders_equal_recompute_for_every_switch(case, kind):
    """``fill`` with either decoder (``GLM.infer`` or ``GLM.forward``, both with a KVCache) gives, at every step, the
    logits of one full forward over everything fed so far."""
    from minglm import generate as G
    from minglm.tokenizer import CharTokenizer

    tok = CharTokenizer.from_texts(["abcdefghijklmnopqrstuvwxyz .,!"])
    cfg = GLMConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=32, max_len=64, **SWITCH_CASES[case])
    model = perturbed(cfg, dtype=np.float32)
    _, got, ref = cached_and_recomputed(model, tok, "to be [MASK] not [sMASK] that", G.Sampling(max_new_tokens=5),
                                        np.random.default_rng(3), kind)
    assert len(got) >= 4
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5)


def test_gmask_fill_counts_on_under_rope1d_and_a_mask_fill_stays():
    """gmask_positions="continue" (GLM-130B App. B.3): Part-B tokens of a [gMASK] blank at p turn by p + block id, so
    the model equals the same weights without the rule fed those 1-D positions; a [MASK] fill keeps p."""
    from minglm.model import rope1d_positions
    from minglm.tokenizer import GMASK_ID as TOKENIZER_GMASK_ID
    from minglm.tokenizer import MASK_ID

    assert GMASK_ID == TOKENIZER_GMASK_ID  # the model's copy of the id, one layer below the tokenizer
    cont = perturbed(small_config(position="rope1d", gmask_positions="continue"))
    blank = perturbed(small_config(position="rope1d"))
    assert cont.state_dict().keys() == blank.state_dict().keys()
    blank.load_state_dict(cont.state_dict())
    for blank_id, moved in ((GMASK_ID, True), (MASK_ID, False)):
        tokens = np.array([[1, 7, 8, blank_id, 5, 9, 10]])  # [CLS] a b [blank] <sop> x y: sep 4
        pos, block, sep = np.array([[0, 1, 2, 3, 3, 3, 3]]), np.array([[0, 0, 0, 0, 1, 2, 3]]), np.array([4])
        one_d = rope1d_positions(tokens, pos, block)
        assert one_d.tolist() == ([[0, 1, 2, 3, 4, 5, 6]] if moved else pos.tolist())
        with minglm.no_grad():
            np.testing.assert_allclose(cont(tokens, pos, block, sep).numpy(), blank(tokens, one_d, block, sep).numpy(),
                                       rtol=0, atol=1e-12)
    assert GLMConfig.preset("glm-130b").gmask_positions == "continue"


@pytest.mark.parametrize("kind", ["fast", "cached"])
def test_gmask_fill_with_continued_positions_equals_recompute(kind):
    """Decoding a [gMASK] suffix under the rule: the decoders look the blank up in the cache's tokens, and every
    step equals one full forward over everything fed so far."""
    from minglm import generate as G
    from minglm.tokenizer import CharTokenizer

    tok = CharTokenizer.from_texts(["abcdefghijklmnopqrstuvwxyz .,!"])
    cfg = GLMConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=32, max_len=64, position="rope1d",
                    gmask_positions="continue")
    model = perturbed(cfg, dtype=np.float32)
    _, got, ref = cached_and_recomputed(model, tok, "to be or not [MASK] be, [gMASK]", G.Sampling(max_new_tokens=4),
                                        np.random.default_rng(3), kind)
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5)


# --- presets and bad input ----------------------------------------------------------------------------------------


def test_glm130b_preset_combines_the_switches_with_the_data_mixture():
    from minglm.config import TRAIN_PRESETS, load_config_source

    cfg = GLMConfig.preset("glm-130b", vocab_size=70)
    assert (cfg.position, cfg.norm, cfg.ffn, cfg.embedding_grad_scale, cfg.softmax_scaling) == (
        "rope1d", "deepnorm", "geglu", 0.1, True)
    preset, model, train = load_config_source("glm-130b", GLMConfig.PRESETS)
    assert preset == "glm-130b" and model["norm"] == "deepnorm" and train["objective"] == "glm-130b"
    assert TRAIN_PRESETS["glm-130b"]["objective"] == "glm-130b"


@pytest.mark.parametrize("field,value", [("position", "rope"), ("norm", "post"), ("ffn", "swiglu")])
def test_an_unknown_switch_value_names_the_field_and_the_choices(field, value):
    with pytest.raises(ValueError) as err:
        small_config(**{field: value})
    message = str(err.value)
    assert f"GLMConfig.{field}" in message and repr(value) in message
    for allowed in GLMConfig.SWITCHES[field]:
        assert allowed in message


def test_rope_refuses_head_sizes_it_cannot_pair():
    with pytest.raises(ValueError, match="head size .* 3.* divisible by 2"):
        GLMConfig(vocab_size=10, n_head=4, d_model=12, position="rope1d")
    with pytest.raises(ValueError, match="head size .* 6.* divisible by 4"):
        GLMConfig(vocab_size=10, n_head=2, d_model=12, position="rope2d")
    GLMConfig(vocab_size=10, n_head=2, d_model=12, position="rope1d")  # 6 is fine in 1-D
    with pytest.raises(ValueError, match="embedding_grad_scale"):
        small_config(embedding_grad_scale=1.5)
    with pytest.raises(ValueError, match="softmax_scaling"):
        small_config(softmax_scaling="yes")


# --- against SAT's GLM-130B model, and weight export ---------------------------------------------------------------

from pathlib import Path  # noqa: E402

from minglm import interop  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "glm130b_sat_parity.npz"


def _fixture_case(case: str):
    import json

    with np.load(FIXTURE, allow_pickle=False) as z:
        data = {k: z[k] for k in z.files if k.startswith(case + ":")}
    cfg = GLMConfig.from_dict(json.loads(str(data[f"{case}:config_json"])))
    model = GLM(cfg, np.random.default_rng(0)).eval()
    prefix = f"{case}:minglm:"
    model.load_state_dict({k[len(prefix):]: v for k, v in data.items() if k.startswith(prefix)})
    return cfg, model, {k[len(case) + 1:]: v for k, v in data.items()}


@pytest.mark.parametrize("case", ["rope1d", "rope2d"])
def test_logits_and_gradients_match_sat_glm130b(case):
    """SAT's glm130B_model.py (RoPE 1-D / 2-D, DeepNorm, GeGLU, FP32 softmax) on the same weights, float32 both."""
    cfg, model, data = _fixture_case(case)
    assert cfg.position == case and cfg.norm == "deepnorm" and cfg.ffn == "geglu" and cfg.softmax_scaling
    fig2 = (np.array([[1, 2, 8, 4, 8, 11, 5, 6, 11, 3]]), np.array([[0, 1, 2, 3, 4, 4, 4, 4, 2, 2]]),
            np.array([[0, 0, 0, 0, 0, 1, 2, 3, 1, 2]]), np.array([5]))
    with minglm.no_grad():
        np.testing.assert_allclose(model(*fig2).numpy(), data["fig2_logits"], rtol=0, atol=1e-6)
    tokens, pos, block = (np.zeros((3, 10), dtype=np.int64) for _ in range(3))
    rng = np.random.default_rng(3)  # the fixture script's padded_batch
    for b, (n, sep) in enumerate([(10, 5), (7, 4), (5, 2)]):
        tokens[b, :n] = rng.integers(1, 32, n)
        pos[b, :sep] = np.arange(sep)
        pos[b, sep:n] = rng.integers(0, sep)
        block[b, sep:n] = np.arange(1, n - sep + 1)
    logits = model.train()(tokens, pos, block, np.array([5, 4, 2]))
    np.testing.assert_allclose(logits.numpy(), data["pad_logits"], rtol=0, atol=1e-6)
    (logits * data["pad_upstream"]).sum().backward()
    for name, p in model.named_parameters():
        want = data[f"satgrad:{name}"]
        np.testing.assert_allclose(p.grad, want, rtol=0, atol=2e-6 * max(1.0, np.abs(want).max()), err_msg=name)


def test_export_to_sat_glm130b_round_trips_and_permutes_qkv_per_head():
    cfg = small_config(**SWITCH_CASES["all"])
    model = perturbed(cfg, dtype=np.float32)
    sat = interop.export_state_dict(model, "sat")
    assert "transformer.word_embeddings.weight" in sat and not any("position" in k for k in sat)
    C, hs = cfg.d_model, cfg.head_size
    ours_qkv, sat_qkv = model.state_dict()["layers.0.attention.query_key_value.weight"], \
        sat["transformer.layers.0.attention.query_key_value.weight"]
    np.testing.assert_array_equal(sat_qkv[hs:2 * hs], ours_qkv[C:C + hs])  # head 0's k follows head 0's q
    np.testing.assert_array_equal(sat_qkv[3 * hs:4 * hs], ours_qkv[hs:2 * hs])  # then head 1's q
    back = GLM(cfg, np.random.default_rng(9))
    interop.load_state_dict(back, sat)
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[name], value, err_msg=name)
    assert "GLM130B" in interop.sat_args(cfg) and "position_encoding_2d=True" in interop.sat_args(cfg)


@pytest.mark.parametrize("overrides", [dict(position="rope1d"), dict(ffn="geglu"), dict(norm="deepnorm")])
def test_export_refuses_what_sat_cannot_hold(overrides):
    model = GLM(small_config(**overrides), np.random.default_rng(0))
    with pytest.raises(ValueError, match="SAT has no model with"):
        interop.export_state_dict(model, "sat")
    with pytest.raises(ValueError, match="official THUDM/GLM layout holds GLM-1 only|SAT has no model"):
        interop.export_state_dict(model, "official")


def test_official_layout_refuses_a_glm130b_model():
    model = GLM(small_config(position="rope1d", norm="deepnorm"), np.random.default_rng(0))
    with pytest.raises(ValueError, match="GLM-1 only"):
        interop.export_state_dict(model, "official")
    assert interop.sat_model(model.config) == "GLM130B"  # with the tanh-GeLU FFN: SAT's --no-glu


def test_export_command_with_a_glm130b_run(tmp_path, capsys):
    from minglm.commands import main
    from minglm.runs import load_run

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    words = ["thou", "art", "fair", "and", "kind", "my", "lord", "the", "sea", "night"]
    for i in range(3):
        (corpus / f"doc{i}.txt").write_text("\n".join(" ".join(rng.choice(words, 8)) + "." for _ in range(60)))
    args = ["train", "--config", "glm-130b", "--corpus", str(corpus), "--out", str(tmp_path), "--name", "r",
            "--steps", "2", "--set", "model.n_layer=1", "--set", "model.d_model=32", "--set", "model.n_head=2",
            "--set", "model.position=rope2d", "--set", "seq_len=32", "--set", "batch_size=2",
            "--set", "eval_batches=1", "--set", "fill_lines=0", "--set", "plots=false", "--quiet"]
    assert main(args) == 0
    out = tmp_path / "sat.npz"
    assert main(["export", str(tmp_path / "r"), "--layout", "sat", "--out", str(out)]) == 0
    assert "SAT GLM130B" in capsys.readouterr().out
    weights = interop.load_npz(out)
    assert "transformer.layers.0.mlp.dense_h_to_4h.weight" in weights
    model, _ = load_run(tmp_path / "r")
    assert (model.config.position, model.config.norm, model.config.ffn) == ("rope2d", "deepnorm", "geglu")
    before = model.state_dict()
    interop.load(model, out)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    assert main(["export", str(tmp_path / "r"), "--layout", "official", "--out", str(tmp_path / "o.npz")]) == 2
    assert "GLM-1 only" in capsys.readouterr().err


# --- the ablation ---------------------------------------------------------------------------------------------------


def _tiny_corpus(path):
    path.mkdir()
    rng = np.random.default_rng(0)
    words = ["thou", "art", "fair", "and", "kind", "my", "lord", "the", "sea", "night", "good", "sir"]
    for i in range(4):  # the split is by document: validation needs at least one
        (path / f"doc{i}.txt").write_text("\n".join(" ".join(rng.choice(words, 8)) + "." for _ in range(120)))
    return path


def test_grad_spike_is_the_largest_jump_over_the_recent_median():
    from minglm.ablate import grad_spike

    norms = [1.0] * 30 + [5.0] + [1.0] * 10 + [float("nan"), 2.0]
    assert grad_spike(norms) == pytest.approx(5.0)
    assert grad_spike([1.0] * 5) == 1.0  # too short for a window


def test_ablate_command_on_a_few_steps(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    import json

    from minglm.commands import main

    corpus = _tiny_corpus(tmp_path / "corpus")
    out = tmp_path / "abl"
    code = main(["ablate", "--quick", "--steps", "3", "--seeds", "0,1", "--only", "glm1,glm130b-highlr",
                 "--corpus", str(corpus), "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    header = "| setting | lr | val loss (per seed) | fill exact | fill char-F1 | largest grad-norm spike | tokens/s |"
    assert header in text
    assert "GLM-1 (all off)" in text and "GLM-130B, high lr" in text
    result = json.loads((out / "ablation.json").read_text())
    assert [r["setting"] for r in result["summary"]] == ["glm1", "glm130b-highlr"]
    assert len(result["runs"]) == 4 and {r["seed"] for r in result["runs"]} == {0, 1}
    for run in result["runs"]:
        assert run["steps_done"] == 3 and math.isfinite(run["val_loss"]) and 0.0 <= run["fill_exact"] <= 1.0
        assert 0.0 <= run["fill_f1"] <= 1.0
        assert run["tokens_per_s"] > 0 and run["grad_spike"] >= 1.0
    assert result["summary"][1]["lr"] == pytest.approx(0.02)
    assert (out / "ablation.md").read_text().startswith("3 steps of the tiny config")
    assert " cores, load average " in (out / "ablation.md").read_text()  # the timing says where it was measured
    assert result["machine"]["cores"] >= 1 and all(r["run_seconds"] >= r["train_seconds"] for r in result["runs"])
    assert (out / "ablation.png").stat().st_size > 10_000
    assert main(["ablate", "--only", "nope"]) == 2
    assert "unknown setting" in capsys.readouterr().err


def test_ablate_estimate_times_a_probe_and_extrapolates(tmp_path, capsys):
    from dataclasses import replace

    from minglm import ablate
    from minglm.commands import main

    corpus = _tiny_corpus(tmp_path / "corpus")
    cfg = replace(ablate.QUICK, steps=50, corpus=str(corpus))
    est = ablate.estimate(cfg, ablate.select(["glm1"]), probe_steps=2, say=lambda *_: None)
    run = est["per_setting"][0]
    assert est["budget_minutes"] == 30 and est["fits"] == (est["minutes"] <= 30)
    assert run["seconds_per_step"] > 0 and run["run_seconds"] >= 50 * run["seconds_per_step"]
    assert est["minutes"] * 60 >= 2 * run["run_seconds"]  # two seeds
    assert main(["ablate", "--estimate", "--quick", "--steps", "5", "--only", "glm1", "--corpus", str(corpus)]) == 0
    assert "budget 30 min" in capsys.readouterr().out


def test_plot_ablation_draws_bars_dots_and_diverged_seeds():
    import io
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import viz

    def run(setting, seed, loss):
        fill = 0.1 if math.isfinite(loss) else float("nan")
        return {"setting": setting, "seed": seed, "val_loss": loss, "fill_exact": fill, "fill_f1": fill,
                "grad_spike": 2.0, "tokens_per_s": 5000.0}

    runs = [run("a", 0, 2.1), run("a", 1, 2.2), run("b", 0, float("nan")), run("b", 1, 2.6)]
    summary = [{"setting": "a", "label": "GLM-1", "unstable": False, "val_loss": 2.15, "fill_exact": 0.1,
                "fill_f1": 0.1, "grad_spike": 2.0, "tokens_per_s": 5000.0},
               {"setting": "b", "label": "GLM-1, high lr", "unstable": True, "val_loss": 2.6, "fill_exact": 0.1,
                "fill_f1": 0.1, "grad_spike": 2.0, "tokens_per_s": 5000.0}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = viz.plot_ablation({"summary": summary, "runs": runs, "config": {"steps": 5, "seeds": [0, 1]}})
        fig.savefig(io.BytesIO(), format="png")
    axes = fig.axes
    assert len(axes) == 5 and [t.get_text() for t in axes[0].get_yticklabels()] == ["GLM-1", "GLM-1, high lr"]
    assert len(axes[0].patches) == 2  # one bar per setting
    with pytest.raises(ValueError, match="run_ablation"):
        viz.plot_ablation({"runs": []})
