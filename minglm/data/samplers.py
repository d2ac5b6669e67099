"""Choosing what to blank out: token-level spans, sentences, and the long [gMASK] span.

The § numbers in this file are sections of docs/official-code.md. Each sampler takes one framed sample
(`[CLS] doc <eos> [CLS] doc ...`, §1) and returns half-open (start, end) spans
in sample coordinates; blank.py then builds the tensors. The rules follow the official `ConstructBlockStrategy`:

- token level (§2.2): span lengths ~ Poisson(3) truncated to 1..39, drawn until >= int(0.15 * len) tokens;
  placed per document (sorted by length; every document but the longest takes spans greedily up to 15 % of its
  length, the longest takes the rest), with `sample_spans`' offsets formula, so spans never touch, never cross an
  <eos> and never cover the last token.
- sentence level (§2.3): whole sentences (ending in . ? ! ; : 。 ？ ！ ； … or a newline, found as the official
  loop finds them, quirks included: see `sentence_spans`), shuffled, taken until their total reaches 15 %.
- document level (§2.4): one span of length g, as a suffix (prefix branch) or anywhere (infill branch).

One deliberate difference: where the official code *drops* a sample whose spans do not fit, we *redraw* the span
lengths and count it in `stats["resampled"]`; after `max_tries` failed draws the spans are packed into the documents
as tightly as they fit, shortest spans first (`stats["packed"]`), and only a sample too short for that raises.
A training batch draws the token-level spans of all its windows together (`sample_batch`): the same rules and
distribution, other numbers from the rng, and no Python loop over windows.
"""

from __future__ import annotations

import math

import numpy as np

from minglm.tokenizer import CLS_ID, EOS_ID

SENTENCE_END_CHARS = ".?!;:。？！；…\n"


def truncated_poisson_pmf(lam: float = 3.0, max_span_len: int = 39) -> np.ndarray:
    """P(len = k) for k = 1..max_span_len: Poisson(lam) with 0 excluded and renormalised (official range(1, 40))."""
    k = np.arange(1, max_span_len + 1)
    logp = k * math.log(lam) - lam - np.array([math.lgamma(i + 1) for i in k])
    p = np.exp(logp)
    return p / p.sum()


def draw_span_lengths(total: int, rng: np.random.Generator, cdf: np.ndarray) -> np.ndarray:
    """Draw lengths (1-based, by inverse CDF) until their sum reaches `total`; the last one may overshoot."""
    if total <= 0:
        return np.zeros(0, dtype=np.int64)
    out = []
    need = total
    while need > 0:
        n = max(4, int(need / 2.5) + 4)  # the mean is about 3.2, so one batch almost always suffices
        lens = np.searchsorted(cdf, rng.random(n), side="right") + 1
        csum = np.cumsum(lens)
        k = int(np.searchsorted(csum, need))  # first index where the running sum reaches `need`
        if k < n:
            out.append(lens[: k + 1])
            need = 0
        else:
            out.append(lens)
            need -= int(csum[-1])
    return np.concatenate(out).astype(np.int64)


def split_documents(tokens: np.ndarray, cls_id: int = CLS_ID, eos_id: int = EOS_ID) -> list[tuple[int, int]]:
    """(offset, length) of each maskable document region of a framed sample, official order (last document first).

    A document excludes its leading [CLS] and its <eos>; the sample's last token is never maskable (§2.2).
    """
    L = len(tokens)
    eos = np.flatnonzero(tokens == eos_id)
    starts = np.concatenate([[-1], eos])  # index of the <eos> before each document (-1 for the first)
    ends = np.concatenate([eos, [L]])  # exclusive end of each document
    docs = []
    for k in range(len(starts) - 1, -1, -1):  # per document, not per token
        s, e = int(starts[k]), int(ends[k])
        if s + 1 < L and tokens[s + 1] == cls_id:
            s += 1
        length = e - s - 1
        if e == L and length > 0:
            length -= 1
        docs.append((s + 1, length))
    return docs


def sample_spans(lengths: np.ndarray, doc_len: int, rng: np.random.Generator, offset: int = 0) -> np.ndarray:
    """Place spans of `lengths` (in this order) inside [offset, offset + doc_len), at least one token apart.

    Official formula: m = doc_len - sum(lengths) - n + 1; draw n offsets uniformly in 0..m, sort them; span i starts
    at offset_i + sum_{j<i}(len_j + 1). Returns an (n, 2) array of (start, end).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    m = doc_len - int(lengths.sum()) - n + 1
    if m < 0:
        raise ValueError(f"sample_spans: spans of total {int(lengths.sum())} (n={n}) do not fit in {doc_len} tokens")
    places = np.sort(rng.integers(0, m + 1, size=n))
    starts = offset + places + np.concatenate([[0], np.cumsum(lengths + 1)[:-1]])
    return np.stack([starts, starts + lengths], axis=1)


def place_spans(tokens: np.ndarray, lengths: np.ndarray, rng: np.random.Generator, ratio: float = 0.15,
                cls_id: int = CLS_ID, eos_id: int = EOS_ID, pack: bool = False) -> np.ndarray | None:
    """`sample_span_in_document` (§2.2): spread the spans over the documents; None when they do not all fit.

    pack=True is the fallback: every document takes as many spans as physically fit, not just 15 % of it.
    """
    docs = sorted(split_documents(tokens, cls_id, eos_id), key=lambda d: d[1])  # stable, like the official sort
    out, i, n = [], 0, len(lengths)
    for k, (offset, doc_len) in enumerate(docs):
        if i >= n:
            break
        rest = lengths[i:]
        csum = np.cumsum(rest)
        if k == len(docs) - 1 or pack:  # fit with one separator between spans: sum + count - 1 <= doc_len
            take = int(np.searchsorted(csum + np.arange(len(rest)), doc_len, side="right"))
        else:  # greedy up to 15 % of the document
            take = int(np.searchsorted(csum, int(ratio * doc_len), side="right"))
        if take:
            out.append(sample_spans(rest[:take], doc_len, rng, offset))
            i += take
    if i < n:
        return None
    if not out:
        return np.zeros((0, 2), dtype=np.int64)
    spans = np.concatenate(out)
    return spans[np.argsort(spans[:, 0])]  # text order (documents were visited shortest first)


class TokenSpanSampler:
    """Token-level span sampler (§2.2) with resampling instead of dropping; counts events in `stats`."""

    def __init__(self, ratio: float = 0.15, lam: float = 3.0, max_span_len: int = 39, max_tries: int = 20,
                 cls_id: int = CLS_ID, eos_id: int = EOS_ID):
        self.ratio, self.max_tries = ratio, max_tries
        self.pmf = truncated_poisson_pmf(lam, max_span_len)
        self.cdf = np.cumsum(self.pmf)
        self.cdf[-1] = 1.0
        self.cls_id, self.eos_id = cls_id, eos_id
        self.stats = {"samples": 0, "resampled": 0, "packed": 0}

    def __call__(self, tokens: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        tokens = np.asarray(tokens)
        total = int(self.ratio * len(tokens))  # len counts [CLS] and <eos>
        self.stats["samples"] += 1
        return self._shrinking(tokens, total, rng)

    def _shrinking(self, tokens: np.ndarray, total: int, rng: np.random.Generator, first_try: int = 0) -> np.ndarray:
        """``_spans``, and when even packing fails (a short window cut by documents' ends cannot hold the ratio),
        one masked token fewer at a time, counted in ``stats["shrunk"]``: a run never dies on an unlucky window.
        ``first_try``: the tries already made for this total elsewhere (``sample_batch``)."""
        while True:
            try:
                return self._spans(tokens, total, rng, first_try)
            except ValueError:
                first_try = 0
                if total <= 1:
                    raise
                total -= 1
                self.stats["shrunk"] = self.stats.get("shrunk", 0) + 1

    def _spans(self, tokens: np.ndarray, total: int, rng: np.random.Generator, first_try: int = 0) -> np.ndarray:
        for attempt in range(first_try, self.max_tries + 1):
            lengths = draw_span_lengths(total, rng, self.cdf)
            pack = attempt == self.max_tries
            if pack:  # last resort: small spans first, so they fill the small documents
                lengths = np.sort(lengths)
            spans = place_spans(tokens, lengths, rng, self.ratio, self.cls_id, self.eos_id, pack=pack)
            if spans is not None:
                if pack:
                    self.stats["packed"] += 1
                return spans
            self.stats["resampled"] += 1
        raise ValueError(f"TokenSpanSampler: cannot place {total} masked tokens in a sample of length {len(tokens)} "
                         f"with documents {split_documents(tokens, self.cls_id, self.eos_id)}; use longer documents "
                         "or a shorter sequence length")

    def sample_batch(self, samples: list, rng: np.random.Generator) -> list[np.ndarray]:
        """``self(s, rng)`` for every sample of a batch, with the draws of the whole batch made together.

        The rules, and so the distribution of the spans, are ``__call__``'s; the draws are not the same numbers,
        since they come from the rng in another order. A sample with one document (no ``<eos>`` before its last
        token: every window of a long text but the few that cross a document's end) gets its span lengths from one
        (B, n) array of draws and their places from another, with no Python loop over samples; the samples whose
        lengths did not fit draw again together (counted as resamples, as ``_spans`` counts them), up to
        ``max_tries`` times. A sample with several documents, or still without spans, then goes through
        ``_shrinking`` one by one, after the batch's draws.
        """
        samples = [np.asarray(x) for x in samples]
        self.stats["samples"] += len(samples)
        return self._batch_spans(samples, rng)

    def _batch_spans(self, samples: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
        B = len(samples)
        if not B:
            return []
        size = np.fromiter(map(len, samples), dtype=np.int64, count=B)  # (B,)
        total = (self.ratio * size).astype(np.int64)  # int(ratio * len), as __call__ rounds it
        flat = np.concatenate(samples) if size.sum() else np.zeros(0, dtype=np.int64)
        begin = np.cumsum(size) - size  # (B,) where each sample starts in `flat`
        eos = np.flatnonzero(flat == self.eos_id)
        owner = np.searchsorted(begin, eos, side="right") - 1  # the sample of each <eos>
        several = np.zeros(B, dtype=bool)
        several[owner[eos != begin[owner] + size[owner] - 1]] = True  # an <eos> before the sample's last token
        one = np.flatnonzero((size >= 2) & ~several)  # (F,) one-document samples, drawn together
        offset = (flat[begin[one]] == self.cls_id).astype(np.int64)  # the document starts after a leading [CLS]
        doc_len = size[one] - offset - 1  # and never covers the sample's last token (split_documents)
        out: list = [None] * B
        tried = np.zeros(B, dtype=np.int64)  # the batched tries each sample has had
        for _ in range(self.max_tries):  # _spans' tries, each one for all the samples still without spans
            if not len(one):
                break
            t = total[one]
            n_max = max(int(t.max()), 1)  # every length is >= 1, so `total` draws always reach `total`
            col = np.arange(n_max)
            lens = np.searchsorted(self.cdf, rng.random((len(one), n_max)), side="right") + 1  # (F, n_max)
            csum = np.cumsum(lens, axis=1)
            n = np.where(t > 0, np.argmax(csum >= t[:, None], axis=1) + 1, 0)  # spans until the sum reaches t
            used = col < n[:, None]  # (F, n_max)
            used_sum = np.where(used, csum, 0).max(axis=1)
            fits = used_sum + n - 1 <= doc_len  # with one token between spans (place_spans, a last document)
            room = np.where(fits, doc_len - used_sum - n + 1, 0)  # sample_spans' m
            places = rng.integers(0, room[:, None] + 1, size=(len(one), n_max))  # uniform in 0..m
            places = np.sort(np.where(used, places, 1 << 40), axis=1)  # the unused columns sort last
            starts = offset[:, None] + places + csum - lens + col  # place_i + sum_{j<i} (len_j + 1)
            keep = used & fits[:, None]
            spans = np.split(np.stack([starts[keep], (starts + lens)[keep]], axis=1), np.cumsum(n[fits])[:-1])
            for i, sp in zip(one[fits].tolist(), spans):  # per sample: hands each its rows of the flat result
                out[i] = sp
            self.stats["resampled"] += int((~fits).sum())
            one, offset, doc_len = one[~fits], offset[~fits], doc_len[~fits]
            tried[one] += 1
        for i in range(B):  # the rest one by one, as __call__ draws them (after max_tries, its try that packs)
            if out[i] is None:
                out[i] = self._shrinking(samples[i], int(total[i]), rng, int(tried[i]))
        return out


def word_edge_tables(tokenizer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(V,) bool tables for `WordSpanSampler`: does token i's text start with a letter, or is it a clitic that
    belongs to the word before it (``'ll``, ``'s``, ``'d``: ``I'll`` is one word, as the fill benchmark counts
    words); may a word's letters follow it (its text ends with a letter, or is all spaces); does it hold a letter."""
    V = tokenizer.vocab_size
    first, joins, letter = np.zeros(V, dtype=bool), np.zeros(V, dtype=bool), np.zeros(V, dtype=bool)
    for i in range(8, V):  # the 8 specials are never letters
        text = tokenizer.decode([i])
        if text and text != "\ufffd":
            first[i] = text[0].isalpha() or (len(text) > 1 and text[0] == "'" and text[1:].isalpha())
            joins[i] = text[-1].isalpha() or text.strip(" ") == ""
            letter[i] = any(c.isalpha() for c in text)
    return first, joins, letter


class WordSpanSampler(TokenSpanSampler):
    """GLM's token-level sampler over whole words: span lengths count units, not tokens, so a blank never cuts a
    word in two (``kno[MASK]t``). A unit is one word with the spaces before it (`` the``), or one other token
    (punctuation, a newline); this is the unit byte-level BPE already has, and a character tokenizer now shares
    it. The Poisson lengths, the mask ratio (of units) and the placement rules are `TokenSpanSampler`'s; then each
    span is trimmed to start and end with a word, so punctuation and line breaks at its edges stay in the text
    (a span of punctuation alone is dropped, unless every span was).

    A named deviation from GLM, whose spans are over word pieces: a span of characters rarely matches what a user
    blanks, which is a whole word or a few.
    """

    def __init__(self, first_letter: np.ndarray, joins_word: np.ndarray, has_letter: np.ndarray,
                 known_only: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.first_letter, self.joins_word, self.has_letter = first_letter, joins_word, has_letter
        self.known_only = known_only  # spans start and end only at words the vocabulary holds as one token

    def __call__(self, tokens: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        # specials are units of their own, so the documents survive in the units; the draws are TokenSpanSampler's
        draw = super().__call__
        return self._words([np.asarray(tokens)], lambda units: [draw(units[0], rng)])[0]

    def sample_batch(self, samples: list, rng: np.random.Generator) -> list[np.ndarray]:
        """``self(s, rng)`` for every sample, the batch's draws made together (``TokenSpanSampler.sample_batch``),
        and the units and the trimming to words done on all samples at once (``_words``)."""
        samples = [np.asarray(x) for x in samples]
        self.stats["samples"] += len(samples)
        return self._words(samples, lambda units: self._batch_spans(units, rng))

    def every_word(self, samples: list) -> list[np.ndarray]:
        """Each sample's words that the vocabulary holds as one token, each a one-token span, (n, 2) a sample in
        text order; never a sample's first or last token (its [CLS], and where the window was cut). The blanks of
        ``GLMObjective.all_words``: no draws, every such word at once."""
        samples = [np.asarray(x) for x in samples]
        B = len(samples)
        if not B:
            return []
        size, flat, begin, offsets = self._units(samples)
        length = np.diff(np.append(offsets, len(flat)))
        owner = np.searchsorted(begin, offsets, side="right") - 1  # (U,) the sample of each unit
        at = offsets - begin[owner]  # the unit's place in its sample
        ok = self.has_letter[flat[offsets]] & (length == 1) & (at > 0) & (at < size[owner] - 1)
        at, owner = at[ok], owner[ok]
        spans = np.stack([at, at + 1], axis=1)
        return np.split(spans, np.cumsum(np.bincount(owner, minlength=B))[:-1])

    def _units(self, samples: list[np.ndarray]):
        """The samples laid back to back as one token sequence ``flat`` and cut into word units: (size (B,), flat,
        begin (B,) where each sample starts in it, offsets (U,) the first token of each unit in it). A unit is a word
        with the spaces before it or one other token; a unit boundary is forced where each sample begins."""
        size = np.fromiter(map(len, samples), dtype=np.int64, count=len(samples))
        flat = np.concatenate(samples) if size.sum() else np.zeros(0, dtype=np.int64)
        begin = np.cumsum(size) - size
        starts = np.ones(len(flat), dtype=bool)
        starts[1:] = ~(self.first_letter[flat[1:]] & self.joins_word[flat[:-1]])
        starts[begin[size > 0]] = True  # no unit runs on from one sample into the next
        return size, flat, begin, np.flatnonzero(starts)

    def _words(self, samples: list[np.ndarray], draw) -> list[np.ndarray]:
        """Cut each sample into units, ``draw(list of each sample's unit tokens)`` -> each sample's unit spans, then
        trim every span to start and end with a word and return it in token positions, one (n, 2) array a sample.

        The samples are laid back to back, with a unit boundary forced where each begins, and treated as one token
        sequence. A trimmed span cannot reach into a neighbouring sample: it would have no word inside its own
        sample, and such a span is dropped. A sample keeps its spans untrimmed when none of them holds a word."""
        B = len(samples)
        if not B:
            return []
        size, flat, begin, offsets = self._units(samples)
        n_units = np.bincount(np.searchsorted(begin, offsets, side="right") - 1, minlength=B)
        unit_begin = np.cumsum(n_units) - n_units  # (B,) each sample's first unit
        unit_spans = draw(np.split(flat[offsets], unit_begin[1:]))  # per sample, in its own units
        counts = np.fromiter(map(len, unit_spans), dtype=np.int64, count=B)
        owner = np.repeat(np.arange(B), counts)  # (N,) the sample of each span
        us = np.concatenate(unit_spans).reshape(-1, 2) + unit_begin[owner][:, None]  # (N, 2) in all units
        # a word unit holds a letter: a first token with one, or more than one token (letters joined on)
        length = np.diff(np.append(offsets, len(flat)))
        word = self.has_letter[flat[offsets]] | (length > 1)  # (U,)
        if self.known_only:  # a word spelled in pieces or bytes is never a span's first or last word
            word = self.has_letter[flat[offsets]] & (length == 1)
        idx = np.arange(len(offsets))
        next_word = np.minimum.accumulate(np.where(word, idx, len(idx))[::-1])[::-1]  # first word unit >= i
        prev_word = np.maximum.accumulate(np.where(word, idx, -1))  # last word unit <= i
        a, b = next_word[us[:, 0]], prev_word[us[:, 1] - 1] + 1
        keep = a < b
        trimmed = np.bincount(owner[keep], minlength=B)[owner] > 0  # does the span's sample keep a trimmed span?
        sel = keep | ~trimmed
        a, b, owner = np.where(trimmed, a, us[:, 0])[sel], np.where(trimmed, b, us[:, 1])[sel], owner[sel]
        bounds = np.append(offsets, len(flat))
        spans = np.stack([bounds[a], bounds[b]], axis=1) - begin[owner][:, None]
        return np.split(spans, np.cumsum(np.bincount(owner, minlength=B))[:-1])


def sentence_end_table(tokenizer, chars: str = SENTENCE_END_CHARS) -> np.ndarray:
    """(V,) bool: does token id contain a sentence-end character (official `contains_sentence_end`)?"""
    table = np.zeros(tokenizer.vocab_size, dtype=bool)
    token_bytes = getattr(tokenizer, "token_bytes", None)
    if token_bytes is not None:  # byte-level BPE: look for the character's UTF-8 bytes inside the token
        marks = [c.encode("utf-8") for c in chars]
        for i in range(8, tokenizer.vocab_size):  # once per vocabulary entry, not per token of text
            table[i] = any(m in token_bytes[i] for m in marks)
        return table
    names = tokenizer.id_to_token
    for i in range(8, tokenizer.vocab_size):
        table[i] = any(c in names[i] for c in chars)
    return table


def sentence_spans(tokens: np.ndarray, is_end: np.ndarray, cls_id: int = CLS_ID, eos_id: int = EOS_ID) -> np.ndarray:
    """All sentences of a framed sample as (n, 2) spans, exactly as the official loop finds them (§2.3).

    A sentence ends at a token containing a sentence-end mark and starts after the previous end mark or <eos>
    (after a leading [CLS] for the first one). Quirks kept from the official code: a run cut off by <eos> without
    an end mark is no sentence; the run after an <eos> starts *at* the next document's [CLS], so that [CLS] can be
    blanked with its sentence; and the unfinished run at the end of the sample is a sentence too.
    """
    tokens = np.asarray(tokens)
    L = len(tokens)
    ends_here = is_end[tokens]
    bpos = np.flatnonzero(ends_here | (tokens == eos_id))  # every index that resets the running sentence start
    first = 1 if L and tokens[0] == cls_id else 0
    starts = np.concatenate([[first], bpos + 1])[:-1] if len(bpos) else np.zeros(0, dtype=np.int64)
    sel = ends_here[bpos]
    spans = [np.stack([starts[sel], bpos[sel] + 1], axis=1)]
    last = int(bpos[-1]) + 1 if len(bpos) else first
    if last < L:
        spans.append(np.array([[last, L]]))
    return np.concatenate(spans).astype(np.int64)


def choose_sentences(tokens: np.ndarray, is_end: np.ndarray, rng: np.random.Generator, ratio: float = 0.15,
                     cls_id: int = CLS_ID, eos_id: int = EOS_ID) -> np.ndarray:
    """Shuffle the sentences and take them until their total length reaches int(ratio * len) (§2.3)."""
    spans = sentence_spans(tokens, is_end, cls_id, eos_id)
    if len(spans) == 0:
        return spans
    spans = spans[rng.permutation(len(spans))]
    csum = np.cumsum(spans[:, 1] - spans[:, 0])
    take = min(int(np.searchsorted(csum, int(ratio * len(tokens)))) + 1, len(spans))
    return spans[:take]


def is_multi_document(tokens: np.ndarray, eos_id: int = EOS_ID) -> bool:
    """Official `multiple_doc`: an <eos> somewhere other than the last token."""
    eos = np.flatnonzero(np.asarray(tokens) == eos_id)
    return bool(len(eos) and eos[0] != len(tokens) - 1)


def draw_gmask_bound(lengths, rng: np.random.Generator, min_ratio: float) -> int:
    """The per-batch length bound of [gMASK] (§2.4): randint(int(min_ratio * min_len), longest - 2), inclusive."""
    lengths = np.asarray(lengths)
    lo, hi = int(min_ratio * int(lengths.min())), int(lengths.max()) - 2
    lo = max(lo, 1)
    if hi < lo:
        raise ValueError(f"draw_gmask_bound: samples of length {lengths.tolist()} are too short for [gMASK]")
    return int(rng.integers(lo, hi + 1))
