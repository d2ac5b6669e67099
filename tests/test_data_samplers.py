"""Property and distribution tests for the span samplers and objectives (docs/official-code.md §2.2-§2.6)."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minglm.data import (
    TokenSpanSampler,
    blank_infill,
    draw_gmask_bound,
    draw_span_lengths,
    make_objective,
    sample_spans,
    sentence_spans,
    split_documents,
    truncated_poisson_pmf,
)
from minglm.tokenizer import CLS_ID, EOP_ID, EOS_ID, MASK_ID, N_SPECIAL, SOP_ID, CharTokenizer


def framed(doc_lengths, seed, cut=None):
    """A window `[CLS] d1 <eos> [CLS] d2 <eos> ...` of random ordinary tokens, optionally cut to `cut` tokens."""
    rng = np.random.default_rng(seed)
    parts = []
    for n in doc_lengths:
        parts += [[CLS_ID], rng.integers(N_SPECIAL, 60, size=n).tolist(), [EOS_ID]]
    w = np.array(sum(parts, []), dtype=np.int64)
    return w if cut is None else w[:cut]


def rebuild(sample):
    """Original text from Part A + Part B: each blank takes the Part-B targets at its position (minus <eop>)."""
    sep = sample.sep
    pieces = {}
    b = np.arange(sep, len(sample.tokens))
    starts = b[sample.block_position_ids[sep:] == 1]
    for k, st_ in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else len(sample.tokens)
        tg = sample.targets[st_:end]
        assert tg[-1] == EOP_ID
        pieces[int(sample.position_ids[st_])] = tg[:-1].tolist()
    out = []
    for j in range(sep):
        if j in pieces:
            out += pieces.pop(j)
        else:
            out.append(int(sample.tokens[j]))
    assert not pieces
    return out


def check_glm_invariants(window, spans, s):
    window = np.asarray(window)
    L = len(window)
    lens = spans[:, 1] - spans[:, 0]
    n = len(spans)
    # text rebuilt exactly, Part-B targets = span + <eop>, loss count = sum(len + 1), sep formula
    assert rebuild(s) == window.tolist()
    assert s.loss_mask.sum() == (lens + 1).sum()
    assert s.sep == L - lens.sum() + n
    np.testing.assert_array_equal(s.position_ids[: s.sep], np.arange(s.sep))
    np.testing.assert_array_equal(s.block_position_ids[: s.sep], 0)
    assert np.all(s.loss_mask[: s.sep] == 0) and np.all(s.loss_mask[s.sep :] == 1)
    # every Part-B piece: <sop> first, block ids 1..len+1, one position = a blank's position in Part A
    bb = s.block_position_ids[s.sep :]
    starts = np.flatnonzero(bb == 1)
    assert len(starts) == n and np.all(s.tokens[s.sep :][starts] == SOP_ID)
    blanks = np.flatnonzero(s.tokens[: s.sep] == MASK_ID)
    for k, a in enumerate(starts):
        e = starts[k + 1] if k + 1 < len(starts) else len(bb)
        np.testing.assert_array_equal(bb[a:e], np.arange(1, e - a + 1))
        assert len(set(s.position_ids[s.sep + a : s.sep + e].tolist())) == 1
        assert s.position_ids[s.sep + a] in blanks


@settings(max_examples=60, deadline=None)
@given(doc_lengths=st.lists(st.integers(20, 300), min_size=1, max_size=4), seed=st.integers(0, 2**31),
       cut=st.integers(40, 700))
def test_token_level_properties(doc_lengths, seed, cut):
    window = framed(doc_lengths, seed, cut)
    L = len(window)
    sampler = TokenSpanSampler()
    rng = np.random.default_rng(seed)
    try:
        spans = sampler(window, rng)
    except ValueError:
        # only when even packing every document cannot hold 15 % of the window
        docs = split_documents(window)
        assert sum(max(d, 0) for _, d in docs) < int(0.15 * L) * 1.5 + len(docs) + 40
        return
    lens = spans[:, 1] - spans[:, 0]
    assert lens.sum() >= int(0.15 * L)
    assert np.all((lens >= 1) & (lens <= 39))
    # separated by >= 1 token, never covering [CLS] / <eos>, never the last token
    assert np.all(spans[1:, 0] > spans[:-1, 1]) if len(spans) > 1 else True
    covered = np.zeros(L, dtype=bool)
    for a, b in spans:
        covered[a:b] = True
    assert not covered[-1]
    assert not np.any(covered & ((window == EOS_ID) | (window == CLS_ID)))
    s = blank_infill(window, spans, rng=rng)
    check_glm_invariants(window, spans, s)


@settings(max_examples=40, deadline=None)
@given(text=st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=30, max_size=400),
       seed=st.integers(0, 2**31))
def test_rebuild_from_random_text(text, seed):
    tok = CharTokenizer.from_texts([text + ".\n"])
    window = np.concatenate([[CLS_ID], tok.encode_array(text), [EOS_ID]]).astype(np.int64)
    rng = np.random.default_rng(seed)
    spans = TokenSpanSampler()(window, rng)
    s = blank_infill(window, spans, rng=rng)
    check_glm_invariants(window, spans, s)
    assert tok.decode(rebuild(s)[1:-1]) == text  # a literal "[MASK]" in the text decodes back to itself


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), name=st.sampled_from(["glm-base", "glm-10b", "glm-doc", "glm-130b"]),
       mode=st.sampled_from(["token", "sentence", "document"]))
def test_objective_batches_are_consistent(seed, name, mode):
    tok = CharTokenizer.from_texts(["abcdefghij .\n"])
    rng = np.random.default_rng(seed)
    text = "".join(rng.choice(list("abcdefghij .\n"), size=900))
    ids = tok.encode_array(text)
    windows = [np.concatenate([[CLS_ID], ids[i * 200 : i * 200 + 190], [EOS_ID], [CLS_ID],
                               ids[i * 200 + 190 : i * 200 + 200]]) for i in range(4)]
    obj = make_objective(name, tok)
    b = obj.make_batch(windows, rng, mode=mode)
    assert b.objective == mode and b.tokens.shape[0] == 4
    for i in range(4):
        r = b.row(i)
        assert r.sep <= len(r.tokens) and np.all(r.position_ids < len(windows[i]))
        assert np.all(r.loss_mask[: r.sep] == 0) and np.all(r.loss_mask[r.sep :] == 1)
        if mode == "sentence" or mode == "token":
            assert rebuild(r) == windows[i].tolist()


def chi2_sf(x, df):
    """Upper tail of the chi-square distribution (regularised incomplete gamma via its series)."""
    a, z = df / 2.0, x / 2.0
    term = total = 1.0 / a
    n = 1
    while term > 1e-15 * total:
        term *= z / (a + n)
        total += term
        n += 1
    lower = math.exp(-z + a * math.log(z) - math.lgamma(a)) * total
    return max(0.0, 1.0 - lower)


def test_chi2_helper_matches_known_values():
    assert abs(chi2_sf(3.841, 1) - 0.05) < 1e-3
    assert abs(chi2_sf(18.307, 10) - 0.05) < 1e-3


def test_span_lengths_follow_truncated_poisson():
    pmf = truncated_poisson_pmf(3.0, 39)
    assert pmf.shape == (39,) and abs(pmf.sum() - 1) < 1e-12
    assert abs(pmf[2] / pmf[0] - (3**3 / 6) / 3) < 1e-12  # P(3)/P(1) of a Poisson(3)
    sampler = TokenSpanSampler()
    rng = np.random.default_rng(1234)
    lens = []
    while sum(map(len, lens)) < 10_000:
        w = framed([600], int(rng.integers(1 << 30)), cut=512)
        sp = sampler(w, rng)
        lens.append(sp[:, 1] - sp[:, 0])
    lens = np.concatenate(lens)
    assert len(lens) >= 10_000 and lens.min() >= 1 and lens.max() <= 39
    counts = np.bincount(lens, minlength=40)[1:]
    expected = pmf * len(lens)
    # merge the tail into one bin so every expected count is >= 5
    k = int(np.flatnonzero(expected >= 5)[-1])
    obs = np.append(counts[:k], counts[k:].sum())
    exp = np.append(expected[:k], expected[k:].sum())
    stat = float(((obs - exp) ** 2 / exp).sum())
    p = chi2_sf(stat, len(obs) - 1)
    assert p > 1e-3, (stat, p, obs, exp.round(1))
    # and a clearly wrong distribution (Poisson 4) is rejected by the same test
    wrong = truncated_poisson_pmf(4.0, 39) * len(lens)
    w_exp = np.append(wrong[:k], wrong[k:].sum())
    assert chi2_sf(float(((obs - w_exp) ** 2 / w_exp).sum()), len(obs) - 1) < 1e-6


def test_draw_span_lengths_reaches_total():
    rng = np.random.default_rng(0)
    cdf = np.cumsum(truncated_poisson_pmf())
    for total in [0, 1, 5, 76, 1000]:
        lens = draw_span_lengths(total, rng, cdf)
        assert lens.sum() >= total and (len(lens) == 0 or lens[:-1].sum() < total)


def test_sample_spans_formula():
    rng = np.random.default_rng(0)
    for _ in range(200):
        lens = rng.integers(1, 6, size=rng.integers(1, 5))
        doc = int(lens.sum() + len(lens) - 1 + rng.integers(0, 5))
        sp = sample_spans(lens, doc, rng, offset=3)
        assert sp[0, 0] >= 3 and sp[-1, 1] <= 3 + doc
        np.testing.assert_array_equal(sp[:, 1] - sp[:, 0], lens)
        assert np.all(sp[1:, 0] > sp[:-1, 1])
    with pytest.raises(ValueError, match="do not fit"):
        sample_spans(np.array([3, 3]), 6, rng)


def test_split_documents_official_rules():
    w = np.array([CLS_ID, 10, 11, 12, EOS_ID, CLS_ID, 13, 14, EOS_ID, CLS_ID, 15, 16, 17])
    # last document first; the final token of the sample is never maskable
    assert split_documents(w) == [(10, 2), (6, 2), (1, 3)]
    w2 = np.array([10, 11, EOS_ID, CLS_ID, 12, 13, EOS_ID])  # starts mid-document, ends on <eos>
    assert split_documents(w2) == [(7, 0), (4, 2), (0, 2)]


def test_resampling_is_counted_not_silent():
    # many short documents: the non-longest ones take nothing (15 % of 6 is 0), the longest cannot hold it all
    w = framed([6] * 20 + [14], 0)
    sampler = TokenSpanSampler(max_tries=5)
    spans = sampler(w, np.random.default_rng(0))
    assert sampler.stats["resampled"] >= 1 and sampler.stats["packed"] == 1
    assert (spans[:, 1] - spans[:, 0]).sum() >= int(0.15 * len(w))
    # documents of two tokens cannot hold a span of three: fewer tokens are blanked, and that is counted too
    short = TokenSpanSampler(max_tries=1)
    spans = short(np.array([CLS_ID, 10, 11, EOS_ID, CLS_ID, 12, 13, EOS_ID] * 3), np.random.default_rng(0))
    assert len(spans) >= 1 and short.stats["shrunk"] >= 1
    with pytest.raises(ValueError, match="cannot place"):  # no document holds a single token
        TokenSpanSampler(ratio=0.5)(np.array([CLS_ID, EOS_ID] * 4), np.random.default_rng(0))


def test_gmask_bound_and_span_ratio():
    rng = np.random.default_rng(0)
    for ratio in (0.25, 0.5):
        obj = make_objective("glm-doc", gpt_min_ratio=ratio)
        for seed in range(40):
            w = framed([700], seed, cut=256)
            b = obj.make_batch([w, w[:200]], np.random.default_rng(seed), mode="document")
            g = b.loss_mask.sum(axis=1)  # the prefix branch predicts g tokens, the infill branch g + 1
            assert np.all(g >= int(ratio * 200)) and np.all(g <= np.array([256, 200]) - 1)
        gs = [draw_gmask_bound([512], rng, ratio) for _ in range(2000)]
        assert min(gs) >= int(ratio * 512) and max(gs) <= 510
        assert min(gs) < int(ratio * 512) + 20 and max(gs) > 490  # uniform over the whole range


def test_mixing_frequencies_glm_10b():
    tok = CharTokenizer.from_texts(["ab.\n"])
    obj = make_objective("glm-10b", tok)
    rng = np.random.default_rng(0)
    modes = [obj.choose_mode(rng) for _ in range(20000)]
    for m, p in (("token", 0.5), ("sentence", 0.3), ("document", 0.2)):
        assert abs(modes.count(m) / len(modes) - p) < 0.015
    assert {make_objective("glm-base").choose_mode(rng) for _ in range(100)} == {"token"}


def test_glm_10b_uses_task_masks():
    from minglm.tokenizer import GMASK_ID, SMASK_ID

    tok = CharTokenizer.from_texts(["abc. def!\n"])
    obj = make_objective("glm-10b", tok)
    ids = tok.encode_array("abc. def!\n" * 30)
    w = np.concatenate([[CLS_ID], ids, [EOS_ID]])
    rng = np.random.default_rng(0)
    assert SMASK_ID in obj.make_batch([w], rng, mode="sentence").tokens
    assert GMASK_ID in obj.make_batch([w], rng, mode="document").tokens
    assert MASK_ID in obj.make_batch([w], rng, mode="token").tokens
    base = make_objective("glm-base", tok)
    assert SMASK_ID not in base.make_batch([w], rng, mode="sentence").tokens


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), docs=st.lists(st.integers(5, 200), min_size=1, max_size=3),
       name=st.sampled_from(["glm-10b", "glm-doc", "glm-130b"]))
def test_document_level_properties(seed, docs, name):
    w = framed(docs, seed)
    obj = make_objective(name)
    rng = np.random.default_rng(seed)
    b = obj.make_batch([w], rng, mode="document")
    s = b.row(0)
    L, sep = len(w), s.sep
    g = int(s.loss_mask.sum())
    np.testing.assert_array_equal(s.position_ids[:sep], np.arange(sep))
    if s.targets[-1] != EOP_ID:  # prefix branch: Part A + Part B targets give the sample back, no <eop>
        assert len(s.tokens) == L + 1 and sep == L - g + 1
        np.testing.assert_array_equal(np.concatenate([s.tokens[: sep - 1], s.targets[sep:]]), w)
        np.testing.assert_array_equal(s.block_position_ids[sep - 1 :], np.arange(g + 1))
        np.testing.assert_array_equal(s.position_ids[sep:], sep - 1)
    else:  # infill branch: one span, rebuilt like any blank
        assert name != "glm-130b" and len(docs) == 1  # several documents always take the prefix branch
        assert rebuild(s) == w.tolist()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31))
def test_sentence_level_properties(seed):
    tok = CharTokenizer.from_texts(["abcde .!\n"])
    rng = np.random.default_rng(seed)
    text = "".join(rng.choice(list("abcde .!\n"), p=[0.15] * 5 + [0.1, 0.08, 0.04, 0.03], size=300))
    w = np.concatenate([[CLS_ID], tok.encode_array(text[:150]), [EOS_ID], [CLS_ID], tok.encode_array(text[150:])])
    obj = make_objective("glm-10b", tok)
    s = obj.make_sample(w, "sentence", rng)
    spans = s.spans
    lens = spans[:, 1] - spans[:, 0]
    is_end = obj.sentence_end
    all_sentences = len(spans) == len(sentence_spans(w, is_end))
    assert lens.sum() >= int(0.15 * len(w)) or all_sentences
    for a, e in spans:  # a chosen sentence ends in an end mark, or is the unfinished run at the end of the sample
        assert is_end[w[e - 1]] or e == len(w)
        assert not np.any(w[a:e] == EOS_ID)
    assert rebuild(s) == w.tolist()
