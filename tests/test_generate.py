"""Tests for blank-infilling decoding (minglm/generate.py, docs/decoding.md).

The decoding protocol is checked against hand-worked ids with a scripted decoder (it records what is fed and
answers with chosen tokens); the numbers are checked by replaying every fed token through one full forward of the
model without a cache, with GLM's 2D positions and mask, and comparing the logits at every step.
"""

from __future__ import annotations

import numpy as np
import pytest

from minglm import generate as G
from minglm.commands import fill as fill_command
from minglm.model import GLM, GLMConfig
from minglm.runs import save_run
from minglm.tokenizer import CharTokenizer

TOK = CharTokenizer.from_texts(["abcdefghijklmnopqrstuvwxyz .,!"])


def small_model(seed: int = 0, **overrides) -> GLM:
    cfg = dict(vocab_size=TOK.vocab_size, n_layer=2, n_head=2, d_model=32, max_len=64)
    cfg.update(overrides)
    model = GLM(GLMConfig(**cfg), np.random.default_rng(seed))  # random weights: near-uniform, varied samples
    model.eval()
    return model


class ScriptedDecoder:
    """Records every prefill/step and answers each step with the next token of a script (a large logit)."""

    def __init__(self, script: list[int], vocab: int):
        self.script, self.vocab = list(script), vocab
        self.prefilled: list[int] = []
        self.fed: list[tuple[int, int, int]] = []

    def prefill(self, ids):
        self.prefilled = list(np.asarray(ids).tolist())
        return np.zeros((len(ids), self.vocab), dtype=np.float32)

    def step(self, token, pos, block):
        self.fed.append((int(token), int(pos), int(block)))
        logits = np.zeros(self.vocab, dtype=np.float32)
        logits[self.script.pop(0)] = 10.0
        return logits


def ids(text: str) -> list[int]:
    return TOK.encode(text)


# --- the context --------------------------------------------------------------------------------------------------


def test_context_framing():
    a, b = ids("a")[0], ids("b")[0]
    ctx, masks, appended = G.build_context(TOK, "a[MASK]b")
    assert ctx.tolist() == [TOK.cls_id, a, TOK.mask_id, b, TOK.eos_id] and masks == [2] and not appended
    ctx, masks, appended = G.build_context(TOK, "ab[gMASK]")  # ends with [gMASK]: no <eos>
    assert ctx.tolist() == [TOK.cls_id, a, b, TOK.gmask_id] and masks == [3] and not appended
    ctx, masks, appended = G.build_context(TOK, "ab")  # no blank: [gMASK] appended, no <eos>
    assert ctx.tolist() == [TOK.cls_id, a, b, TOK.gmask_id] and masks == [3] and appended
    ctx, masks, _ = G.build_context(TOK, "[sMASK]a[MASK]")
    assert ctx.tolist() == [TOK.cls_id, TOK.smask_id, a, TOK.mask_id, TOK.eos_id] and masks == [1, 3]


# --- the protocol, hand-worked -----------------------------------------------------------------------------------


def test_one_blank_positions_and_block_ids():
    """[CLS] a [MASK] b <eos>: <sop> at (2, 1), then x at (2, 2), y at (2, 3); <eop> is never fed."""
    x, y = ids("x")[0], ids("y")[0]
    dec = ScriptedDecoder([x, y, TOK.eop_id], TOK.vocab_size)
    r = G.fill(small_model(), TOK, "a[MASK]b", G.Sampling(greedy=True, max_new_tokens=10), decoder=lambda m, c: dec)
    assert dec.prefilled == [TOK.cls_id, ids("a")[0], TOK.mask_id, ids("b")[0], TOK.eos_id]
    assert dec.fed == [(TOK.sop_id, 2, 1), (x, 2, 2), (y, 2, 3)]
    assert r.fills == ["xy"] and r.stop_reasons == ["eop"]
    assert r.filled_text == "axyb" and r.marked_text == "a«xy»b"
    assert r.position_ids == [0, 1, 2, 3, 4, 2, 2, 2] and r.block_position_ids == [0, 0, 0, 0, 0, 1, 2, 3]
    assert [(s.token_in, s.position_id, s.block_id, s.token_out) for s in r.steps] == [
        (TOK.sop_id, 2, 1, x), (x, 2, 2, y), (y, 2, 3, TOK.eop_id)]
    assert r.steps[0].top[0] == (x, pytest.approx(r.steps[0].top[0][1])) and len(r.steps[0].top) == 5


def test_two_blanks_in_ascending_order_and_eos_stops():
    """Context [CLS] a [MASK] b [sMASK] <eos> (blanks at 2 and 4). The second blank's <sop> is at (4, 1) and is fed
    after the first fill (the cache keeps it); <eos> ends a blank like <eop> and is not fed either."""
    x, y, z = ids("x")[0], ids("y")[0], ids("z")[0]
    dec = ScriptedDecoder([x, TOK.eop_id, y, z, TOK.eos_id], TOK.vocab_size)
    r = G.fill(small_model(), TOK, "a[MASK]b[sMASK]", G.Sampling(greedy=True), decoder=lambda m, c: dec)
    assert dec.fed == [(TOK.sop_id, 2, 1), (x, 2, 2), (TOK.sop_id, 4, 1), (y, 4, 2), (z, 4, 3)]
    assert r.fills == ["x", "yz"] and r.stop_reasons == ["eop", "eos"]
    assert r.marked_text == "a«x»b«yz»"
    assert r.tokens[-5:] == [TOK.sop_id, x, TOK.sop_id, y, z]


def test_max_new_tokens_and_appended_gmask():
    x = ids("x")[0]
    dec = ScriptedDecoder([x] * 3, TOK.vocab_size)
    r = G.fill(small_model(), TOK, "ab", G.Sampling(greedy=True, max_new_tokens=3), decoder=lambda m, c: dec)
    assert dec.fed == [(TOK.sop_id, 3, 1), (x, 3, 2), (x, 3, 3)]  # the third x is sampled but not fed
    assert r.fills == ["xxx"] and r.stop_reasons == ["max_new_tokens"] and r.marked_text == "ab«xxx»"


# --- the numbers: cached decoding equals full recomputation -----------------------------------------------------


class Recording:
    def __init__(self, inner):
        self.inner, self.logits = inner, []

    def prefill(self, ids):
        out = self.inner.prefill(ids)
        self.logits.extend(out)
        return out

    def step(self, token, pos, block):
        out = self.inner.step(token, pos, block)
        self.logits.append(out)
        return out


@pytest.mark.parametrize("kind", ["fast", "cached"])
def test_cached_equals_recompute_several_blanks(kind):
    model = small_model(seed=1)
    rec = []

    def factory(m, capacity):
        rec.append(Recording(G.make_decoder(m, capacity, kind)))
        return rec[-1]

    s = G.Sampling(temperature=1.0, max_new_tokens=6)
    r = G.fill(model, TOK, "to be [MASK] not [sMASK] that is the [MASK]", s, np.random.default_rng(3),
               decoder=factory)
    n_steps = len(r.tokens) - r.context_len
    assert len(r.fills) == 3 and n_steps >= 6
    assert len({t for f in r.fill_ids for t in f}) >= 3  # the fills are varied, not one repeated token
    ref = G.recompute_logits(model, r.tokens, r.position_ids, r.block_position_ids, sep=r.context_len)
    got = np.stack(rec[0].logits)
    assert got.shape == ref.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    # and a later blank really sees the earlier fill: a different first fill changes the second blank's logits
    alt = list(r.tokens)
    first = r.context_len + 1  # the first generated token fed back
    alt[first] = (alt[first] + 1 - 8) % (TOK.vocab_size - 8) + 8
    ref2 = G.recompute_logits(model, alt, r.position_ids, r.block_position_ids, sep=r.context_len)
    second_sop = r.context_len + len(r.fill_ids[0]) + 1
    assert np.abs(ref2[second_sop] - ref[second_sop]).max() > 1e-4


def test_fast_and_model_cache_agree_and_recompute_is_not_causal_over_context():
    """The context is bidirectional: recomputing with sep = 0 (all causal) gives different context logits."""
    model = small_model(seed=2)
    ctx, _, _ = G.build_context(TOK, "hello [MASK] world")
    a = G.make_decoder(model, 64, "fast").prefill(ctx)
    b = G.make_decoder(model, 64, "cached").prefill(ctx)
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    n = len(ctx)
    causal = G.recompute_logits(model, ctx, np.arange(n), np.zeros(n, dtype=np.int64), sep=0)
    assert np.abs(causal[0] - a[0]).max() > 1e-4


def test_float64_model_is_exact():
    model = small_model(seed=4).astype(np.float64)
    rec = []
    r = G.fill(model, TOK, "a [MASK] b [MASK] c", G.Sampling(temperature=2.0, max_new_tokens=5),
               np.random.default_rng(0), decoder=lambda m, c: rec.append(Recording(G.CachedDecoder(m, c))) or rec[-1])
    ref = G.recompute_logits(model, r.tokens, r.position_ids, r.block_position_ids, sep=r.context_len)
    np.testing.assert_allclose(np.stack(rec[0].logits), ref, rtol=0, atol=1e-10)


# --- sampling --------------------------------------------------------------------------------------------------


def test_greedy_is_deterministic_and_seeds_repeat():
    model = small_model(seed=5)
    g1 = G.fill(model, TOK, "the [MASK] sat", G.Sampling(greedy=True, max_new_tokens=8))
    g2 = G.fill(model, TOK, "the [MASK] sat", G.Sampling(greedy=True, max_new_tokens=8), decoder="cached")
    assert g1.fill_ids == g2.fill_ids
    for st in g1.steps:  # greedy takes the best candidate every time
        assert st.token_out == st.top[0][0]
    s = G.Sampling(temperature=1.5, max_new_tokens=8)
    a = G.fill(model, TOK, "the [MASK] sat", s, np.random.default_rng(7))
    b = G.fill(model, TOK, "the [MASK] sat", s, np.random.default_rng(7))
    assert a.fill_ids == b.fill_ids
    others = [G.fill(model, TOK, "the [MASK] sat", s, np.random.default_rng(k)).fill_ids for k in range(8, 12)]
    assert any(o != a.fill_ids for o in others)


def test_sampling_probs_top_k_top_p():
    logits = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05]))
    p = G.sampling_probs(logits, G.Sampling(top_k=2))
    np.testing.assert_allclose(p, [0.5 / 0.7, 0.2 / 0.7, 0, 0, 0])
    p = G.sampling_probs(logits, G.Sampling(top_p=0.8))  # 0.5 + 0.2 = 0.7 < 0.8, so 0.15 is kept too
    np.testing.assert_allclose(p, [0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0])
    p = G.sampling_probs(logits, G.Sampling(top_p=0.5))  # the first token alone reaches 0.5
    np.testing.assert_allclose(p, [1, 0, 0, 0, 0])
    p = G.sampling_probs(logits, G.Sampling(temperature=1e-3))
    assert p[0] > 0.999
    rng = np.random.default_rng(0)
    draws = [G.choose_token(logits, G.Sampling(top_k=2), rng) for _ in range(400)]
    assert set(draws) == {0, 1} and 0.6 < draws.count(0) / 400 < 0.85
    with pytest.raises(ValueError, match="temperature"):
        G.Sampling(temperature=0.0)
    with pytest.raises(ValueError, match="rng"):
        G.fill(small_model(), TOK, "a[MASK]", G.Sampling(greedy=False))


# --- bad input ------------------------------------------------------------------------------------------------


def test_overlong_context_is_a_clear_error():
    model = small_model(max_len=16)
    with pytest.raises(ValueError, match="longer than the model's max_len=16"):
        G.fill(model, TOK, "a" * 20 + "[MASK]", G.Sampling(greedy=True))
    with pytest.raises(ValueError, match="block ids"):
        G.fill(model, TOK, "a[MASK]", G.Sampling(greedy=True, max_new_tokens=17))


def test_fill_command(tmp_path, capsys):
    model = small_model(seed=6)
    run = tmp_path / "run"
    save_run(model, TOK, run, step=20)
    ref = G.fill(model, TOK, "x [MASK] y", G.Sampling(greedy=True, max_new_tokens=5))
    assert fill_command.main([str(run), "x [MASK] y", "--greedy", "--max-len", "5", "--steps"]) == 0
    out = capsys.readouterr().out
    assert ref.marked_text in out and "pos" in out and "block" in out
    assert len(out.strip().splitlines()) >= 3
    assert fill_command.main([str(run / "ckpt" / "step_20.npz"), "x [MASK] y", "--seed", "1", "--top-k", "3"]) == 0
    assert fill_command.main([str(tmp_path / "nope"), "a [MASK]"]) == 2
    assert "no such run folder" in capsys.readouterr().err


def test_bench_smoke(capsys):
    from minglm.bench import generate as bench

    args = ["--context", "16", "--new", "8", "--layers", "1", "--d-model", "32", "--heads", "2", "--repeat", "1",
            "--profile"]
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    assert out.count("| yes |") == 3 and "| NO |" not in out and "python / other" in out


@pytest.mark.parametrize("kind", ["fast", "cached"])
def test_a_step_out_of_range_is_a_clear_error(kind):
    """The fast step skips the model's array checks; its own checks still refuse ids that would index silently."""
    model = small_model(max_len=16)
    dec = G.make_decoder(model, 12, kind)
    dec.prefill(np.array([TOK.cls_id, TOK.mask_id, TOK.eos_id]))
    for bad in ((TOK.sop_id, 17, 1), (TOK.sop_id, 1, -1), (TOK.vocab_size, 1, 1)):
        with pytest.raises(ValueError, match="out of range"):
            dec.step(*bad)


# --- beam search ------------------------------------------------------------------------------------------------


def _log_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    return z - (z.max() + np.log(np.exp(z - z.max()).sum()))


def test_a_full_width_beam_finds_the_most_likely_short_fill():
    # with as many beams as ids and two steps, every fill of at most one token is scored in full; the beam's answer
    # must be the best of them by a brute-force recompute (log p(t) + log p(<eop> | t), or the empty fill)
    model = small_model(seed=2)
    text = "to be or [MASK] to be"
    context, (m,), _ = G.build_context(TOK, text)
    n, sop, eop = len(context), TOK.sop_id, TOK.eop_id
    first = _log_softmax(G.recompute_logits(model, [*context, sop], [*range(n), m], [0] * n + [1], sep=n)[-1])
    best, best_score = [], first[eop]
    for t in range(8, TOK.vocab_size):
        row = G.recompute_logits(model, [*context, sop, t], [*range(n), m, m], [0] * n + [1, 2], sep=n)[-1]
        score = first[t] + _log_softmax(row)[eop]
        if score > best_score:
            best, best_score = [t], score
    r = G.fill(model, TOK, text, G.Sampling(greedy=True, max_new_tokens=2, beams=TOK.vocab_size), n_top=0)
    assert r.fill_ids[0] == best


def test_after_a_beam_fill_the_cache_holds_the_winner():
    model = small_model(seed=3)
    s = G.Sampling(greedy=True, max_new_tokens=5, beams=3)
    r = G.fill(model, TOK, "to be [MASK] not to [MASK] that", s, n_top=0)
    assert len(r.fill_ids) == 2
    # the second blank, searched again from a cache that holds the context and the first winner, gives the same
    context, (m1, m2), _ = G.build_context(TOK, "to be [MASK] not to [MASK] that")
    dec = G.make_decoder(model, len(context) + 12)
    dec.prefill(context)
    fed = [TOK.sop_id, *r.fill_ids[0]] if r.stop_reasons[0] != "max_new_tokens" else [TOK.sop_id, *r.fill_ids[0][:-1]]
    dec.feed(fed, [m1] * len(fed), list(range(1, len(fed) + 1)))
    assert G.beam_search(dec, TOK, m2, s)[0] == r.fill_ids[1]
    # and the fed tokens FillResult lists are what the cache saw (a replay can recompute them)
    assert len(r.tokens) == len(r.position_ids) == len(r.block_position_ids)


def test_beams_need_greedy_and_a_positive_count():
    with pytest.raises(ValueError, match="greedy"):
        G.Sampling(beams=2)
    with pytest.raises(ValueError, match="beams"):
        G.Sampling(greedy=True, beams=0)
