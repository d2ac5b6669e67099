"""The fill benchmark: does a trained GLM fill blanks in real text better than counting words?

A fixed set of blanks is cut from the validation documents (never seen in training): lines of 30-90 characters,
each with one blank that covers either one word ("word" blanks) or 2-4 consecutive words ("span" blanks; the
punctuation between the words goes with them). The model fills each blank greedily, and three fillers are scored
on the same blanks:

- ``model``: GLM's blank infilling (``minglm.generate.fill``, greedy), the text given exactly as a user would type
  it, with ``[MASK]`` in place of the blank;
- ``most frequent``: always the most frequent word of the training documents (``the`` in Shakespeare);
- ``n-gram``: a bidirectional word n-gram counted on the training documents only. For a blank of k words between
  the words L and R it answers the k-word sequence seen most often between L and R; when (L, R) never framed k
  words it backs off to the sequence most likely both after L and before R, then after L alone, then before R,
  then the most frequent k-gram (details in ``NgramFiller``). It is told k (the model is not), which makes it a
  stronger baseline on span blanks.

Scores: exact match (the fill, trimmed of surrounding spaces, equals the truth) and character-level F1 (the
overlap of the two strings as multisets of characters, the SQuAD F1 applied to characters), each averaged over
blanks. Exact match comes with its standard error, and the model is compared with the n-gram blank by blank
(``paired``): on 400 blanks two fillers 2 points apart may not differ at all. The blank set depends only on the
validation documents, ``seed`` and the sizes, so the same run scored twice gives the same table.

What this leaves out: case-insensitive or lemma matches, and perplexity-based scoring of the truth.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from minglm.generate import Sampling, fill

WORD_RE = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*")
BOS, EOS = "<s>", "</s>"  # line boundaries for the n-gram's left and right words
FILL_SEED = 2024  # the default blank set's seed
N_WORD, N_SPAN = 400, 200  # the default blank set's sizes


@dataclass
class Blank:
    """One benchmark item: ``text`` is the line with ``[MASK]`` where ``truth`` was."""

    text: str
    truth: str
    kind: str  # "word" (one word) or "span" (2-4 words)
    n_words: int
    left: str  # the word before the blank in its line, or <s>
    right: str  # the word after it, or </s>


def candidate_lines(docs: list[str], min_chars: int = 30, max_chars: int = 90) -> list[str]:
    """The validation lines a blank may be cut from: 30-90 characters, mostly letters, at least six words."""
    lines = []
    for doc in docs:
        for line in doc.splitlines():
            line = line.strip()
            if not (min_chars <= len(line) <= max_chars) or "[" in line or "]" in line:
                continue
            if sum(c.isalpha() for c in line) < 0.6 * len(line):
                continue  # stage directions of symbols, numbers
            if len(WORD_RE.findall(line)) >= 6:
                lines.append(line)
    return lines


def build_blank_set(val_docs: list[str], n_word: int = N_WORD, n_span: int = N_SPAN, seed: int = FILL_SEED,
                    min_chars: int = 30, max_chars: int = 90) -> list[Blank]:
    """``n_word`` one-word blanks, then ``n_span`` blanks of 2-4 words, each in its own validation line."""
    lines = candidate_lines(val_docs, min_chars, max_chars)
    need = n_word + n_span
    if len(lines) < need:
        raise ValueError(f"build_blank_set: the validation documents have {len(lines)} usable lines of "
                         f"{min_chars}-{max_chars} characters, fewer than the {need} blanks asked for")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lines))[:need]
    blanks = []
    for j, i in enumerate(order):
        line = lines[int(i)]
        words = list(WORD_RE.finditer(line))
        k = 1 if j < n_word else int(rng.integers(2, 5))
        start = int(rng.integers(0, len(words) - k + 1))
        first, last = words[start], words[start + k - 1]
        left = words[start - 1].group() if start > 0 else BOS
        right = words[start + k].group() if start + k < len(words) else EOS
        blanks.append(Blank(text=line[: first.start()] + "[MASK]" + line[last.end():],
                            truth=line[first.start(): last.end()], kind="word" if k == 1 else "span",
                            n_words=k, left=left, right=right))
    return blanks


# --------------------------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------------------------


def exact_match(pred: str, truth: str) -> float:
    return float(pred.strip() == truth.strip())


def char_f1(pred: str, truth: str) -> float:
    """F1 of the two strings as multisets of characters (spaces ignored): 1.0 when equal, 0.0 when disjoint."""
    p, t = Counter(pred.replace(" ", "")), Counter(truth.replace(" ", ""))
    common = sum((p & t).values())
    if common == 0:
        return float(not p and not t)
    precision, recall = common / sum(p.values()), common / sum(t.values())
    return 2 * precision * recall / (precision + recall)


def score(preds: list[str], blanks: list[Blank]) -> dict:
    """Mean exact match and char F1, per kind of blank and over all, as fractions, with the standard error of the
    exact match, sqrt(p(1 - p)/n): on 400 blanks a filler at 10 % is known to about ±1.5 points."""
    out = {}
    for kind in ("word", "span", "all"):
        pairs = [(p, b.truth) for p, b in zip(preds, blanks) if kind == "all" or b.kind == kind]
        n = len(pairs)
        exact = sum(exact_match(p, t) for p, t in pairs) / n if n else None
        out[kind] = {"n": n,  # None when there are no blanks of this kind
                     "exact": exact,
                     "exact_se": (exact * (1 - exact) / n) ** 0.5 if n else None,
                     "f1": sum(char_f1(p, t) for p, t in pairs) / n if n else None}
    return out


def paired(preds: list[str], other: list[str], blanks: list[Blank], kind: str = "word") -> dict:
    """Two fillers on the same blanks of one kind: how many each alone got right, how many both, and the difference
    of their exact match with its paired standard error (blanks both get right or both miss add no noise):
    se = sqrt(b + c - (b - c)²/n) / n, b and c the blanks only one of them got right."""
    hits = [(exact_match(p, b.truth), exact_match(o, b.truth)) for p, o, b in zip(preds, other, blanks)
            if b.kind == kind]
    n = len(hits)
    both = sum(1 for h in hits if h == (1.0, 1.0))
    first = sum(1 for h in hits if h == (1.0, 0.0))
    second = sum(1 for h in hits if h == (0.0, 1.0))
    se = (first + second - (first - second) ** 2 / n) ** 0.5 / n if n else None
    return {"n": n, "both": both, "first_only": first, "second_only": second,
            "diff": (first - second) / n if n else None, "diff_se": se}


# --------------------------------------------------------------------------------------------------------------
# The two counting baselines
# --------------------------------------------------------------------------------------------------------------


def _line_words(docs: list[str]):
    for doc in docs:
        for line in doc.splitlines():
            words = WORD_RE.findall(line)
            if words:
                yield [BOS, *words, EOS]


def most_frequent_word(train_docs: list[str]) -> str:
    counts = Counter(w for words in _line_words(train_docs) for w in words[1:-1])
    if not counts:
        raise ValueError("most_frequent_word: the training documents contain no words")
    return counts.most_common(1)[0][0]


class NgramFiller:
    """The bidirectional word n-gram baseline (see the module docstring), counted on ``train_docs``.

    Context words are compared case-insensitively (``And``/``and``); the answer keeps the case it was seen with.
    For a blank of k words between L and R: the sequence seen most often between L and R; else, among sequences
    seen both after L and before R, the one with the largest count(after L) * count(before R) / count; else the
    most frequent after L, then before R, then overall. Only the contexts the blanks ask about are counted.
    """

    def __init__(self, train_docs: list[str], blanks: list[Blank]):
        ks = sorted({b.n_words for b in blanks})
        self.both: dict[tuple, Counter] = {(b.n_words, b.left.lower(), b.right.lower()): Counter() for b in blanks}
        self.after: dict[tuple, Counter] = {(b.n_words, b.left.lower()): Counter() for b in blanks}
        self.before: dict[tuple, Counter] = {(b.n_words, b.right.lower()): Counter() for b in blanks}
        self.any: dict[int, Counter] = {k: Counter() for k in ks}
        for words in _line_words(train_docs):
            lower = [w.lower() for w in words]
            for k in ks:
                for i in range(1, len(words) - k):  # the k words words[i:i+k], framed by words[i-1], words[i+k]
                    left, right = lower[i - 1], lower[i + k]
                    seq = " ".join(words[i: i + k])
                    self.any[k][seq] += 1
                    if (k, left, right) in self.both:
                        self.both[(k, left, right)][seq] += 1
                    if (k, left) in self.after:
                        self.after[(k, left)][seq] += 1
                    if (k, right) in self.before:
                        self.before[(k, right)][seq] += 1

    def fill(self, blank: Blank) -> str:
        k, left, right = blank.n_words, blank.left.lower(), blank.right.lower()
        both = self.both.get((k, left, right))
        if both:
            return _most_common(both)
        after, before = self.after.get((k, left)) or Counter(), self.before.get((k, right)) or Counter()
        shared = set(after) & set(before)
        if shared:
            scores = Counter({s: after[s] * before[s] / self.any[k][s] for s in shared})
            return _most_common(scores)
        for counts in (after, before, self.any.get(k)):
            if counts:
                return _most_common(counts)
        return ""


def _most_common(counts: Counter) -> str:
    """The most frequent entry; ties go to the alphabetically first, so the answer never depends on order."""
    best = max(counts.values())
    return min(s for s, c in counts.items() if c == best)


# --------------------------------------------------------------------------------------------------------------
# The whole table
# --------------------------------------------------------------------------------------------------------------


@dataclass
class FillReport:
    """Scores of the model and the two baselines on one blank set, with a few example rows."""

    seed: int
    n_word: int
    n_span: int
    scores: dict  # filler -> kind -> {"n", "exact", "f1"}
    rank: int  # the model's rank by exact match on word blanks among the three fillers (1 = best)
    examples: list[dict] = field(default_factory=list)
    vs_ngram: dict = field(default_factory=dict)  # ``paired`` of the greedy model and the n-gram on word blanks
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


FILLERS = ("model", "n-gram", "most frequent")


def model_fills(model, tokenizer, blanks: list[Blank], max_new: int = 40, beams: int = 1) -> list[str]:
    """The model's greedy fill of each blank (at most ``max_new`` tokens; ``beams`` > 1: the most likely whole fill
    of a beam search, ``minglm.generate.beam_search``), trimmed of surrounding spaces."""
    out = []
    sampling = Sampling(greedy=True, max_new_tokens=max_new, beams=beams)
    for b in blanks:
        result = fill(model, tokenizer, b.text, sampling, n_top=0)
        out.append(result.fills[0].strip())
    return out


def evaluate_fill(model, tokenizer, train_docs: list[str], val_docs: list[str], n_word: int = N_WORD,
                  n_span: int = N_SPAN, seed: int = FILL_SEED, n_examples: int = 6, max_new: int = 40,
                  preds: list[str] | None = None, beams: int = 1) -> FillReport:
    """Score the model (or precomputed ``preds``) and both baselines on the blank set of ``val_docs``.

    ``beams`` > 1 adds a row, ``model, N beams``: the same model decoded by beam search (``fill``'s default); the
    rank stays the greedy model's."""
    t0 = time.perf_counter()
    blanks = build_blank_set(val_docs, n_word, n_span, seed)
    if preds is None:
        preds = model_fills(model, tokenizer, blanks, max_new)
    beam_preds = model_fills(model, tokenizer, blanks, max_new, beams) if beams > 1 else None
    ngram = NgramFiller(train_docs, blanks)
    ngram_preds = [ngram.fill(b) for b in blanks]
    frequent = most_frequent_word(train_docs)
    scores = {"model": score(preds, blanks)}
    if beam_preds is not None:
        scores[beam_row(beams)] = score(beam_preds, blanks)
    scores.update({"n-gram": score(ngram_preds, blanks), "most frequent": score([frequent] * len(blanks), blanks)})
    word_exact = {name: scores[name]["word"]["exact"] or 0.0 for name in FILLERS}
    rank = 1 + sum(word_exact[name] > word_exact["model"] for name in FILLERS if name != "model")
    picks = np.random.default_rng(seed + 1).permutation(len(blanks))[:n_examples]
    examples = [{"text": blanks[i].text, "truth": blanks[i].truth, "model": preds[i], "n-gram": ngram_preds[i],
                 **({beam_row(beams): beam_preds[i]} if beam_preds is not None else {})}
                for i in sorted(int(i) for i in picks)]
    return FillReport(seed=seed, n_word=n_word, n_span=n_span, scores=scores, rank=rank, examples=examples,
                      vs_ngram=paired(preds, ngram_preds, blanks), seconds=round(time.perf_counter() - t0, 2))


def beam_row(beams: int) -> str:
    return f"model, {beams} beams"


def format_report(report: FillReport) -> str:
    """The table a person reads: one row per filler, exact match and char F1 on word and span blanks."""
    lines = [f"fill benchmark: {report.n_word} one-word + {report.n_span} 2-4-word blanks from validation lines "
             f"(seed {report.seed})",
             "",
             "| filler | word exact | word char-F1 | span exact | span char-F1 |",
             "|---|---:|---:|---:|---:|"]
    def pct(x):
        return "–" if x is None else f"{100 * x:.1f} %"

    def pm(s):  # exact match ± its standard error
        se = s.get("exact_se")
        return pct(s["exact"]) if se is None else f"{pct(s['exact'])} ± {100 * se:.1f}"

    for name in report.scores:  # model, (model, N beams,) n-gram, most frequent
        s = report.scores[name]
        lines.append(f"| {name} | {pm(s['word'])} | {pct(s['word']['f1'])} | {pm(s['span'])} | "
                     f"{pct(s['span']['f1'])} |")
    lines += ["", f"model rank on word blanks: {report.rank} of {len(FILLERS)}"]
    v = report.vs_ngram
    if v.get("n"):
        lines.append(f"model - n-gram on the same {v['n']} one-word blanks: {100 * v['diff']:+.1f} ± "
                     f"{100 * v['diff_se']:.1f} points (only the model right on {v['first_only']}, only the n-gram "
                     f"on {v['second_only']}, both on {v['both']}; ± is the paired standard error)")
    lines.append("")
    for ex in report.examples:
        lines.append(f"  {ex['text']}")
        beam = "".join(f"   {k} {v!r}" for k, v in ex.items() if k.startswith("model, "))
        lines.append(f"      truth {ex['truth']!r}   model {ex['model']!r}{beam}   n-gram {ex['n-gram']!r}")
    return "\n".join(lines)
