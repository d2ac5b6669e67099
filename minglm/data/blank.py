"""Autoregressive blank infilling: turn a token sequence plus chosen spans into GLM's Part A / Part B tensors.

This is `make_block_data` of the official code (docs/official-code.md §2.5) and the prefix branch of the [gMASK]
objective (§2.4 there), both in the official **0-based** convention (docs/figure2.md §2, §3); `paper_view` converts a
sample to the paper's 1-based Figure 2 view (docs/figure2.md §1) for plots.

Glossary: L = length of the original sample, n = number of spans, S = length of the built sample
(L - masked + n for Part A, plus masked + n for Part B). Everything here is vectorised over tokens: the cost of a
sample is a fixed number of NumPy calls, whatever its length or span count.

Left out: `--random-position` (off by default in the official code) and GLM-10B's `--block-mask-prob` ([dBLOCK]).
Choosing the spans is the samplers' job (samplers.py); this file only builds tensors from given spans.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from minglm.tokenizer import CLS_ID, EOP_ID, EOS_ID, GMASK_ID, MASK_ID, SOP_ID


@dataclass
class Sample:
    """One built sample, official convention. All arrays have length S; Part A is [0, sep), Part B [sep, S)."""

    tokens: np.ndarray  # (S,) int64 model input
    targets: np.ndarray  # (S,) int64, already shifted in Part B: targets[i] is predicted from the output at i
    loss_mask: np.ndarray  # (S,) float32, 1 on Part B (every span token and each <eop>), 0 on Part A
    position_ids: np.ndarray  # (S,) int64, first position row
    block_position_ids: np.ndarray  # (S,) int64, second position row (0 on Part A, 1..len+1 in each span)
    sep: int  # length of Part A: keys < sep are visible to every query
    spans: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))  # (n, 2) in text order
    order: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # Part-B order, indices into spans
    objective: str = "token"

    def __len__(self) -> int:
        return len(self.tokens)


def _special(vocab, name: str, default: int) -> int:
    return int(getattr(vocab, name, default)) if vocab is not None else default


def check_spans(spans, length: int, where: str = "blank_infill") -> np.ndarray:
    """Spans as an (n, 2) int64 array sorted by start; raises if they are empty, out of range or overlap."""
    spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    spans = spans[np.argsort(spans[:, 0], kind="stable")]
    starts, ends = spans[:, 0], spans[:, 1]
    if len(spans) and (starts.min() < 0 or ends.max() > length or np.any(ends <= starts)):
        raise ValueError(f"{where}: spans must be non-empty half-open (start, end) within [0, {length}], "
                         f"got {spans.tolist()}")
    if len(spans) > 1 and np.any(starts[1:] < ends[:-1]):
        raise ValueError(f"{where}: spans overlap: {spans.tolist()}")
    return spans


def blank_infill(tokens, spans, vocab=None, order=None, mask_id=None, shuffle=True, block_position=True, rng=None):
    """Build the GLM sample for `tokens` with the half-open `spans` blanked out (docs/official-code.md §2.5).

    tokens: (L,) ids; spans: (start, end) pairs, non-overlapping (any order; they are sorted into text order).
    vocab: anything with mask_id / sop_id / eop_id attributes (a tokenizer); None uses the shared special ids.
    order: explicit Part-B order, a permutation of range(n) indexing the text-ordered spans (for worked examples);
      otherwise the order is rng.permutation(n) when `shuffle`, else text order (the `--no-shuffle-block` ablation).
    mask_id: the blank token ([MASK] by default; [sMASK] / [gMASK] for the other objectives).
    block_position: False gives the `--no-block-position` ablation (block ids all 1 in Part B).
    """
    tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
    L = len(tokens)
    spans = check_spans(spans, L)
    n = len(spans)
    mask_id = _special(vocab, "mask_id", MASK_ID) if mask_id is None else int(mask_id)
    sop_id, eop_id = _special(vocab, "sop_id", SOP_ID), _special(vocab, "eop_id", EOP_ID)
    starts, ends = spans[:, 0], spans[:, 1]
    lens = ends - starts

    # Part A: drop every span token but the first, which becomes the blank. Part A positions are simply 0..sep-1,
    # so each blank sits at the position of its span start in the corrupted text (the official cumsum - 1 row).
    delta = np.bincount(starts + 1, minlength=L + 1) - np.bincount(ends, minlength=L + 1)  # (L+1,) +1 / -1 marks
    drop = np.cumsum(delta[:L]) > 0  # (L,) True on span tokens after the first
    keep_idx = np.flatnonzero(~drop)
    part_a = tokens[keep_idx].copy()
    sep = len(part_a)
    mask_pos = np.cumsum(~drop)[starts] - 1 if n else np.zeros(0, dtype=np.int64)  # (n,) Part-A index of each blank
    part_a[mask_pos] = mask_id

    # Part B order
    if order is not None:
        order = np.asarray(order, dtype=np.int64).reshape(-1)
        if sorted(order.tolist()) != list(range(n)):
            raise ValueError(f"blank_infill: order must be a permutation of range({n}), got {order.tolist()}")
    elif shuffle and n > 1:
        if rng is None:
            raise ValueError("blank_infill: pass rng (a numpy Generator) to shuffle the spans, "
                             "or order=..., or shuffle=False")
        order = rng.permutation(n)
    else:
        order = np.arange(n)

    # Part B: for each span in `order`, input [<sop>, span], target [span, <eop>], all at the blank's position,
    # block ids 1..len+1. Built for all spans at once: seg says which span each Part-B slot belongs to and
    # within its index inside that span's piece (0 = the <sop> slot).
    piece = lens[order] + 1  # (n,)
    nb = int(piece.sum())
    seg = np.repeat(np.arange(n), piece)  # (nb,)
    within = np.arange(nb) - np.repeat(np.cumsum(piece) - piece, piece)  # (nb,)
    src = starts[order][seg] + within  # index of the target token in `tokens`
    is_first, is_last = within == 0, within == piece[seg] - 1
    b_tokens = np.where(is_first, sop_id, tokens[np.maximum(src - 1, 0)])  # src - 1 = -1 only on <sop> slots
    b_targets = np.where(is_last, eop_id, tokens[np.minimum(src, L - 1)])  # src = L only on an <eop> slot
    b_pos = mask_pos[order][seg]
    b_block = within + 1 if block_position else np.ones(nb, dtype=np.int64)

    return Sample(
        tokens=np.concatenate([part_a, b_tokens]).astype(np.int64),
        targets=np.concatenate([part_a, b_targets]).astype(np.int64),
        loss_mask=np.concatenate([np.zeros(sep, np.float32), np.ones(nb, np.float32)]),
        position_ids=np.concatenate([np.arange(sep), b_pos]).astype(np.int64),
        block_position_ids=np.concatenate([np.zeros(sep, np.int64), b_block]).astype(np.int64),
        sep=sep,
        spans=spans,
        order=order,
        objective="token",
    )


def gmask_prefix(tokens, g: int, vocab=None, mask_id=None, block_position=True) -> Sample:
    """The prefix branch of [gMASK] (docs/official-code.md §2.4): blank out the last `g` tokens of the sample.

    tokens = text[:L-g] + [gMASK, <sop>] + text[L-g:-1];  targets = text[:L-g] + [gMASK] + text[L-g:]
    Part-B positions all equal L-g (the [gMASK] position); block ids 0 on [gMASK], then 1..g. There is no <eop>:
    the last target is the sample's own last token (its <eos> when the document ends there).
    """
    tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
    L = len(tokens)
    if not 1 <= g <= L - 1:
        raise ValueError(f"gmask_prefix: g must be in [1, {L - 1}] for a sample of length {L}, got {g}")
    mask_id = _special(vocab, "gmask_id", GMASK_ID) if mask_id is None else int(mask_id)
    sop_id = _special(vocab, "sop_id", SOP_ID)
    d = L - g  # division: Part A is text[:d] + [gMASK]
    sep = d + 1
    out_tokens = np.concatenate([tokens[:d], [mask_id, sop_id], tokens[d:-1]])
    targets = np.concatenate([tokens[:d], [mask_id], tokens[d:]])
    pos = np.concatenate([np.arange(sep), np.full(g, d)])
    block = np.concatenate([np.zeros(sep, np.int64), np.arange(1, g + 1) if block_position else np.ones(g, np.int64)])
    return Sample(
        tokens=out_tokens.astype(np.int64),
        targets=targets.astype(np.int64),
        loss_mask=np.concatenate([np.zeros(sep, np.float32), np.ones(g, np.float32)]),
        position_ids=pos.astype(np.int64),
        block_position_ids=block.astype(np.int64),
        sep=sep,
        spans=np.array([[d, L]], dtype=np.int64),
        order=np.zeros(1, dtype=np.int64),
        objective="document",
    )


@dataclass
class PaperView:
    """A sample as the paper draws it (Fig. 2): 1-based positions, no [CLS]/<eos>, targets only in Part B (-1 in A)."""

    tokens: np.ndarray
    position_ids: np.ndarray
    block_position_ids: np.ndarray
    targets: np.ndarray
    sep: int


def paper_view(sample: Sample, vocab=None) -> PaperView:
    """Convert the official 0-based view to the paper's figure view (docs/figure2.md §1 vs §2 and §3).

    With a leading [CLS] (real data) the figure is the sample with [CLS] and Part A's <eos> tokens left out and the
    positions unchanged; bare tokens (no [CLS]) get every position + 1. Part-B position rows are treated alike.
    """
    cls_id, eos_id = _special(vocab, "cls_id", CLS_ID), _special(vocab, "eos_id", EOS_ID)
    S, sep = len(sample.tokens), sample.sep
    keep = np.ones(S, dtype=bool)
    has_cls = S > 0 and sample.tokens[0] == cls_id
    if has_cls:
        keep[0] = False
        keep[:sep] &= sample.tokens[:sep] != eos_id
        pos = sample.position_ids.copy()
    else:
        pos = sample.position_ids + 1
    targets = np.where(np.arange(S) >= sep, sample.targets, -1)
    return PaperView(
        tokens=sample.tokens[keep],
        position_ids=pos[keep],
        block_position_ids=sample.block_position_ids[keep],
        targets=targets[keep],
        sep=int(keep[:sep].sum()),
    )
