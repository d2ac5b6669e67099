"""Batches: right-padding built samples into the `Batch` every objective produces, the dense reference mask, and a
pretty-printer that shows a sample's Part A, Part B, positions and mask.

Follows docs/official-code.md §2.6 (padding: id 0, target 0, loss 0, both position rows 0, after Part B so no real token
sees a pad) and docs/mask.md (the mask is tril plus every column < sep; only `sep` is carried, never a T x T matrix).

Glossary: B = batch size, T = padded length of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from minglm.data.blank import Sample
from minglm.masks import glm_mask
from minglm.tokenizer import EOS_ID, N_SPECIAL, PAD_ID, SPECIAL_TOKENS


@dataclass
class Batch:
    """What the model and the loss consume (the shared contract). All int64 except loss_mask (float32)."""

    tokens: np.ndarray  # (B, T)
    targets: np.ndarray  # (B, T)
    loss_mask: np.ndarray  # (B, T) float32
    position_ids: np.ndarray  # (B, T)
    block_position_ids: np.ndarray  # (B, T)
    sep: np.ndarray  # (B,) keys < sep[b] are visible to every query of row b
    lengths: np.ndarray  # (B,) unpadded length of each row
    objective: str

    ROW_FIELDS = ("tokens", "targets", "loss_mask", "position_ids", "block_position_ids")  # the (B, T) arrays

    @property
    def shape(self) -> tuple[int, int]:
        return self.tokens.shape

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def row(self, i: int) -> Sample:
        """Row i without its padding, as a Sample."""
        n = int(self.lengths[i])
        return Sample(
            tokens=self.tokens[i, :n],
            targets=self.targets[i, :n],
            loss_mask=self.loss_mask[i, :n],
            position_ids=self.position_ids[i, :n],
            block_position_ids=self.block_position_ids[i, :n],
            sep=int(self.sep[i]),
            objective=self.objective,
        )

    def to_dict(self) -> dict[str, np.ndarray]:
        names = ("tokens", "targets", "loss_mask", "position_ids", "block_position_ids", "sep", "lengths")
        return {k: getattr(self, k) for k in names}


def collate(samples: list[Sample], objective: str | None = None, pad_to: int | None = None) -> Batch:
    """Right-pad samples with zeros into a Batch (docs/official-code.md §2.6). `pad_to` fixes T (else the longest)."""
    if not samples:
        raise ValueError("collate: need at least one sample")
    lengths = np.array([len(s.tokens) for s in samples], dtype=np.int64)
    T = int(lengths.max()) if pad_to is None else int(pad_to)
    if lengths.max() > T:
        raise ValueError(f"collate: a sample has length {int(lengths.max())} > pad_to={T}")
    B = len(samples)
    # Fill one flat buffer per field with a single concatenate + scatter, instead of B row assignments each.
    flat_idx = np.concatenate([np.arange(n) + i * T for i, n in enumerate(lengths.tolist())])
    out = {}
    for name in Batch.ROW_FIELDS:
        dtype = np.float32 if name == "loss_mask" else np.int64
        buf = np.zeros(B * T, dtype=dtype)
        buf[flat_idx] = np.concatenate([getattr(s, name) for s in samples])
        out[name] = buf.reshape(B, T)  # (B, T)
    if PAD_ID != 0:  # pads are written as zeros above; the contract fixes the pad id at 0
        raise AssertionError("collate assumes the pad id is 0")
    return Batch(
        sep=np.array([s.sep for s in samples], dtype=np.int64),
        lengths=lengths,
        objective=objective if objective is not None else samples[0].objective,
        **out,
    )


def dense_mask(batch_or_sep, T: int | None = None) -> np.ndarray:
    """The (B, T, T) bool attention mask, True = may attend: tril plus every column < sep (``minglm.masks.glm_mask``).

    Only for reference code, tests and plots: the model gets `sep`. Accepts a Batch, a Sample, an int or a (B,) array.
    """
    if isinstance(batch_or_sep, Batch):
        seps, T = batch_or_sep.sep, batch_or_sep.tokens.shape[1] if T is None else T
    elif isinstance(batch_or_sep, Sample):
        seps, T = np.array([batch_or_sep.sep]), len(batch_or_sep.tokens) if T is None else T
    else:
        seps = np.atleast_1d(np.asarray(batch_or_sep, dtype=np.int64))
        if T is None:
            raise ValueError("dense_mask: pass T together with a sep value or array")
    return glm_mask(np, seps, T)[:, 0]  # (B, T, T)


def _token_names(ids: np.ndarray, tokenizer) -> list[str]:
    names = []
    for i in ids.tolist():
        if i == EOS_ID:
            names.append("<eos>")
        elif i < N_SPECIAL:
            names.append(SPECIAL_TOKENS[i])
        else:
            s = tokenizer.decode([i]) if tokenizer is not None else str(i)
            names.append(s.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "␣") or "''")
    return names


def describe(sample_or_batch, tokenizer=None, row: int = 0, max_tokens: int = 64, show_mask: bool | None = None) -> str:
    """A readable dump of one sample: Part A and Part B as text, then a column per token (input, target, loss,
    position, block position), and the attention mask as a picture when the sample is short.

    Accepts a Sample, or a Batch plus `row`. Columns beyond `max_tokens` are elided in the table (Part A / B text
    is always complete).
    """
    s = sample_or_batch.row(row) if isinstance(sample_or_batch, Batch) else sample_or_batch
    S, sep = len(s.tokens), s.sep

    def text(ids):  # specials by name, characters as themselves (newlines shown as \n)
        return "".join(_token_names(np.asarray(ids), tokenizer)).replace("␣", " ")

    lines = [f"objective: {s.objective}   length: {S}   sep (Part A length): {sep}   "
             f"loss tokens: {int(s.loss_mask.sum())}"]
    lines.append("Part A: " + text(s.tokens[:sep]))
    # Part B as spans: split at <sop>, show each target piece
    b_in, b_tg = s.tokens[sep:], s.targets[sep:]
    starts = np.flatnonzero(s.block_position_ids[sep:] == 1)
    pieces = np.split(np.arange(len(b_in)), starts[1:]) if len(b_in) else []
    for k, p in enumerate(pieces):
        lines.append(f"Part B[{k}] at position {int(s.position_ids[sep + p[0]])}: input '{text(b_in[p])}' "
                     f"-> target '{text(b_tg[p])}'")
    cols = list(range(S)) if S <= max_tokens else list(range(max_tokens // 2)) + list(range(S - max_tokens // 2, S))
    rows = [("idx", [str(i) for i in cols]),
            ("input", [_token_names(s.tokens[[i]], tokenizer)[0] for i in cols]),
            ("target", [_token_names(s.targets[[i]], tokenizer)[0] if s.loss_mask[i] else "" for i in cols]),
            ("loss", [str(int(s.loss_mask[i])) for i in cols]),
            ("pos", [str(int(s.position_ids[i])) for i in cols]),
            ("block", [str(int(s.block_position_ids[i])) for i in cols])]
    width = [max(len(r[1][j]) for r in rows) for j in range(len(cols))]
    for name, vals in rows:
        cells = [v.rjust(w) for v, w in zip(vals, width)]
        if S > max_tokens:
            cells.insert(max_tokens // 2, "...")
        lines.append(f"{name:>6} | " + " ".join(cells))
    if show_mask if show_mask is not None else S <= 40:
        lines.append("mask (row = query, column = key; # = may attend, | = Part A / Part B boundary):")
        m = dense_mask(sep, S)[0]
        for i in range(S):
            r = "".join("#" if m[i, j] else "." for j in range(S))
            lines.append(f"{i:>4} " + r[:sep] + "|" + r[sep:])
    return "\n".join(lines)
