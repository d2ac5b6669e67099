"""The spans of a whole batch drawn together (``TokenSpanSampler.sample_batch``, ``WordSpanSampler.sample_batch``,
``blank.part_b_orders``): the same rules and the same distribution as the sampler called sample by sample, which
draws other numbers from the rng."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_data_samplers import chi2_sf, framed

from minglm.data import TokenSpanSampler, split_documents
from minglm.data.blank import part_b_orders
from minglm.data.samplers import WordSpanSampler, word_edge_tables
from minglm.tokenizer import CLS_ID, EOS_ID, N_SPECIAL, BPETokenizer, WordTokenizer

TEXT = ("To be, or not to be: that is the question.\nWhether 'tis nobler in the mind to suffer\n"
        "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles")


def two_sample_chi2(a, b):
    """p-value that the counts a and b (same categories) come from one distribution; bins with < 10 in all merged."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    small = (a + b) < 10
    if small.any():
        a, b = np.append(a[~small], a[small].sum()), np.append(b[~small], b[small].sum())
        keep = (a + b) > 0
        a, b = a[keep], b[keep]
    A, B = a.sum(), b.sum()
    stat = float((((np.sqrt(B / A) * a - np.sqrt(A / B) * b) ** 2) / (a + b)).sum())
    return chi2_sf(stat, len(a) - 1)


def test_two_sample_chi2_tells_apart_what_differs():
    rng = np.random.default_rng(0)
    x, y = rng.poisson(3, 5000), rng.poisson(3, 5000)
    z = rng.poisson(3.3, 5000)
    assert two_sample_chi2(np.bincount(x, minlength=20), np.bincount(y, minlength=20)) > 1e-3
    assert two_sample_chi2(np.bincount(x, minlength=20), np.bincount(z, minlength=20)) < 1e-6


@settings(max_examples=60, deadline=None)
@given(docs=st.lists(st.lists(st.integers(8, 120), min_size=1, max_size=3), min_size=1, max_size=6),
       seed=st.integers(0, 2**31), ratio=st.sampled_from([0.15, 0.5]), lam=st.sampled_from([0.25, 3.0]))
def test_batch_spans_keep_the_rules(docs, seed, ratio, lam):
    """Every sample's spans: at least int(ratio * len) tokens unless shrunk (counted), whole lengths 1..39, one
    token apart, inside a document, never [CLS], <eos> or the last token; a one-document sample's lengths are drawn
    until they reach the total, so all but the last fall short of it."""
    windows = [framed(d, seed + k, cut=sum(d) + 2 * len(d) - (k % 2)) for k, d in enumerate(docs)]
    sampler = TokenSpanSampler(ratio=ratio, lam=lam)
    try:
        out = sampler.sample_batch(windows, np.random.default_rng(seed))
    except ValueError:  # only when not even one token fits (as for __call__)
        assert any(sum(max(d, 0) for _, d in split_documents(w)) < 1 for w in windows)
        return
    assert len(out) == len(windows) and sampler.stats["samples"] == len(windows)
    for w, spans in zip(windows, out):
        L, lens = len(w), spans[:, 1] - spans[:, 0]
        assert spans.dtype == np.int64 and spans.shape == (len(spans), 2)
        assert np.all((lens >= 1) & (lens <= 39))
        assert np.all(spans[1:, 0] > spans[:-1, 1])
        covered = np.zeros(L, dtype=bool)
        for a, b in spans:
            covered[a:b] = True
        assert not covered[-1] and not np.any(covered & ((w == EOS_ID) | (w == CLS_ID)))
        if not sampler.stats.get("shrunk"):
            assert lens.sum() >= int(ratio * L)
        if not np.any(w[:-1] == EOS_ID) and not sampler.stats["packed"] and len(lens):
            assert lens[:-1].sum() < int(ratio * L) <= lens.sum()


def _stats_of(spans_list):
    """Counts of spans per sample, span lengths and span starts (from the end of the sample's [CLS])."""
    n = np.array([len(s) for s in spans_list])
    lens = np.concatenate([s[:, 1] - s[:, 0] for s in spans_list])
    starts = np.concatenate([s[:, 0] for s in spans_list])
    return np.bincount(n, minlength=60), np.bincount(lens, minlength=40), np.bincount(starts, minlength=120)


@pytest.mark.parametrize("ratio,lam", [(0.15, 3.0), (0.5, 0.25), (0.5, 1.0)])
def test_batch_spans_have_the_distribution_of_sample_by_sample(ratio, lam):
    """Span counts, lengths and places of 4,000 one-document windows (and a few with two documents) drawn batch by
    batch against the sampler called window by window: a two-sample chi-square on each; the same test tells a
    sampler with Poisson mean 10 % larger apart."""
    gen = np.random.default_rng(7)
    windows = [framed([int(n)], int(s), cut=int(n) + 2 - int(s % 2)) for n, s in
               zip(gen.integers(20, 80, 4000), gen.integers(0, 1 << 30, 4000))]
    windows += [framed([20, 30], int(s)) for s in gen.integers(0, 1 << 30, 100)]
    one, batch, wrong = (TokenSpanSampler(ratio=ratio, lam=x) for x in (lam, lam, lam * 1.1))
    r1, r2, r3 = (np.random.default_rng(s) for s in (1, 2, 3))
    alone = [one(w, r1) for w in windows]
    together = [s for i in range(0, len(windows), 32) for s in batch.sample_batch(windows[i : i + 32], r2)]
    off = [s for i in range(0, len(windows), 32) for s in wrong.sample_batch(windows[i : i + 32], r3)]
    for a, b, what in zip(_stats_of(alone), _stats_of(together), ("spans per window", "lengths", "starts")):
        assert two_sample_chi2(a, b) > 1e-3, what
    assert min(two_sample_chi2(a, c) for a, c in zip(_stats_of(alone), _stats_of(off))) < 1e-3
    for key in ("resampled", "packed"):  # as many redraws, and as many packed as a last resort
        a, b = one.stats[key], batch.stats[key]
        assert abs(a - b) <= 4 * (a + b + 1) ** 0.5 + 5, (key, a, b)


def test_batch_spans_of_empty_and_tiny_samples():
    sampler = TokenSpanSampler(ratio=0.5)
    rng = np.random.default_rng(0)
    assert sampler.sample_batch([], rng) == []
    out = sampler.sample_batch([np.array([CLS_ID, 20, EOS_ID]), np.array([20]), np.zeros(0, np.int64),
                                np.array([CLS_ID, 20, 21]), framed([40], 1)], rng)
    assert [s.shape for s in out[:4]] == [(1, 2), (0, 2), (0, 2), (1, 2)] and len(out[4]) >= 1
    assert out[0].tolist() == [[1, 2]] and out[3].tolist() == [[1, 2]]
    with pytest.raises(ValueError, match="cannot place 1 masked tokens"):  # as __call__ says it
        sampler.sample_batch([framed([40], 1), np.array([CLS_ID, 20])], rng)


class _Given(WordSpanSampler):
    """A word sampler whose unit spans are given, so the batched trimming can be held to __call__'s exactly."""

    def __init__(self, unit_spans, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.given, self.next = unit_spans, 0

    def _shrinking(self, tokens, total, rng):
        self.next += 1
        return self.given[self.next - 1]

    def _batch_spans(self, samples, rng):
        return list(self.given)


@pytest.mark.parametrize("known_only", [False, True])
def test_word_batch_trims_as_sample_by_sample(known_only):
    """The units and the trimming done on the whole batch at once give what __call__ gives window by window,
    for the same unit spans: windows with one document, two, none blanked, and punctuation-only spans."""
    tok = WordTokenizer.train([TEXT * 3], vocab_size=N_SPECIAL + 256 + 20)
    edges = word_edge_tables(tok)
    gen = np.random.default_rng(0)
    for trial in range(30):
        windows = []
        for _ in range(int(gen.integers(1, 9))):
            a = int(gen.integers(0, 40))
            ids = tok.encode(TEXT[a : a + int(gen.integers(20, 120))] + " Zounds, quoth Falstaff,")
            w = [CLS_ID, *ids, EOS_ID] if gen.random() < 0.8 else [*ids, EOS_ID]  # a window cut mid-text
            if gen.random() < 0.3:
                w += [CLS_ID, *tok.encode(" the slings and arrows")]
            windows.append(np.array(w, dtype=np.int64))
        ref = WordSpanSampler(*edges, known_only=known_only, ratio=0.5, lam=float(gen.choice([0.25, 1.0, 3.0])))
        units = []
        for w in windows:  # each window's unit spans, drawn by the real sampler on its units
            starts = np.ones(len(w), dtype=bool)
            starts[1:] = ~(edges[0][w[1:]] & edges[1][w[:-1]])
            u = w[np.flatnonzero(starts)]
            punct = np.flatnonzero(~edges[2][u])[1:-1]  # units with no letter, past a leading [CLS]
            pick = gen.random()
            if pick < 0.1:  # nothing blanked
                units.append(np.zeros((0, 2), np.int64))
            elif pick < 0.25 and len(punct):  # only punctuation blanked: the window keeps its span untrimmed
                units.append(np.array([[punct[0], punct[0] + 1]]))
            else:
                units.append(ref._shrinking(u, len(u) // 2, gen))
        one = _Given(units, *edges, known_only=known_only)
        want = [one(w, None) for w in windows]
        got = _Given(units, *edges, known_only=known_only).sample_batch(windows, None)
        assert len(got) == len(want)
        for g, x in zip(got, want):
            np.testing.assert_array_equal(g, x.reshape(-1, 2), err_msg=f"trial {trial}")


def test_word_batch_spans_have_the_distribution_of_sample_by_sample():
    """The known-word sampler of the default run, on lines of text: blanked tokens and spans per window."""
    tok = BPETokenizer.train([TEXT] * 4, vocab_size=400)
    edges = word_edge_tables(tok)
    ids = np.array(tok.encode(TEXT * 3))
    gen = np.random.default_rng(3)
    windows = [np.concatenate([[CLS_ID], ids[a : a + int(n)]]) for a, n in
               zip(gen.integers(0, len(ids) - 40, 3000), gen.integers(12, 32, 3000))]
    one, batch = (WordSpanSampler(*edges, ratio=0.5, lam=0.25) for _ in range(2))
    r1, r2 = np.random.default_rng(1), np.random.default_rng(2)
    alone = [one(w, r1) for w in windows]
    together = [s for i in range(0, len(windows), 32) for s in batch.sample_batch(windows[i : i + 32], r2)]
    for f in (len, lambda s: int((s[:, 1] - s[:, 0]).sum())):
        a = np.bincount([f(s) for s in alone], minlength=64)
        b = np.bincount([f(s) for s in together], minlength=64)
        assert two_sample_chi2(a, b) > 1e-3


def test_part_b_orders_are_uniform_permutations():
    rng = np.random.default_rng(0)
    orders = part_b_orders([3] * 6000 + [0, 1, 5], True, rng)
    assert [o.tolist() for o in orders[-3:-1]] == [[], [0]] and sorted(orders[-1].tolist()) == [0, 1, 2, 3, 4]
    perms = np.array([o[0] * 9 + o[1] * 3 + o[2] for o in orders[:6000]])
    counts = np.bincount(perms, minlength=27)
    assert np.count_nonzero(counts) == 6
    assert chi2_sf(float(((counts[counts > 0] - 1000) ** 2 / 1000).sum()), 5) > 1e-3
    assert [o.tolist() for o in part_b_orders([2, 3], False, None)] == [[0, 1], [0, 1, 2]]
    with pytest.raises(ValueError, match="rng"):
        part_b_orders([2], True, None)


def test_bench_data_times_each_kind_of_course_batch(capsys):
    """`bench data` runs end to end, and times the course preset's two kinds of batch (all words, GLM's blanks) on
    their own: which kind a short measurement happens to draw must not decide the figure."""
    from minglm.bench import data as bench

    assert bench.main(["--seconds", "0.02", "--bpe-bytes", "20000", "--bpe-vocab", "300"]) == 0
    out = capsys.readouterr().out
    assert "`course` preset's batch all words" in out and "`course` preset's batch GLM's blanks" in out
    assert "`course` preset's batch on average (0.9 of them all words)" in out
    assert "`words` preset's batch (32 windows" in out
