"""Ready-made samples for the pictures: the paper's Figure-2 example and one real sample from a text or a run.

Everything is built with the data module (`minglm.data`): `blank_infill` for Figure 2 (docs/figure2.md §2, spans
[x3] and [x5 x6], Part B shuffled to [x5 x6], [x3]) and the run's own objective (`make_objective(...).make_batch`)
for real text, so a plot shows exactly the tensors the model trains on. One seeded numpy Generator per call.

Left out: batches of several samples (the plots show one row; build a Batch yourself for more).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from minglm.data.blank import blank_infill
from minglm.data.corpus import load_corpus
from minglm.data.objectives import make_objective
from minglm.tokenizer import CLS_ID, EOS_ID, CharTokenizer, load_tokenizer

DEFAULT_TEXT = "To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer"
FIGURE2_LABELS = {8 + k: f"x{k + 1}" for k in range(6)}  # ids 8..13 stand for x1..x6


def figure2_sample(with_cls: bool = False):
    """The paper's Figure-2 sample and its token labels: (Sample, {id: "x1", ...}).

    with_cls=False: bare tokens x1..x6 (docs/figure2.md §2, sep = 5); True: `[CLS] x1..x6 <eos>` as real data sees it
(§3 there).
    """
    if with_cls:
        tokens = np.array([CLS_ID, 8, 9, 10, 11, 12, 13, EOS_ID])
        spans = [(3, 4), (5, 7)]
    else:
        tokens, spans = np.arange(8, 14), [(2, 3), (4, 6)]
    return blank_infill(tokens, spans, order=[1, 0]), dict(FIGURE2_LABELS)


def frame_text(text: str, tokenizer) -> np.ndarray:
    """`[CLS] text <eos>` as ids (one document, as the loader frames it)."""
    ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
    return np.concatenate([[tokenizer.cls_id], ids, [tokenizer.eos_id]]).astype(np.int64)


def sample_from_text(text: str, tokenizer=None, objective: str = "glm-base", seed: int = 0, mode: str | None = None):
    """One built sample of `text` under `objective` as a Batch of one row, and the tokenizer used.

    tokenizer: a minglm tokenizer, or None (a character tokenizer of the text itself).
    mode: for GLM objectives, force "token" / "sentence" / "document" instead of drawing it.
    """
    if not text:
        raise ValueError("sample_from_text: text is empty")
    tokenizer = CharTokenizer.from_texts([text]) if tokenizer is None else tokenizer
    window = frame_text(text, tokenizer)
    obj = make_objective(objective, tokenizer)
    rng = np.random.default_rng(seed)
    if mode is not None and not hasattr(obj, "choose_mode"):
        raise ValueError(f"sample_from_text: mode={mode!r} only applies to GLM objectives, not {objective!r}")
    batch = obj.make_batch([window], rng, mode=mode)
    return batch, tokenizer


def corpus_excerpt(corpus_name: str = "shakespeare", n_chars: int = 64, seed: int = 0, split: str = "val") -> str:
    """A piece of real text from a corpus: n_chars characters from a line start of a random document."""
    corpus = load_corpus(corpus_name, seed=0)
    docs = corpus.val if split == "val" and corpus.val else corpus.train
    rng = np.random.default_rng(seed)
    doc = docs[int(rng.integers(len(docs)))]
    start = int(rng.integers(max(1, len(doc) - 4 * n_chars)))
    nl = doc.find("\n", start)
    start = nl + 1 if 0 <= nl < len(doc) - n_chars else start
    return doc[start: start + n_chars]


def run_config(run_dir) -> dict:
    """The run's config.json ({"preset", "model", "train"}), or {} when it has none."""
    p = Path(run_dir) / "config.json"
    return json.loads(p.read_text(encoding="utf-8")) if p.exists() else {}


def run_sample(run_dir, seed: int = 0, n_chars: int = 48, text: str | None = None, mode: str | None = None):
    """(Batch of one row, tokenizer) built like the run's training data: its tokenizer, corpus and objective."""
    run_dir = Path(run_dir)
    tok_path = run_dir / "tokenizer.json"
    if not tok_path.exists():
        raise FileNotFoundError(f"run_sample: {run_dir} has no tokenizer.json (is it a run folder?)")
    tokenizer = load_tokenizer(tok_path)
    train = run_config(run_dir).get("train", {})
    objective = train.get("objective", "glm-base")
    if text is None:
        try:
            text = corpus_excerpt(train.get("corpus", "shakespeare"), n_chars, seed)
        except (OSError, ValueError):  # the corpus may be a path that no longer exists
            text = DEFAULT_TEXT[:n_chars]
    return sample_from_text(text, tokenizer, objective, seed, mode)
