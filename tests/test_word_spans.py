"""Word-aligned blanks (span_unit="word"): spans count whole words, for both tokenizers, and never cut one."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minglm.data.objectives import make_objective
from minglm.data.samplers import WordSpanSampler, word_edge_tables
from minglm.tokenizer import CLS_ID, EOS_ID, BPETokenizer, CharTokenizer

TEXT = ("To be, or not to be: that is the question.\nWhether 'tis nobler in the mind to suffer\n"
        "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles")


def _tokenizers():
    return [CharTokenizer.from_texts([TEXT]), BPETokenizer.train([TEXT] * 4, vocab_size=400)]


def _is_letter_edge(text: str, i: int) -> bool:
    """True when position i of text falls inside a word (a letter on both sides)."""
    return 0 < i < len(text) and text[i - 1].isalpha() and text[i].isalpha()


@pytest.mark.parametrize("tok", _tokenizers(), ids=["char", "bpe"])
def test_word_spans_never_cut_a_word_and_start_at_its_space(tok):
    ids = np.array([CLS_ID, *tok.encode(TEXT), EOS_ID])
    sampler = WordSpanSampler(*word_edge_tables(tok), ratio=0.3)
    rng = np.random.default_rng(0)
    for _ in range(50):
        spans = sampler(ids, rng)
        assert len(spans) and np.all(spans[:, 0] < spans[:, 1]) and np.all(spans[:-1, 1] < spans[1:, 0])
        for a, b in spans:
            left, inside = tok.decode(ids[1:a]), tok.decode(ids[a:b])
            whole = left + inside
            assert not _is_letter_edge(whole, len(left)), f"a span starts inside a word: {whole!r}"
            right = tok.decode(ids[b:-1])
            assert not _is_letter_edge(inside + right, len(inside)), f"a span ends inside a word: {inside!r}"
            assert CLS_ID not in ids[a:b] and EOS_ID not in ids[a:b]
            # a span starts and ends with a word: punctuation and line breaks at its edges stay in the text
            assert inside.strip()[0].isalpha() and inside.rstrip()[-1].isalpha(), inside


def test_word_units_of_characters():
    tok = CharTokenizer.from_texts([TEXT])
    first, joins, letter = word_edge_tables(tok)
    assert letter[tok.encode("a")[0]] and not letter[tok.encode(",")[0]] and not letter[tok.encode(" ")[0]]
    ids = np.array(tok.encode("to be, or"))
    starts = np.ones(len(ids), dtype=bool)
    starts[1:] = ~(first[ids[1:]] & joins[ids[:-1]])
    units = np.split(ids, np.flatnonzero(starts)[1:])
    assert [tok.decode(u) for u in units] == ["to", " be", ",", " or"]


def test_a_clitic_belongs_to_its_word():
    # I'll is one word, as the fill benchmark counts words: a blank never holds 'll without its I
    tok = BPETokenizer.train([TEXT + " I'll go, he'd say, it's done."] * 4, vocab_size=420)
    first, joins, letter = word_edge_tables(tok)
    ids = np.array(tok.encode(" I'll go, he'd say"))
    starts = np.ones(len(ids), dtype=bool)
    starts[1:] = ~(first[ids[1:]] & joins[ids[:-1]])
    units = [tok.decode(u) for u in np.split(ids, np.flatnonzero(starts)[1:])]
    assert units == [" I'll", " go", ",", " he'd", " say"], units


def test_a_short_window_cut_by_a_document_end_blanks_fewer_words_instead_of_failing():
    # [CLS] five words <eos> [CLS] three words: half of the 11 units cannot be placed with a gap between spans in
    # documents this short, so the word sampler blanks fewer units (and counts it) instead of raising
    tok = BPETokenizer.train([TEXT] * 4, vocab_size=400)
    ids = np.array([CLS_ID, *tok.encode(" to be or not to"), EOS_ID, CLS_ID, *tok.encode(" the slings and")])
    sampler = WordSpanSampler(*word_edge_tables(tok), ratio=0.6, lam=1.0)
    rng = np.random.default_rng(0)
    for _ in range(20):
        spans = sampler(ids, rng)
        assert len(spans) >= 1 and CLS_ID not in ids[spans[:, 0]] and EOS_ID not in ids[spans[:, 0]]
    assert sampler.stats.get("shrunk", 0) > 0


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), ratio=st.sampled_from([0.15, 0.3, 0.5]))
def test_word_objective_builds_valid_samples(seed, ratio):
    tok = _tokenizers()[0]
    ids = np.array([CLS_ID, *tok.encode(TEXT), EOS_ID])
    obj = make_objective("glm-base", tok, span_unit="word", mask_ratio=ratio)
    sample = obj.make_sample(ids, "token", np.random.default_rng(seed))
    spans = sample.spans
    assert len(spans) >= 1
    # Part B holds each span once plus its <eop>, and Part A keeps everything else with one [MASK] per span
    assert int(np.sum(sample.loss_mask)) == int(np.sum(spans[:, 1] - spans[:, 0])) + len(spans)
    assert sample.sep == len(ids) - int(np.sum(spans[:, 1] - spans[:, 0])) + len(spans)
    for a, b in spans:  # whole units: never a letter on both sides of an edge
        text_left, inside = tok.decode(ids[1:a]), tok.decode(ids[a:b])
        assert not _is_letter_edge(text_left + inside, len(text_left))


def test_word_unit_needs_the_tokenizer_and_a_known_name():
    with pytest.raises(ValueError, match="span_unit='word' needs the tokenizer"):
        make_objective("glm-base", None, span_unit="word")
    with pytest.raises(ValueError, match="span_unit must be 'token', 'word' or 'known_word'"):
        make_objective("glm-base", _tokenizers()[0], span_unit="letter")


def test_span_lambda_sets_the_poisson_mean_of_span_lengths():
    tok = _tokenizers()[0]
    ids = np.array([CLS_ID, *tok.encode(TEXT * 8), EOS_ID])
    rng = np.random.default_rng(0)
    means = {}
    for lam in (1.0, 3.0):
        obj = make_objective("glm-base", tok, span_unit="word", span_lambda=lam, mask_ratio=0.15)
        first, joins, _ = obj.word_edges
        starts = np.ones(len(ids), dtype=bool)
        starts[1:] = ~(first[ids[1:]] & joins[ids[:-1]])
        unit_of = np.cumsum(starts) - 1
        lengths = [unit_of[b - 1] - unit_of[a] + 1 for _ in range(200) for a, b in obj.sampler(ids, rng)]
        means[lam] = float(np.mean(lengths))
    # the truncated Poisson(1) has mean 1/(1 - e^-1) = 1.58, Poisson(3) 3/(1 - e^-3) = 3.16
    assert abs(means[1.0] - 1.58) < 0.15 and abs(means[3.0] - 3.16) < 0.3
    with pytest.raises(ValueError, match="span_lambda"):
        make_objective("glm-base", tok, span_lambda=0.0)


def test_known_word_spans_start_and_end_at_words_the_vocabulary_holds():
    from minglm.tokenizer import WordTokenizer

    tok = WordTokenizer.train([TEXT * 3], vocab_size=N_KEEP)
    ids = np.array([CLS_ID, *tok.encode(TEXT + " Zounds, quoth Falstaff, the nobler mind"), EOS_ID])
    known = set(range(8 + 256, tok.vocab_size))
    sampler = WordSpanSampler(*word_edge_tables(tok), known_only=True, ratio=0.3, lam=1.0)
    rng = np.random.default_rng(0)
    for _ in range(100):
        for a, b in sampler(ids, rng):
            assert ids[a] in known and ids[b - 1] in known, tok.decode(ids[a:b])


N_KEEP = 8 + 256 + 20
