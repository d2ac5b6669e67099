"""GLM's 2D positional encoding as a picture (paper Fig. 2(c), docs/official-code.md §2.5 and
docs/figure2.md §1-§3).

A grid with one column per token: the token row (coloured by region: Part A, or the Part-B span it belongs to,
in the span colours of the mask plot), then the Position 1 row (where the token sits in the corrupted text; every
Part-B token of a span repeats its blank's position) and the Position 2 row (0 in Part A, 1..len+1 inside a span),
each cell coloured by its value and printed. An optional Target row shows what Part B predicts.

convention="code" shows the official 0-based numbers the model uses; convention="paper" shows the paper's 1-based
figure (via `minglm.data.paper_view`: [CLS] and Part A's <eos> dropped, or +1 for bare tokens).

Left out: the `--random-position` offset (off by default in the official code).
"""

from __future__ import annotations

import types

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import Normalize, to_rgba

from minglm.data.blank import paper_view
from viz.style import (
    PART_A_COLOR,
    SEP_COLOR,
    SEQUENTIAL_CMAP,
    as_row,
    font_kwargs,
    new_figure,
    span_color,
    span_pieces,
    text_color_on,
    token_labels,
)


def _row_sample(sample, i: int):
    """One unpadded row as a simple object with tokens / targets / position ids / sep (Sample or Batch row i)."""
    tokens, targets, pos, block, sep, length, _, objective = as_row(sample, i)
    return types.SimpleNamespace(tokens=tokens[:length], targets=targets[:length], position_ids=pos[:length],
                                 block_position_ids=block[:length], sep=sep, objective=objective)


def _view(sample, i: int, convention: str, tokenizer):
    s = _row_sample(sample, i)
    if convention == "code":
        return s
    if convention != "paper":
        raise ValueError(f"plot_positions: convention must be 'code' or 'paper', got {convention!r}")
    vocab = tokenizer if tokenizer is not None and hasattr(tokenizer, "cls_id") else None
    v = paper_view(s, vocab)
    return types.SimpleNamespace(tokens=v.tokens, targets=v.targets, position_ids=v.position_ids,
                                 block_position_ids=v.block_position_ids, sep=v.sep, objective=s.objective)


CELL_IN = 0.26  # inches per token column


def plot_positions(sample, convention: str = "code", tokenizer=None, i: int = 0, window: tuple[int, int] | None = None,
                   per_line: int = 64, show_targets: bool = True, title: str | None = None):
    """The two position rows under the tokens, one column per token, values printed in the cells.

    sample: a Sample or a Batch (row i). convention: "code" (official, 0-based, the model's input) or "paper"
    (Fig. 2's 1-based view). tokenizer: a minglm tokenizer, a {id: label} dict, or None. window: (start, stop)
    to show only those columns; long sequences wrap onto several lines of `per_line` columns.
    """
    v = _view(sample, i, convention, tokenizer)
    n_all = len(v.tokens)
    starts, ends, rank = span_pieces(v.tokens, v.position_ids, v.block_position_ids, v.sep)
    colors = np.array([PART_A_COLOR] * n_all, dtype=object)
    part_a_pos = np.asarray(v.position_ids[: v.sep])
    for s, e, r in zip(starts.tolist(), ends.tolist(), rank.tolist()):
        colors[s:e] = span_color(r)
        colors[np.flatnonzero(part_a_pos == v.position_ids[s])] = span_color(r)  # the span's blank in Part A
    labels = token_labels(v.tokens, tokenizer)
    tlabels = ["" if (k < v.sep or t < 0) else lab
               for k, (t, lab) in enumerate(zip(np.asarray(v.targets).tolist(),
                                                 token_labels(np.maximum(v.targets, 0), tokenizer)))]
    lo, hi = (0, n_all) if window is None else (max(0, int(window[0])), min(n_all, int(window[1])))
    if hi <= lo:
        raise ValueError(f"plot_positions: window {window} is empty for a sequence of length {n_all}")
    idx = np.arange(lo, hi)
    n = len(idx)
    per_line = max(8, int(per_line))
    lines = [idx[k:k + per_line] for k in range(0, n, per_line)]
    width = min(n, per_line)
    rows = ["token", "Position 1", "Position 2"] + (["target"] if show_targets else [])
    # 0.26 inch a cell with 11 pt text: a 64-token sample stays on one line (18 inches), and a notebook that scales
    # it to about 10 inches still shows 6 pt text; a 45-token sample shows 8 pt (0.42 inch cells with 9 pt text, the
    # old layout, wrapped after 40 tokens and came out at 5 pt)
    fig = new_figure(max(6.0, CELL_IN * width + 1.6), 0.5 + (0.36 * len(rows) + 0.55) * len(lines))
    axes = fig.subplots(len(lines), 1, squeeze=False)[:, 0]
    norms = [Normalize(0, max(1, int(np.max(v.position_ids)))), Normalize(0, max(1, int(np.max(v.block_position_ids))))]
    fk = font_kwargs(labels[lo:hi] + tlabels[lo:hi])
    fs = 11 if width > 24 else 12  # a digit or a character at 11 pt fits a 0.26-inch cell (19 pt)
    cmap = _cmap()
    pos_rgba = [cmap(norms[0](np.asarray(v.position_ids))), cmap(norms[1](np.asarray(v.block_position_ids)))]
    tok_rgba = np.array([to_rgba(c) for c in colors])  # (n_all, 4)
    for ax, cols in zip(axes, lines):
        # One RGBA image per line (token colours, then the two position rows): a cell is a pixel, not a patch,
        # which keeps drawing fast for long samples; the texts are left out of the layout computation for speed.
        rgba = np.stack([tok_rgba[cols], pos_rgba[0][cols], pos_rgba[1][cols]])  # (3, n_cols, 4)
        ax.imshow(rgba, extent=(-0.5, len(cols) - 0.5, 2.5, -0.5), aspect="auto", interpolation="nearest")
        ax.set_xticks(np.arange(-0.5, len(cols), 1.0), minor=True)
        ax.set_yticks([0.5, 1.5], minor=True)
        ax.grid(which="minor", color="white", linewidth=1.0)
        ax.tick_params(which="minor", length=0)
        for x, k in enumerate(cols.tolist()):
            texts = [ax.text(x, 0, labels[k], ha="center", va="center", fontsize=fs * min(1.0, 4.5 / len(labels[k])),
                             color=text_color_on(colors[k]), **fk)]
            for r, rgb in ((1, pos_rgba[0][k]), (2, pos_rgba[1][k])):
                val = int((v.position_ids, v.block_position_ids)[r - 1][k])
                texts.append(ax.text(x, r, str(val), ha="center", va="center", fontsize=fs, color=text_color_on(rgb)))
            if show_targets and tlabels[k]:
                texts.append(ax.text(x, 3, tlabels[k], ha="center", va="center", fontsize=fs, color="#333333", **fk))
            for t in texts:
                t.set_in_layout(False)
        if cols[0] < v.sep <= cols[-1]:
            ax.axvline(v.sep - cols[0] - 0.5, color=SEP_COLOR, linewidth=1.5, linestyle="--")
        ax.set_xlim(-0.5, width - 0.5)
        ax.set_ylim(len(rows) - 0.5, -0.5)
        ax.set_yticks(range(len(rows)), rows, fontsize=10)
        ax.set_xticks(range(len(cols)), [str(k) for k in cols.tolist()], fontsize=7, color="#666666")
        ax.tick_params(length=0)
        for side in ax.spines.values():
            side.set_visible(False)
    axes[-1].set_xlabel(f"index in the sequence (Part A = 0..{v.sep - 1}, Part B from {v.sep}; dashed line = sep)",
                        fontsize=9)
    if title is None:
        name = "official code, 0-based" if convention == "code" else "paper Fig. 2, 1-based"
        title = f"2D positions ({name}); colour = region, then value"
    axes[0].set_title(title, fontsize=11, loc="left")
    return fig


def _cmap():
    return colormaps[SEQUENTIAL_CMAP]


__all__ = ["plot_positions"]
