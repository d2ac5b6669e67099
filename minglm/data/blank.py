"""Autoregressive blank infilling: turn a token sequence plus chosen spans into GLM's Part A / Part B tensors.

This is `make_block_data` of the official code (docs/official-code.md §2.5) and the prefix branch of the [gMASK]
objective (§2.4 there), both in the official **0-based** convention (docs/figure2.md §2, §3); `paper_view` converts a
sample to the paper's 1-based Figure 2 view (docs/figure2.md §1) for plots.

Glossary: L = length of the original sample, n = number of spans, S = length of the built sample
(L - masked + n for Part A, plus masked + n for Part B); R = rows (samples) built together, T = their padded length.
Everything here is vectorised over tokens and over samples: `infill_rows` builds a whole batch, its rows laid back to
back in flat arrays, in a fixed number of NumPy calls, whatever its size or span count, and `blank_infill` is that
same code on one row.

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
    spans = check_spans(spans, len(tokens))
    n = len(spans)
    mask_id = _special(vocab, "mask_id", MASK_ID) if mask_id is None else int(mask_id)
    sop_id, eop_id = _special(vocab, "sop_id", SOP_ID), _special(vocab, "eop_id", EOP_ID)
    if order is not None:
        order = np.asarray(order, dtype=np.int64).reshape(-1)
        if sorted(order.tolist()) != list(range(n)):
            raise ValueError(f"blank_infill: order must be a permutation of range({n}), got {order.tolist()}")
    else:
        order = part_b_order(n, shuffle, rng)
    out = infill_rows([tokens], [spans], [order], mask_id, sop_id, eop_id, block_position)
    return Sample(**{k: v[0] for k, v in out.items() if k not in ("sep", "lengths")}, sep=int(out["sep"][0]),
                  spans=spans, order=order, objective="token")


def part_b_order(n: int, shuffle: bool, rng) -> np.ndarray:
    """The Part-B order of n text-ordered spans: ``rng.permutation(n)`` when shuffled (the official
    ``shuffle_block``), else text order (the `--no-shuffle-block` ablation). One span needs no draw."""
    if shuffle and n > 1:
        if rng is None:
            raise ValueError("blank_infill: pass rng (a numpy Generator) to shuffle the spans, "
                             "or order=..., or shuffle=False")
        return rng.permutation(n)
    return np.arange(n)


def part_b_orders(counts, shuffle: bool, rng) -> list[np.ndarray]:
    """``part_b_order`` of several samples with ``counts[r]`` spans each, drawn together: each row of one (R, n)
    array of uniform draws, argsorted over its first ``counts[r]`` entries, is a uniformly random permutation, as
    ``rng.permutation`` is (other numbers from the rng, the same distribution). Without shuffle, text order."""
    counts = np.asarray(counts, dtype=np.int64).reshape(-1)
    n_max = int(counts.max()) if len(counts) else 0
    col = np.arange(n_max)
    if not shuffle or n_max <= 1:
        return [col[:n] for n in counts.tolist()]
    if rng is None:
        raise ValueError("part_b_orders: pass rng (a numpy Generator) to shuffle the spans, or shuffle=False")
    keys = np.where(col < counts[:, None], rng.random((len(counts), n_max)), 2.0)  # the unused columns sort last
    order = np.argsort(keys, axis=1)
    return [order[r, :n] for r, n in enumerate(counts.tolist())]  # per sample: its row's first n entries


def infill_rows(rows, spans, orders, mask_id: int, sop_id: int = SOP_ID, eop_id: int = EOP_ID,
                block_position: bool = True, pad_to: int | None = None) -> dict[str, np.ndarray]:
    """Part A and Part B of several samples at once, right-padded into (R, T) arrays (docs/official-code.md §2.5
    for the tensors, §2.6 for the padding: zeros after Part B).

    rows: R int64 token arrays; spans: R checked, text-ordered (n_r, 2) arrays (``check_spans``); orders: R Part-B
    orders (permutations of range(n_r)). Returns tokens, targets, loss_mask (float32), position_ids and
    block_position_ids as (R, T), and sep and lengths as (R,). T is the longest sample, or ``pad_to``.

    Every row is cut into the same flat arrays, so the cost is a fixed number of NumPy calls per batch, however
    many rows and spans it has: one sample (``blank_infill``) and a training batch (``GLMObjective.make_batch``)
    run this same code.
    """
    R = len(rows)
    if not R:
        raise ValueError("infill_rows: need at least one row")
    row_len = np.fromiter((len(r) for r in rows), dtype=np.int64, count=R)  # (R,)
    n_spans = np.fromiter((len(s) for s in spans), dtype=np.int64, count=R)  # (R,)
    tokens = np.concatenate(rows).astype(np.int64, copy=False)  # (Ltot,) every row back to back
    Ltot = len(tokens)
    row_start = np.cumsum(row_len) - row_len  # (R,) where each row begins in `tokens`
    span_row = np.repeat(np.arange(R), n_spans)  # (N,) the row of each span
    all_spans = np.concatenate(spans).reshape(-1, 2).astype(np.int64, copy=False)  # (N, 2)
    starts = all_spans[:, 0] + row_start[span_row]  # (N,) flat, text order within each row
    ends = all_spans[:, 1] + row_start[span_row]
    span_first = np.cumsum(n_spans) - n_spans  # (R,) index of each row's first span
    order = np.concatenate(orders).astype(np.int64, copy=False) + np.repeat(span_first, n_spans)  # (N,) flat
    lens = ends - starts

    # Part A: drop every span token but the first, which becomes the blank. Part A positions are simply 0..sep-1,
    # so each blank sits at the position of its span start in the corrupted text (the official cumsum - 1 row).
    delta = np.bincount(starts + 1, minlength=Ltot + 1) - np.bincount(ends, minlength=Ltot + 1)  # +1 / -1 marks
    keep = np.cumsum(delta[:Ltot]) <= 0  # (Ltot,) False on span tokens after the first
    keep_idx = np.flatnonzero(keep)
    part_a = tokens[keep_idx]  # (A,) every row's Part A, back to back
    a_row = np.repeat(np.arange(R), row_len)[keep_idx]  # (A,) the row of each Part-A token
    sep = np.bincount(a_row, minlength=R)  # (R,) Part-A length of each row
    a_start = np.cumsum(sep) - sep  # (R,) where each row's Part A begins in part_a
    mask_at = np.cumsum(keep)[starts] - 1  # (N,) index of each blank in part_a
    part_a[mask_at] = mask_id
    mask_pos = mask_at - a_start[span_row]  # (N,) its position in its row

    # Part B: for each span in `order`, input [<sop>, span], target [span, <eop>], all at the blank's position,
    # block ids 1..len+1. seg says which span each Part-B slot belongs to, within its index inside that span's
    # piece (0 = the <sop> slot). The orders permute spans inside their own row, so Part B stays grouped by row.
    piece = lens[order] + 1  # (N,)
    nb = int(piece.sum())
    seg = np.repeat(np.arange(len(order)), piece)  # (nb,)
    within = np.arange(nb) - np.repeat(np.cumsum(piece) - piece, piece)  # (nb,)
    src = starts[order][seg] + within  # flat index of the target token
    is_first, is_last = within == 0, within == piece[seg] - 1
    b_tokens = np.where(is_first, sop_id, tokens[np.maximum(src - 1, 0)])  # src - 1 is another token only on <sop>
    b_targets = np.where(is_last, eop_id, tokens[np.minimum(src, Ltot - 1)])  # src may leave the row only on <eop>
    b_pos = mask_pos[order][seg]
    b_block = within + 1 if block_position else np.ones(nb, dtype=np.int64)
    b_row = span_row[order][seg]
    b_len = np.bincount(span_row, weights=lens + 1, minlength=R).astype(np.int64)  # (R,) Part-B length of each row
    b_start = np.cumsum(b_len) - b_len

    lengths = sep + b_len
    T = int(lengths.max(initial=0)) if pad_to is None else int(pad_to)
    if lengths.max(initial=0) > T:
        raise ValueError(f"infill_rows: a sample has length {int(lengths.max())} > pad_to={T}")
    a_col = np.arange(len(part_a)) - a_start[a_row]  # (A,) a Part-A token's column: its position
    at_a = a_row * T + a_col
    at_b = b_row * T + sep[b_row] + np.arange(nb) - b_start[b_row]
    out = {}
    for name, a_vals, b_vals, dtype in (("tokens", part_a, b_tokens, np.int64),
                                        ("targets", part_a, b_targets, np.int64),
                                        ("loss_mask", 0, 1, np.float32),
                                        ("position_ids", a_col, b_pos, np.int64),
                                        ("block_position_ids", 0, b_block, np.int64)):
        buf = np.zeros(R * T, dtype=dtype)  # pads: id 0, target 0, loss 0, positions 0
        buf[at_a] = a_vals
        buf[at_b] = b_vals
        out[name] = buf.reshape(R, T)
    out["sep"], out["lengths"] = sep.astype(np.int64), lengths
    return out


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
