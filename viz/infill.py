"""Autoregressive blank infilling in three rows, as the paper's Fig. 2 (a)-(c) (docs/official-code.md §2.5,
docs/figure2.md).

(a) the original text with the sampled spans coloured, (b) Part A: the corrupted text where each span collapsed
onto one blank, (c) Part B: the spans in their shuffled order, each opened by [S] (<sop>). A span has the same
colour in all three rows (and in the mask and position plots): colours follow the spans' order in the text.

The original text is rebuilt from the sample itself (Part A with each blank replaced by its span's targets, less
the closing [E]), so the picture works for a Batch row as well as a Sample, and for every GLM objective
(token spans, sentences, the [gMASK] suffix).

Left out: the targets row of Fig. 2(c) (see `plot_positions(show_targets=True)`) and the model of Fig. 2(d).
"""

from __future__ import annotations

import numpy as np
from matplotlib.patches import FancyBboxPatch

from minglm.tokenizer import EOP_ID
from viz.positions import _row_sample
from viz.style import (
    PART_A_COLOR,
    font_kwargs,
    new_figure,
    span_color,
    span_pieces,
    text_color_on,
    token_labels,
)

PLAIN_COLOR = "#F2F2F2"  # an ordinary token of the original text
BASELINE_OBJECTIVES = ("bert", "gpt", "prefix", "t5")  # Batch.objective of the comparison objectives


def reconstruct(sample, i: int = 0, eop_id: int | None = None):
    """Rebuild (original ids, text rank of the span each token is in or -1) from a built sample or Batch row i."""
    if eop_id is None:
        eop_id = EOP_ID
    s = _row_sample(sample, i)
    starts, ends, rank = span_pieces(s.tokens, s.position_ids, s.block_position_ids, s.sep)
    pieces = zip(starts.tolist(), ends.tolist(), rank.tolist())
    blank_at = {int(s.position_ids[st]): (st, en, r) for st, en, r in pieces}  # blank position -> its Part-B piece
    ids, owner = [], []
    part_a_pos = np.asarray(s.position_ids[: s.sep]).tolist()
    for j in range(s.sep):
        hit = blank_at.get(part_a_pos[j])
        if hit is None:
            ids.append(int(s.tokens[j]))
            owner.append(-1)
            continue
        st, en, r = hit
        piece = np.asarray(s.targets[st:en])
        if len(piece) and piece[-1] == eop_id:
            piece = piece[:-1]
        ids += piece.tolist()
        owner += [r] * len(piece)
    return np.array(ids, dtype=np.int64), np.array(owner, dtype=np.int64)


def _layout(widths: list[float], line_width: float, gap: float = 0.15):
    """x, line of each box when boxes of `widths` are laid left to right and wrapped at `line_width`."""
    xs, ls, x, line = [], [], 0.0, 0
    for w in widths:
        if x > 0 and x + w > line_width:
            x, line = 0.0, line + 1
        xs.append(x)
        ls.append(line)
        x += w + gap
    return xs, ls, line + 1


def _box_widths(labels: list[str]) -> list[float]:
    return [max(1.0, 0.28 * len(lab) + 0.45) for lab in labels]


def _draw_row(ax, labels, colors, line_width, title, fk, edge_colors=None) -> None:
    widths = _box_widths(labels)
    xs, ls, n_lines = _layout(widths, line_width)
    for k, (lab, face, x, line, w) in enumerate(zip(labels, colors, xs, ls, widths)):
        edge = "#808080" if edge_colors is None else edge_colors[k]
        box = ax.add_patch(FancyBboxPatch((x + 0.04, -line * 1.3 - 0.45), w - 0.08, 0.9, facecolor=face,
                                          edgecolor=edge, linewidth=0.8, boxstyle="round,pad=0,rounding_size=0.15"))
        text = ax.text(x + w / 2, -line * 1.3, lab, ha="center", va="center", fontsize=10, color=text_color_on(face),
                       **fk)
        box.set_in_layout(False)  # inside the axes anyway; skipping them keeps the layout pass fast
        text.set_in_layout(False)
    ax.set_xlim(-0.1, line_width + 0.1)
    ax.set_ylim(-(n_lines - 1) * 1.3 - 0.6, 0.6)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(title, loc="left", fontsize=11)


def plot_blank_infilling(sample, tokenizer=None, i: int = 0, line_width: float = 32.0, title: str | None = None):
    """Fig. 2 (a)-(c): original text -> Part A (corrupted) -> Part B (shuffled spans), spans coloured alike.

    sample: a Sample or a Batch (row i). tokenizer: a minglm tokenizer, {id: label} dict or None.
    line_width: wrap each row after about this many single-character boxes.
    """
    s = _row_sample(sample, i)
    if s.objective in BASELINE_OBJECTIVES:
        raise ValueError(f"plot_blank_infilling: the {s.objective!r} baseline is not blank infilling; use "
                         "plot_attention_mask or plot_objective_masks for it")
    starts, ends, rank = span_pieces(s.tokens, s.position_ids, s.block_position_ids, s.sep)
    orig, owner = reconstruct(sample, i)
    orig_labels = token_labels(orig, tokenizer)
    orig_colors = [PLAIN_COLOR if r < 0 else span_color(r) for r in owner.tolist()]

    a_labels = token_labels(s.tokens[: s.sep], tokenizer)
    blank_rank = {int(s.position_ids[st]): r for st, r in zip(starts.tolist(), rank.tolist())}
    a_colors = [span_color(blank_rank[int(p)]) if int(p) in blank_rank else PART_A_COLOR
                for p in np.asarray(s.position_ids[: s.sep]).tolist()]

    b_labels = token_labels(s.tokens[s.sep:], tokenizer)
    b_colors, b_edges = [], []
    for st, en, r in zip(starts.tolist(), ends.tolist(), rank.tolist()):
        b_colors += [span_color(r)] * (en - st)
        b_edges += ["black"] + ["#808080"] * (en - st - 1)  # a dark outline marks each span's [S]

    fk = font_kwargs(orig_labels + a_labels + b_labels)
    rows = [
        (orig_labels, orig_colors, None,
         f"(a) original text x ({len(orig)} tokens); coloured = the {len(starts)} sampled span(s)"),
        (a_labels, a_colors, None, f"(b) Part A: each span replaced by one blank ({s.sep} tokens, bidirectional)"),
        (b_labels, b_colors, b_edges,
         f"(c) Part B: the spans in shuffled order, each opened by [S] ({len(b_labels)} tokens, autoregressive)"),
    ]
    n_lines = [_layout(_box_widths(lab), line_width)[2] for lab, *_ in rows]
    fig = new_figure(max(7.0, 0.3 * line_width + 0.6), 0.75 + sum(0.42 * n + 0.45 for n in n_lines))
    axes = fig.subplots(3, 1, height_ratios=[n + 0.6 for n in n_lines])
    for ax, (labels, colors, edges, row_title) in zip(axes, rows):
        _draw_row(ax, labels, colors, line_width, row_title, fk, edges)
    if title is None:
        title = f"Blank infilling ({s.objective or 'sample'} objective)"
    fig.suptitle(title, fontsize=12, x=0.01, ha="left")
    return fig
