"""Framing documents into fixed-length windows and serving batches to the trainer, resumably.

Framing follows the official `BlockDataset` (docs/official-code.md §1): every document becomes `[CLS] doc <eos>`, the
documents are concatenated, and the stream is cut into windows of `seq_len` tokens, each starting with [CLS] (a
window that starts mid-document gets one in front of its piece), so one window may read `[CLS] ... <eos> [CLS] next
doc ...`; positions and attention are never reset between documents. The official dataset draws documents at random
and moves cuts to sentence boundaries; we cut one fixed stream, so an epoch is well defined: every window once, in
an order the rng permutes at the start of each epoch.

`BlockLoader.state_dict()` is plain JSON (epoch, cursor, window order), so a resumed run continues with exactly the
batches it would have seen; the rng itself belongs to the trainer, which saves its state alongside.
"""

from __future__ import annotations

import numpy as np

from minglm.data.batch import Batch
from minglm.data.objectives import make_objective
from minglm.data.samplers import sentence_end_table
from minglm.tokenizer import CLS_ID, EOS_ID


def frame_documents(docs_ids: list[np.ndarray], cls_id: int = CLS_ID, eos_id: int = EOS_ID) -> np.ndarray:
    """One stream `[CLS] d1 <eos> [CLS] d2 <eos> ...` as an int32 array."""
    if not docs_ids:
        raise ValueError("frame_documents: no documents")
    parts = []
    for d in docs_ids:  # per document
        parts += [np.array([cls_id], dtype=np.int32), np.asarray(d, dtype=np.int32), np.array([eos_id], dtype=np.int32)]
    return np.concatenate(parts)


def make_windows(stream: np.ndarray, seq_len: int, cls_id: int = CLS_ID,
                 is_end: np.ndarray | None = None) -> np.ndarray:
    """(N, seq_len) windows of a framed stream, each starting with [CLS] as every official sample does
    (docs/official-code.md §1).

    Windows tile the stream without overlap. One that begins at a document's own [CLS] is stream[a : a + seq_len];
    one that begins mid-document gets a [CLS] in front of its piece, [CLS] + stream[a : a + seq_len - 1] (the
    official "start of every document piece"). The ragged tail is dropped, unless the whole stream is shorter than
    one window (then it is the only window, shorter than seq_len).

    ``is_end``: a (V,) bool table of the tokens that end a sentence (``samplers.sentence_end_table``). With it,
    every window starts at a sentence start, as the official ``BlockDataset`` moves its random cut to one (the token
    after ``.?!;:`` or a newline): the next window begins at the last sentence start in the second half of the
    previous one, so the sentence cut at a window's end is read again whole at the next one's start (windows then
    overlap by a part of a sentence; where the second half holds no sentence start, they tile as without it).
    """
    if seq_len < 4:
        raise ValueError(f"make_windows: seq_len must be >= 4, got {seq_len}")
    stream = np.asarray(stream)
    if len(stream) <= seq_len:
        return stream[None, :]
    starts, at_cls = [], []
    a, n = 0, len(stream)
    sentence_starts = None
    if is_end is not None:
        after_end = np.zeros(n, dtype=bool)
        after_end[1:] = np.asarray(is_end)[stream[:-1]]
        sentence_starts = np.flatnonzero(after_end | (stream == cls_id))
    while True:  # once per window (the step depends on whether the window begins at a [CLS])
        c = int(stream[a] == cls_id)
        if a + seq_len - 1 + c > n:
            break
        starts.append(a)
        at_cls.append(c)
        end = a + seq_len - 1 + c  # the first stream index after this window
        if sentence_starts is not None:
            j = int(np.searchsorted(sentence_starts, end, side="right")) - 1  # the last sentence start <= end
            if j >= 0 and sentence_starts[j] > a + seq_len // 2:
                end = int(sentence_starts[j])
        a = end
        if a >= n:
            break
    idx = np.array(starts)[:, None] + np.arange(seq_len)[None, :] - 1 + np.array(at_cls)[:, None]  # (N, seq_len)
    windows = stream[np.maximum(idx, 0)]
    windows[:, 0] = cls_id
    return windows


WINDOW_STARTS = ("any", "sentence")


def _windows(docs_ids, tokenizer, seq_len: int, window_start: str) -> np.ndarray:
    """The windows of the framed documents; ``window_start="sentence"`` starts each at a sentence (make_windows)."""
    if window_start not in WINDOW_STARTS:
        raise ValueError(f"window_start must be one of {WINDOW_STARTS}, got {window_start!r}")
    is_end = sentence_end_table(tokenizer) if window_start == "sentence" else None
    return make_windows(frame_documents(docs_ids, tokenizer.cls_id, tokenizer.eos_id), seq_len, tokenizer.cls_id,
                        is_end)


MIN_LINE_WINDOW = 6  # a window cut to its first lines keeps at least [CLS] and five tokens


def cut_to_lines(window: np.ndarray, is_newline: np.ndarray, rng: np.random.Generator,
                 eos_id: int = EOS_ID) -> np.ndarray:
    """The window's first line or lines, then ``<eos>``: ``window[:p] + [<eos>]`` for a line break p drawn uniformly
    among those at index >= MIN_LINE_WINDOW (the break itself dropped), or the window unchanged when it has none.

    What ``fill`` is given is one line or a few, framed as ``[CLS] text <eos>`` (minglm/generate.py,
    ``build_context``); full windows of 32 tokens never show a model a Part A that short. A model trained only on
    them answered a one-line blank with the first byte of a spelled rare word (``The very [MASK] of this fair
    company``: 0.85 on the space byte, which no training span ever began with), while the same blank with two lines
    of the play around it got 0.000 (README, "What was tried", round 4).
    """
    breaks = np.flatnonzero(is_newline[window[MIN_LINE_WINDOW:]]) + MIN_LINE_WINDOW
    if not len(breaks):
        return window
    p = int(breaks[rng.integers(len(breaks))])
    return np.append(window[:p], eos_id)


class BlockLoader:
    """Serves batches of framed windows under one objective (a preset, a baseline name, or an objective object).

    next_batch(rng) takes the next `batch_size` windows of the current epoch's order (wrapping into the next epoch,
    whose order is drawn from rng when it starts) and builds a Batch. Same seed and state => same batches.
    ``line_windows``: the share of windows cut to their first line or lines and closed with ``<eos>``
    (``cut_to_lines``), drawn per window from the same rng; 0 serves the windows whole.
    """

    def __init__(self, docs_ids: list[np.ndarray], tokenizer, seq_len: int, batch_size: int,
                 objective="glm-base", pad_to: int | None = None, window_start: str = "any",
                 line_windows: float = 0.0, **objective_overrides):
        if batch_size < 1:
            raise ValueError(f"BlockLoader: batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= line_windows <= 1.0:
            raise ValueError(f"BlockLoader: line_windows must be in [0, 1], got {line_windows}")
        self.tokenizer, self.seq_len, self.batch_size, self.pad_to = tokenizer, seq_len, batch_size, pad_to
        self.line_windows = float(line_windows)
        self.is_newline = sentence_end_table(tokenizer, "\n") if line_windows > 0 else None
        self.windows = _windows(docs_ids, tokenizer, seq_len, window_start)
        self.objective = (make_objective(objective, tokenizer, **objective_overrides) if isinstance(objective, str)
                          else objective)
        self.epoch = 0
        self.cursor = 0
        self.order: np.ndarray | None = None  # permutation of window indices for the current epoch

    def __len__(self) -> int:
        """Number of windows in one epoch."""
        return len(self.windows)

    @property
    def stats(self) -> dict:
        return self.objective.stats

    def _next_indices(self, rng: np.random.Generator) -> list[int]:
        out = []
        while len(out) < self.batch_size:
            if self.order is None:
                self.order = rng.permutation(len(self.windows))
                self.cursor = 0
            take = self.order[self.cursor : self.cursor + self.batch_size - len(out)]
            out.extend(take.tolist())
            self.cursor += len(take)
            if self.cursor >= len(self.order):
                self.epoch += 1
                self.order = None
        return out

    def next_batch(self, rng: np.random.Generator, mode: str | None = None) -> Batch:
        idx = self._next_indices(rng)
        windows = [self.windows[i] for i in idx]
        if self.line_windows > 0:
            cut = rng.random(len(windows)) < self.line_windows
            windows = [cut_to_lines(w, self.is_newline, rng, self.tokenizer.eos_id) if c else w
                       for w, c in zip(windows, cut)]
        if mode is not None:
            return self.objective.make_batch(windows, rng, mode=mode, pad_to=self.pad_to)
        return self.objective.make_batch(windows, rng, pad_to=self.pad_to)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "n_windows": len(self.windows),
                "order": None if self.order is None else self.order.tolist()}

    def load_state_dict(self, d: dict) -> None:
        if d.get("n_windows", len(self.windows)) != len(self.windows):
            raise ValueError(f"BlockLoader.load_state_dict: state has {d['n_windows']} windows, data has "
                             f"{len(self.windows)} (different corpus, tokenizer or seq_len?)")
        self.epoch, self.cursor = int(d["epoch"]), int(d["cursor"])
        self.order = None if d.get("order") is None else np.asarray(d["order"], dtype=np.int64)


def iter_eval_batches(docs_ids: list[np.ndarray], tokenizer, seq_len: int, batch_size: int, objective="glm-base",
                      seed: int = 1234, max_batches: int | None = None, mode: str | None = None,
                      pad_to: int | None = None, window_start: str = "any", **objective_overrides):
    """Deterministic validation batches: windows in stream order, blanks drawn from a fixed seed.

    Every call with the same arguments yields the same batches, so validation losses are comparable across steps
    and runs. `mode` forces one GLM mode ("token", "sentence", "document") for per-objective validation losses.
    """
    windows = _windows(docs_ids, tokenizer, seq_len, window_start)
    obj = make_objective(objective, tokenizer, **objective_overrides) if isinstance(objective, str) else objective
    rng = np.random.default_rng(seed)
    n = len(windows) if max_batches is None else min(len(windows), max_batches * batch_size)
    for start in range(0, n, batch_size):
        chunk = [windows[i] for i in range(start, min(start + batch_size, n))]
        if mode is not None:
            yield obj.make_batch(chunk, rng, mode=mode, pad_to=pad_to)
        else:
            yield obj.make_batch(chunk, rng, pad_to=pad_to)
