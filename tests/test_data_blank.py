"""Known-answer tests for blank infilling: docs/figure2.md §1-§5, printed by the official code."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from known_answers import FIG2_MASK

from minglm.data import (
    Batch,
    blank_infill,
    choose_sentences,
    collate,
    dense_mask,
    describe,
    draw_gmask_bound,
    gmask_prefix,
    make_objective,
    paper_view,
    place_spans,
    sentence_spans,
)
from minglm.data.blank import infill_rows, part_b_orders
from minglm.tokenizer import CLS_ID, EOP_ID, EOS_ID, GMASK_ID, MASK_ID, SMASK_ID, SOP_ID

X = {i: 10 + i for i in range(1, 7)}  # x1..x6 as ids 11..16
x1, x2, x3, x4, x5, x6 = (X[i] for i in range(1, 7))
M, S, E, G, SM = MASK_ID, SOP_ID, EOP_ID, GMASK_ID, SMASK_ID
CLS, EOS = CLS_ID, EOS_ID
TEXT = [CLS, x1, x2, x3, x4, x5, x6, EOS]  # [CLS] x1..x6 <eos>


class ScriptedRng:
    """Stands in for numpy's Generator with scripted answers, like the reference's scripted `random.Random`."""

    def __init__(self, random=(), integers=(), permutation=None):
        self._random, self._integers, self._perm = list(random), list(integers), permutation

    def random(self, size=None):
        return self._random.pop(0)

    def integers(self, lo, hi=None, size=None):
        out = [self._integers.pop(0) for _ in range(size or 1)]
        return np.array(out) if size is not None else out[0]

    def permutation(self, n):
        return np.arange(n) if self._perm is None else np.asarray(self._perm)


def assert_sample(s, tokens, targets, loss, pos, block, sep):
    np.testing.assert_array_equal(s.tokens, tokens)
    np.testing.assert_array_equal(s.targets, targets)
    np.testing.assert_array_equal(s.loss_mask, loss)
    np.testing.assert_array_equal(s.position_ids, pos)
    np.testing.assert_array_equal(s.block_position_ids, block)
    assert s.sep == sep
    assert s.tokens.dtype == np.int64 and s.loss_mask.dtype == np.float32


def test_figure2_code_view_8_2():
    s = blank_infill([x1, x2, x3, x4, x5, x6], [(2, 3), (4, 6)], order=[1, 0])
    assert_sample(s,
                  tokens=[x1, x2, M, x4, M, S, x5, x6, S, x3],
                  targets=[x1, x2, M, x4, M, x5, x6, E, x3, E],
                  loss=[0, 0, 0, 0, 0, 1, 1, 1, 1, 1],
                  pos=[0, 1, 2, 3, 4, 4, 4, 4, 2, 2],
                  block=[0, 0, 0, 0, 0, 1, 2, 3, 1, 2],
                  sep=5)


def test_figure2_paper_view_8_1():
    for s in (blank_infill([x1, x2, x3, x4, x5, x6], [(2, 3), (4, 6)], order=[1, 0]),
              blank_infill(TEXT, [(3, 4), (5, 7)], order=[1, 0])):
        pv = paper_view(s)
        np.testing.assert_array_equal(pv.tokens, [x1, x2, M, x4, M, S, x5, x6, S, x3])
        np.testing.assert_array_equal(pv.position_ids, [1, 2, 3, 4, 5, 5, 5, 5, 3, 3])
        np.testing.assert_array_equal(pv.block_position_ids, [0, 0, 0, 0, 0, 1, 2, 3, 1, 2])
        np.testing.assert_array_equal(pv.targets, [-1, -1, -1, -1, -1, x5, x6, E, x3, E])
        assert pv.sep == 5


def test_real_framing_8_3():
    s = blank_infill(TEXT, [(5, 7), (3, 4)], order=[1, 0])  # spans given in any order; order indexes text order
    assert_sample(s,
                  tokens=[CLS, x1, x2, M, x4, M, EOS, S, x5, x6, S, x3],
                  targets=[CLS, x1, x2, M, x4, M, EOS, x5, x6, E, x3, E],
                  loss=[0] * 7 + [1] * 5,
                  pos=[0, 1, 2, 3, 4, 5, 6, 5, 5, 5, 3, 3],
                  block=[0] * 7 + [1, 2, 3, 1, 2],
                  sep=7)


def test_gmask_prefix_branch_8_4():
    s = gmask_prefix(TEXT, 4)
    assert_sample(s,
                  tokens=[CLS, x1, x2, x3, G, S, x4, x5, x6],
                  targets=[CLS, x1, x2, x3, G, x4, x5, x6, EOS],
                  loss=[0, 0, 0, 0, 0, 1, 1, 1, 1],
                  pos=[0, 1, 2, 3, 4, 4, 4, 4, 4],
                  block=[0, 0, 0, 0, 0, 1, 2, 3, 4],
                  sep=5)


def test_gmask_infill_branch_8_4():
    # the official infill branch places one span of length g=4 with sample_spans; offset 1 puts it on x2..x5
    spans = place_spans(np.array(TEXT), np.array([4]), ScriptedRng(integers=[1]))
    np.testing.assert_array_equal(spans, [[2, 6]])
    s = blank_infill(TEXT, spans, mask_id=G, shuffle=False)
    assert_sample(s,
                  tokens=[CLS, x1, G, x6, EOS, S, x2, x3, x4, x5],
                  targets=[CLS, x1, G, x6, EOS, x2, x3, x4, x5, E],
                  loss=[0] * 5 + [1] * 5,
                  pos=[0, 1, 2, 3, 4, 2, 2, 2, 2, 2],
                  block=[0] * 5 + [1, 2, 3, 4, 5],
                  sep=5)


def test_gmask_branches_through_the_objective():
    obj = make_objective("glm-10b")
    prefix = obj.make_sample(np.array(TEXT), "document", ScriptedRng(random=[0.1]), g=4)  # 0.1 < 0.5: prefix
    np.testing.assert_array_equal(prefix.tokens, [CLS, x1, x2, x3, G, S, x4, x5, x6])
    infill = obj.make_sample(np.array(TEXT), "document", ScriptedRng(random=[0.9], integers=[1]), g=4)
    np.testing.assert_array_equal(infill.tokens, [CLS, x1, G, x6, EOS, S, x2, x3, x4, x5])
    # a sample holding two documents always takes the prefix branch, whatever the coin says
    two_docs = np.array([CLS, x1, x2, EOS, CLS, x3, x4, x5])
    s = obj.make_sample(two_docs, "document", ScriptedRng(random=[0.99]), g=3)
    np.testing.assert_array_equal(s.tokens, [CLS, x1, x2, EOS, CLS, G, S, x3, x4])
    # glm-base / glm-doc have no task masks: the long span uses plain [MASK]
    s = make_objective("glm-doc").make_sample(np.array(TEXT), "document", ScriptedRng(random=[0.1]), g=4)
    assert s.tokens[4] == M


def test_smask_example_8_4():
    is_end = np.zeros(32, dtype=bool)
    is_end[[x3, x6]] = True  # "x3." and "x6." end sentences
    np.testing.assert_array_equal(sentence_spans(np.array(TEXT), is_end), [[1, 4], [4, 7]])
    # official quirks: a run cut by <eos> is no sentence, the next one starts at the [CLS] after the <eos>, and the
    # unfinished run at the end of the sample counts
    two = np.array([CLS, x1, x3, x2, EOS, CLS, x1, x2, x3, x4, EOS, CLS, x5])
    np.testing.assert_array_equal(sentence_spans(two, is_end), [[1, 3], [5, 9], [11, 13]])
    spans = choose_sentences(np.array(TEXT), is_end, ScriptedRng(permutation=[0, 1]))  # int(0.15*8)=1: one sentence
    np.testing.assert_array_equal(spans, [[1, 4]])
    s = blank_infill(TEXT, spans, mask_id=SM)
    assert_sample(s,
                  tokens=[CLS, SM, x4, x5, x6, EOS, S, x1, x2, x3],
                  targets=[CLS, SM, x4, x5, x6, EOS, x1, x2, x3, E],
                  loss=[0] * 6 + [1] * 4,
                  pos=[0, 1, 2, 3, 4, 5, 1, 1, 1, 1],
                  block=[0] * 6 + [1, 2, 3, 4],
                  sep=6)


def test_mask_matrix_8_5():
    expected = FIG2_MASK  # tests/known_answers.py, typed from docs/figure2.md §5
    s = blank_infill([x1, x2, x3, x4, x5, x6], [(2, 3), (4, 6)], order=[1, 0])
    np.testing.assert_array_equal(dense_mask(s)[0], expected)
    np.testing.assert_array_equal(dense_mask(5, 10)[0], expected)
    # 8.3: 12 x 12 with sep 7
    m = dense_mask(blank_infill(TEXT, [(3, 4), (5, 7)], order=[1, 0]))[0]
    assert m.shape == (12, 12)
    for r in range(12):
        want = np.arange(12) < 7 if r < 7 else np.arange(12) <= r
        np.testing.assert_array_equal(m[r], want)


def test_ablations_no_shuffle_and_no_block_position():
    rng = np.random.default_rng(0)
    s = blank_infill(TEXT, [(5, 7), (3, 4)], shuffle=False, block_position=False, rng=rng)
    np.testing.assert_array_equal(s.tokens, [CLS, x1, x2, M, x4, M, EOS, S, x3, S, x5, x6])  # text order
    np.testing.assert_array_equal(s.block_position_ids, [0] * 7 + [1] * 5)
    np.testing.assert_array_equal(s.position_ids, [0, 1, 2, 3, 4, 5, 6, 3, 3, 5, 5, 5])


def test_collate_pads_right_with_zeros():
    a = blank_infill(TEXT, [(3, 4), (5, 7)], order=[1, 0])
    b = gmask_prefix(TEXT, 4)
    batch = collate([a, b], objective="token")
    assert isinstance(batch, Batch) and batch.tokens.shape == (2, 12)
    np.testing.assert_array_equal(batch.lengths, [12, 9])
    np.testing.assert_array_equal(batch.sep, [7, 5])
    for name in ("tokens", "targets", "loss_mask", "position_ids", "block_position_ids"):
        arr = getattr(batch, name)
        assert arr.dtype == (np.float32 if name == "loss_mask" else np.int64)
        np.testing.assert_array_equal(arr[1, 9:], 0)
        np.testing.assert_array_equal(arr[1, :9], getattr(b, name))
    assert dense_mask(batch).shape == (2, 12, 12)
    with pytest.raises(ValueError, match="pad_to"):
        collate([a], pad_to=5)
    assert collate([a], pad_to=20).tokens.shape == (1, 20)


def test_bad_spans_are_rejected():
    with pytest.raises(ValueError, match="overlap"):
        blank_infill(TEXT, [(1, 3), (2, 4)], shuffle=False)
    with pytest.raises(ValueError, match="within"):
        blank_infill(TEXT, [(6, 9)], shuffle=False)
    with pytest.raises(ValueError, match="permutation"):
        blank_infill(TEXT, [(1, 2), (4, 5)], order=[0, 0])
    with pytest.raises(ValueError, match="rng"):
        blank_infill(TEXT, [(1, 2), (4, 5)])
    with pytest.raises(ValueError, match="g must be"):
        gmask_prefix(TEXT, 8)


def test_describe_mentions_the_parts():
    s = blank_infill(TEXT, [(3, 4), (5, 7)], order=[1, 0])
    text = describe(s)
    assert "sep (Part A length): 7" in text and "Part B[0] at position 5" in text and "Part B[1] at position 3" in text
    assert "mask" in text and text.count("\n") > 10


def _random_rows(seed: int, n_rows: int):
    """Rows of random lengths (some with no span, some with a span that ends the row) and their Part-B orders."""
    rng = np.random.default_rng(seed)
    rows, spans, orders = [], [], []
    for r in range(n_rows):
        L = int(rng.integers(1, 40))
        cuts = np.sort(rng.choice(np.arange(L + 1), size=2 * int(rng.integers(0, L // 2 + 1)), replace=False))
        sp = cuts.reshape(-1, 2)
        if r == 0 and L > 1:
            sp = np.array([[L - 1, L]])  # a span that ends the row: its <eop> slot points past the row
        rows.append(rng.integers(8, 50, size=L))
        spans.append(sp)
        orders.append(rng.permutation(len(sp)))
    return rows, spans, orders


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), n_rows=st.integers(1, 6), block_position=st.booleans(),
       extra_pad=st.integers(0, 3))
def test_infill_rows_equals_one_row_at_a_time(seed, n_rows, block_position, extra_pad):
    """A batch built in one pass is, row for row, the sample ``blank_infill`` builds alone, padded with zeros."""
    rows, spans, orders = _random_rows(seed, n_rows)
    alone = [blank_infill(r, s, order=o, block_position=block_position) for r, s, o in zip(rows, spans, orders)]
    want = collate(alone, objective="token")
    T = want.tokens.shape[1] + extra_pad
    got = infill_rows(rows, spans, orders, MASK_ID, SOP_ID, EOP_ID, block_position, pad_to=T)
    for name in ("tokens", "targets", "loss_mask", "position_ids", "block_position_ids"):
        assert got[name].dtype == getattr(want, name).dtype and got[name].shape == (n_rows, T)
        np.testing.assert_array_equal(got[name][:, : want.tokens.shape[1]], getattr(want, name), err_msg=name)
        np.testing.assert_array_equal(got[name][:, want.tokens.shape[1]:], 0, err_msg=name)
    np.testing.assert_array_equal(got["sep"], want.sep)
    np.testing.assert_array_equal(got["lengths"], want.lengths)


def test_infill_rows_rejects_a_short_pad_and_no_rows():
    with pytest.raises(ValueError, match="pad_to"):
        infill_rows([np.array(TEXT)], [np.array([[3, 5]])], [np.arange(1)], MASK_ID, pad_to=len(TEXT))
    with pytest.raises(ValueError, match="at least one row"):
        infill_rows([], [], [], MASK_ID)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31), name=st.sampled_from(["glm-base", "glm-10b", "glm-doc", "t5"]),
       mode=st.sampled_from(["token", "sentence", "document"]))
def test_make_batch_draws_as_make_sample_does(seed, name, mode):
    """The objectives build a batch in one pass, and the batch is the samples built one by one and collated.
    Sentence and document batches draw from the rng exactly as ``make_sample`` does, sample by sample; token-level
    batches (and T5's) draw the whole batch's spans and Part-B orders together (``sample_batch``,
    ``part_b_orders``), and then each sample built alone from its spans and order is its row of the batch. Both
    leave the rng where the reference leaves it."""
    from minglm.tokenizer import CharTokenizer

    tok = CharTokenizer.from_texts(["abcdefghij .\n"])
    gen = np.random.default_rng(seed)
    windows = [np.concatenate([[CLS], tok.encode_array("".join(gen.choice(list("abcdefghij .\n"), size=n))), [EOS]])
               for n in gen.integers(20, 60, size=5)]
    obj = make_objective(name, tok)
    r1, r2 = np.random.default_rng(seed), np.random.default_rng(seed)
    if name == "t5":
        got = obj.make_batch(windows, r1)
        spans = obj.sampler.sample_batch(windows, r2)
        want = collate([_t5_sample(obj, w, s) for w, s in zip(windows, spans)], objective="t5")
    elif mode == "token":
        got = obj.make_batch(windows, r1, mode=mode)
        spans = obj.sampler.sample_batch(windows, r2)
        orders = part_b_orders([len(s) for s in spans], obj.shuffle, r2)
        want = collate([blank_infill(w, s, order=o, mask_id=obj._blank_id(mode), block_position=obj.block_position)
                        for w, s, o in zip(windows, spans, orders)], objective=mode)
    else:
        got = obj.make_batch(windows, r1, mode=mode)
        g = draw_gmask_bound([len(w) for w in windows], r2, obj.gpt_min_ratio) if mode == "document" else None
        want = collate([obj.make_sample(w, mode, r2, g) for w in windows], objective=mode)
    assert got.objective == want.objective
    for key, value in want.to_dict().items():
        np.testing.assert_array_equal(getattr(got, key), value, err_msg=key)
    assert r1.random() == r2.random()


def _t5_sample(obj, w, spans):
    """T5 one sample at a time from its spans, as ``T5Objective`` built it before the one-pass batch."""
    from minglm.data.objectives import _plain_sample

    g = blank_infill(w, spans, shuffle=False)
    sep = g.sep
    b_in, b_tg = g.tokens[sep:].copy(), g.targets[sep:].copy()
    b_in[1:][b_in[1:] == S] = M
    b_tg[np.flatnonzero(b_tg == E)[:-1]] = M
    nb = len(b_in)
    return _plain_sample(np.concatenate([g.tokens[:sep], b_in]), np.concatenate([g.targets[:sep], b_tg]),
                         g.loss_mask, sep, "t5", position_ids=np.concatenate([np.arange(sep), np.zeros(nb, np.int64)]),
                         block_position_ids=np.concatenate([np.zeros(sep, np.int64), np.arange(1, nb + 1)]))
