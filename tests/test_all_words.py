"""Every word a blank at once (TrainConfig.all_words) and the slot a Part-B token cannot see (hide_own_token).

Two deviations from GLM that go together (README, "What was tried", round 11): the data leaves every word in Part A
and asks for each of them in Part B, and the model hides from each Part-B token the Part-A token at its own
position id. With one layer nothing else can hand a word on, so no answer is in view; with two it is, and the
train command refuses that combination, unless Part A is never transformed (raw_part_a, round 12): then every layer
reads Part A's embeddings, and a Part-B token no other span's Part-B tokens, and no depth hands a word on."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minglm.commands.train import _check_all_words
from minglm.config import TrainConfig
from minglm.data.objectives import make_objective
from minglm.data.samplers import WordSpanSampler, word_edge_tables
from minglm.generate import CachedDecoder, recompute_logits
from minglm.masks import glm_mask, own_token_mask
from minglm.model import GLM, GLMConfig, glm_loss
from minglm.tokenizer import CLS_ID, EOP_ID, EOS_ID, MASK_ID, SOP_ID, WordTokenizer

TEXT = ("To be, or not to be: that is the question.\nWhether 'tis nobler in the mind to suffer\n"
        "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles,\n"
        "And by opposing end them. To die, to sleep;\nNo more; and by a sleep to say we end\n")


@pytest.fixture(scope="module")
def tok():
    return WordTokenizer.train([TEXT * 3], vocab_size=8 + 256 + 40)  # some words whole, the rest in bytes


def _model(tok, n_layer=1, hide=True, position="rope1d", seed=0, raw=False):
    cfg = GLMConfig(vocab_size=tok.vocab_size, n_layer=n_layer, n_head=2, d_model=16, max_len=96,
                    position=position, hide_own_token=hide, raw_part_a=raw)
    return GLM(cfg, np.random.default_rng(seed)).astype(np.float64)


def test_own_token_mask_by_hand():
    # Part A: [CLS] a [MASK] b <eos> at positions 0..4 (block 0); Part B: <sop> w, both at position 2 (blocks 1, 2)
    pos = np.array([[0, 1, 2, 3, 4, 2, 2]])
    block = np.array([[0, 0, 0, 0, 0, 1, 2]])
    own = own_token_mask(np, pos, block, pos, block)[0, 0]  # (7, 7)
    hidden = ~own
    assert hidden.sum() == 2 and hidden[5, 2] and hidden[6, 2]  # the two Part-B tokens lose the blank's slot only
    allowed = glm_mask(np, [5], 7)[0, 0] & own
    assert allowed[5].tolist() == [True, True, False, True, True, True, False]
    assert allowed[:5, :5].all()  # Part A still sees all of Part A


def test_other_spans_mask_by_hand():
    # Part A: [CLS] [MASK] a [MASK] <eos>; Part B: <sop> w of the blank at 1, then <sop> of the blank at 3
    pos = np.array([[0, 1, 2, 3, 4, 1, 1, 3]])
    block = np.array([[0, 0, 0, 0, 0, 1, 2, 1]])
    hidden = ~own_token_mask(np, pos, block, pos, block, own_slot=False, other_spans=True)[0, 0]  # (8, 8)
    assert sorted(zip(*np.nonzero(hidden))) == [(5, 7), (6, 7), (7, 5), (7, 6)]  # the spans lose each other only
    both = ~own_token_mask(np, pos, block, pos, block, other_spans=True)[0, 0]
    assert both.sum() == 7 and both[5, 1] and both[6, 1] and both[7, 3]
    allowed = glm_mask(np, [5], 8)[0, 0] & ~both
    assert allowed[7].tolist() == [True, True, True, False, True, False, False, True]  # Part A but its slot; itself


@pytest.mark.parametrize("position", ["rope1d", "learned2d"])
@pytest.mark.parametrize("n_layer, raw", [(1, False), (2, False), (2, True), (3, True)])
def test_a_part_b_token_never_reads_its_own_slot(tok, position, n_layer, raw):
    """In one layer, the <sop> of a blank at slot p gives the same logits whatever token sits at p in Part A, and
    different ones when another Part-A token changes; without the switch the token at p is read, and with two
    layers it is read through its neighbours, which saw it in the first, unless Part A stays raw."""
    ctx = [CLS_ID, *tok.encode(" to be or not to be that is"), EOS_ID]
    n, p = len(ctx), 5
    seq = lambda c: (c + [SOP_ID], list(range(n)) + [p], [0] * n + [1], n)  # noqa: E731
    for hide in (True, False):
        model = _model(tok, n_layer, hide, position, raw=raw)
        base = recompute_logits(model, *seq(ctx))[n]
        swapped = list(ctx)
        swapped[p] = MASK_ID
        other = list(ctx)
        other[p + 1] = MASK_ID
        moved = np.abs(recompute_logits(model, *seq(swapped))[n] - base).max()
        assert (moved == 0.0) == (hide and (n_layer == 1 or raw)), (hide, moved)
        assert np.abs(recompute_logits(model, *seq(other))[n] - base).max() > 1e-6


@pytest.mark.parametrize("raw", [False, True])
@pytest.mark.parametrize("fast", [True, False])
def test_cached_decoding_hides_the_slot_as_the_full_forward_does(tok, fast, raw):
    """Two blanks filled token by token with the cache give the logits of one full forward of the whole sequence
    (the cache keeps every key's position and block ids for the mask; with raw_part_a, the cached Part A came
    through every layer as its embeddings, and the second blank's tokens do not see the first's)."""
    model = _model(tok, n_layer=2, raw=raw)
    ctx = [CLS_ID, *tok.encode(" to"), MASK_ID, *tok.encode(" or not to be"), MASK_ID, EOS_ID]
    n = len(ctx)
    m1, m2 = ctx.index(MASK_ID), n - 2
    fill = [(SOP_ID, m1, 1), (tok.encode(" be")[0], m1, 2), (SOP_ID, m2, 1), (tok.encode(" the")[0], m2, 2)]
    tokens = ctx + [t for t, _, _ in fill]
    pos = list(range(n)) + [q for _, q, _ in fill]
    block = [0] * n + [b for _, _, b in fill]
    want = recompute_logits(model, tokens, pos, block, n)
    dec = CachedDecoder(model, capacity=len(tokens), fast=fast)
    got = [dec.prefill(np.array(ctx))[-1]] + [dec.step(t, q, b) for t, q, b in fill]
    np.testing.assert_allclose(np.stack(got), want[n - 1:], rtol=0, atol=1e-10)


def _units_reference(ids, first, joins, letter):
    """Word units one by one: token i starts a unit unless it continues the word before it."""
    starts = [i == 0 or not (first[ids[i]] and joins[ids[i - 1]]) for i in range(len(ids))]
    out = []
    for i in range(1, len(ids) - 1):
        one_token = i + 1 == len(ids) or starts[i + 1]
        if starts[i] and letter[ids[i]] and one_token:
            out.append([i, i + 1])
    return np.array(out, dtype=np.int64).reshape(-1, 2)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 300), st.integers(2, 40)), min_size=1, max_size=6))
def test_every_word_is_each_one_token_word_of_its_window(cuts):
    tok = WordTokenizer.train([TEXT * 3], vocab_size=8 + 256 + 40)
    tables = word_edge_tables(tok)
    ids = np.array(tok.encode(TEXT))
    windows = [np.array([CLS_ID, *ids[a:a + k]]) for a, k in cuts]
    got = WordSpanSampler(*tables, known_only=True).every_word(windows)
    assert len(got) == len(windows)
    for w, spans in zip(windows, got):
        np.testing.assert_array_equal(spans, _units_reference(w, *tables))


def _all_words_batch(tok, share=1.0, seed=0):
    obj = make_objective("glm-base", tok, span_unit="known_word", span_lambda=0.25, mask_ratio=0.5,
                         all_words=share)
    ids = np.array(tok.encode(TEXT))
    windows = [np.array([CLS_ID, *ids[a:a + 20], EOS_ID]) for a in (0, 7, 31)]
    return obj, windows, obj.make_batch(windows, np.random.default_rng(seed))


def test_an_all_words_batch_keeps_part_a_and_asks_for_every_word(tok):
    obj, windows, batch = _all_words_batch(tok)
    spans = obj.sampler.every_word(windows)
    for b, (w, s) in enumerate(zip(windows, spans)):
        n = len(w)
        assert batch.sep[b] == n and len(s) > 3
        np.testing.assert_array_equal(batch.tokens[b, :n], w)  # Part A whole: no [MASK] left in it
        part_b = slice(n, n + 2 * len(s))
        assert sorted(batch.position_ids[b, part_b][::2].tolist()) == s[:, 0].tolist()  # one <sop> per word slot
        assert (batch.tokens[b, part_b][::2] == SOP_ID).all()
        assert (batch.block_position_ids[b, part_b] == np.tile([1, 2], len(s))).all()
        targets = batch.targets[b, part_b]
        # each <sop> asks for the word at its slot, and the word for <eop>
        np.testing.assert_array_equal(targets[::2], w[batch.position_ids[b, part_b][::2]])
        assert (targets[1::2] == EOP_ID).all() and batch.loss_mask[b, part_b].sum() == 2 * len(s)


def test_the_share_of_all_words_batches(tok):
    obj = make_objective("glm-base", tok, span_unit="known_word", span_lambda=0.25, mask_ratio=0.5, all_words=0.3)
    ids = np.array(tok.encode(TEXT))
    windows = [np.array([CLS_ID, *ids[:20], EOS_ID])]
    rng = np.random.default_rng(0)
    whole = [bool((obj.make_batch(windows, rng).tokens[0, :22] != MASK_ID).all()) for _ in range(2000)]
    assert 0.26 < np.mean(whole) < 0.34


@pytest.mark.parametrize("n_layer, raw", [(1, False), (2, False), (2, True), (3, True)])
def test_one_layer_reads_no_answer_and_two_layers_would(tok, n_layer, raw):
    """In an all-words batch, replacing a word in Part A leaves the loss rows that ask for it unchanged in a
    one-layer model; a second layer carries the word to its neighbours first (and to the Part-B tokens of the
    spans before, which later spans read), the leak the train command refuses. With raw_part_a no slot of any
    sample leaks at any depth, and the loss's rows alone (the trainer's path) give the full forward's logits."""
    _, windows, batch = _all_words_batch(tok)
    model = _model(tok, n_layer, raw=raw)
    args = (batch.position_ids, batch.block_position_ids, batch.sep)
    base = model(batch.tokens, *args).data
    rows = np.flatnonzero(batch.block_position_ids.reshape(-1) > 0)
    np.testing.assert_array_equal(model(batch.tokens, *args, rows=rows).data, base.reshape(-1, base.shape[-1])[rows])
    np.testing.assert_allclose(model.infer(batch.tokens, *args), base, rtol=0, atol=1e-12)
    probs = model.attention_probs(batch.tokens, *args, layer=n_layer - 1)  # the plots' path through the layers
    moved = 0.0
    for b in range(batch.tokens.shape[0]):
        for slot in range(1, int(batch.sep[b]) - 1):
            tokens = batch.tokens.copy()
            tokens[b, slot] = MASK_ID
            changed = model(tokens, *args).data
            asks = np.flatnonzero((batch.position_ids[b] == slot) & (batch.block_position_ids[b] > 0))  # <sop>, word
            if len(asks):
                moved = max(moved, np.abs(changed[b, asks] - base[b, asks]).max())
                seen = model.attention_probs(tokens, *args, layer=n_layer - 1)[b, :, asks]
                moved = max(moved, np.abs(seen - probs[b, :, asks]).max())
    assert (moved == 0.0) == (n_layer == 1 or raw), moved


@pytest.mark.parametrize("n_layer, raw, layer", [(1, False, 0), (2, True, 0), (2, True, 1)])
def test_gradients_through_the_hidden_slot(tok, n_layer, raw, layer):
    """float64 central differences of GLM's loss on an all-words batch against backward, for 40 elements of a
    layer's QKV weight (the mask decides which scores reach it; with raw_part_a the first layer's gradient comes
    only through the Part-B rows that go on, the rest of its rows being put back to the embeddings)."""
    _, _, batch = _all_words_batch(tok)
    model = _model(tok, n_layer, raw=raw)
    loss = glm_loss(model, batch)
    loss.backward()
    w = model.layers[layer].attention.query_key_value.weight
    grad = w.grad.copy()
    rng = np.random.default_rng(3)
    eps = 1e-6
    for idx in zip(*[rng.integers(0, s, 40) for s in w.shape]):
        old = w.data[idx]
        w.data[idx] = old + eps
        up = float(glm_loss(model, batch).item())
        w.data[idx] = old - eps
        down = float(glm_loss(model, batch).item())
        w.data[idx] = old
        assert abs((up - down) / (2 * eps) - grad[idx]) < 1e-7 + 1e-5 * abs(grad[idx])


def test_bad_settings_name_the_field(tok):
    with pytest.raises(ValueError, match="TrainConfig.all_words"):
        TrainConfig(all_words=1.5)
    with pytest.raises(ValueError, match="known_word"):
        make_objective("glm-base", tok, span_unit="word", all_words=0.5)
    with pytest.raises(ValueError, match="GLMConfig.hide_own_token"):
        GLMConfig(hide_own_token="yes")
    with pytest.raises(ValueError, match="GLMConfig.raw_part_a must be True or False"):
        GLMConfig(raw_part_a=1)
    with pytest.raises(ValueError, match="GLMConfig.raw_part_a .* gmask_positions='blank'"):
        GLMConfig(position="rope1d", gmask_positions="continue", raw_part_a=True)
    with pytest.raises(ValueError, match="n_layer=1 or raw_part_a=true"):
        _check_all_words(TrainConfig(all_words=0.9), GLMConfig(n_layer=2, hide_own_token=True))
    with pytest.raises(ValueError, match="hide_own_token=true"):
        _check_all_words(TrainConfig(all_words=0.9), GLMConfig(n_layer=1))
    with pytest.raises(ValueError, match="hide_own_token=true"):
        _check_all_words(TrainConfig(all_words=0.9), GLMConfig(n_layer=2, raw_part_a=True))
    _check_all_words(TrainConfig(all_words=0.9), GLMConfig(n_layer=1, hide_own_token=True))
    _check_all_words(TrainConfig(all_words=0.9), GLMConfig(n_layer=2, hide_own_token=True, raw_part_a=True))
    _check_all_words(TrainConfig(), GLMConfig(n_layer=3))


def test_the_switch_is_left_out_of_a_default_config():
    assert "hide_own_token" not in GLMConfig().to_dict() and "raw_part_a" not in GLMConfig().to_dict()
    assert GLMConfig.from_dict(GLMConfig(raw_part_a=True).to_dict()).raw_part_a
    assert GLMConfig.preset("course").to_dict()["hide_own_token"] is True
    assert GLMConfig.from_dict(GLMConfig.preset("course").to_dict()).hide_own_token


def test_sat_export_refuses_the_hidden_slot():
    from minglm import interop

    assert interop.sat_model(GLMConfig()) == "GLMModel"
    with pytest.raises(ValueError, match="hide_own_token"):
        interop.sat_model(GLMConfig(hide_own_token=True))
    with pytest.raises(ValueError, match="raw_part_a"):
        interop.sat_model(GLMConfig(raw_part_a=True))
