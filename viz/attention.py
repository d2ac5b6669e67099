"""Attention weights of a trained (or fresh) GLM as heatmaps, with the Part A / Part B boundary drawn.

`plot_attention_weights(model, batch, layer, head)` asks the model for one layer's softmax probabilities
(`GLM.attention_probs`, (B, nh, T, T), no dropout) and draws sample i cropped to its real length: one head large,
or every head in a grid. Keys hidden by the mask are white; the colour scale is a square root, so that the
small probabilities of a long row stay visible. Dashed lines at sep split the picture into the four blocks of
docs/mask.md: Part A → Part A (bidirectional), Part B → Part A (context), Part B → Part B (causal), and
the empty Part A → Part B.
`plot_attention_map(probs, sep, labels)` draws an array you already have.

Left out: attention rollout / flow across layers, and averaging over samples.
"""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import PowerNorm

from viz.masks import glm_visible
from viz.style import (
    SEP_COLOR,
    SEQUENTIAL_CMAP,
    as_row,
    font_kwargs,
    new_figure,
    thin_ticks,
    tick_fontsize,
    token_labels,
)


def _draw_map(ax, probs: np.ndarray, sep: int, labels: list[str] | None, title: str, max_labels: int,
              show_labels: bool = True, vmax: float | None = None):
    T = probs.shape[0]
    top = vmax if vmax is not None else max(float(probs.max()), 1e-6)
    # Keys the mask hides are drawn white (as in the mask plot), not as "probability 0" in the colour map.
    shown = np.ma.masked_where(~glm_visible(sep, T), probs)
    cmap = colormaps[SEQUENTIAL_CMAP].with_extremes(bad="white")
    im = ax.imshow(shown, cmap=cmap, norm=PowerNorm(0.5, vmin=0.0, vmax=top), interpolation="nearest",
                   aspect="equal")
    if 0 < sep < T:
        ax.axvline(sep - 0.5, color="white", linewidth=1.6)
        ax.axhline(sep - 0.5, color="white", linewidth=1.6)
        ax.axvline(sep - 0.5, color=SEP_COLOR, linewidth=0.9, linestyle="--")
        ax.axhline(sep - 0.5, color=SEP_COLOR, linewidth=0.9, linestyle="--")
    if show_labels and labels is not None:
        ticks = thin_ticks(T, max_labels)
        shown = [labels[t] if len(ticks) == T else f"{labels[t]} {t}" for t in ticks]
        fk = font_kwargs(shown)
        bbox = ax.get_position()
        fig_w, fig_h = ax.figure.get_size_inches()
        fs = tick_fontsize(len(ticks), 0.9 * min(bbox.width * fig_w, bbox.height * fig_h))
        ax.set_xticks(ticks, shown, rotation=90, fontsize=fs, **fk)
        ax.set_yticks(ticks, shown, fontsize=fs, **fk)
        ax.tick_params(length=0)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_title(title, fontsize=10)
    return im


def plot_attention_map(probs, sep: int, labels: list[str] | None = None, head: int | None = None,
                       max_labels: int = 128, title: str | None = None, ncols: int = 4):
    """Heatmaps of probabilities (nh, T, T) or (T, T): one head (`head`, or a 2-D array) or a grid of every head."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim == 2:
        probs, head = probs[None], 0
    if probs.ndim != 3 or probs.shape[1] != probs.shape[2]:
        raise ValueError(f"plot_attention_map: probs must be (nh, T, T) or (T, T), got {probs.shape}")
    H, T, _ = probs.shape
    if head is not None:
        if not 0 <= head < H:
            raise ValueError(f"plot_attention_map: head must be in [0, {H}), got {head}")
        # about 0.14 inch a token, so that every token of a 64-token window (Part A + Part B, ~80) gets its label
        side = float(np.clip(0.14 * min(T, max_labels) + 2.5, 5.0, 16.0))
        fig = new_figure(side + 1.2, side)
        ax = fig.add_subplot(1, 1, 1)
        im = _draw_map(ax, probs[head], sep, labels, title or f"head {head}", max_labels)
        ax.set_xlabel("key (attended to)")
        ax.set_ylabel("query (attending)")
        fig.colorbar(im, ax=ax, shrink=0.8, label="attention probability (square-root scale; white = masked)")
        return fig
    ncols = min(ncols, H)
    nrows = int(np.ceil(H / ncols))
    fig = new_figure(3.0 * ncols + 1.0, 3.0 * nrows + 0.6)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    im = None
    for h in range(nrows * ncols):
        ax = axes.flat[h]
        if h >= H:
            ax.axis("off")
            continue
        im = _draw_map(ax, probs[h], sep, labels, f"head {h}", max_labels=16, show_labels=T <= 24,
                       vmax=max(float(probs.max()), 1e-6))
    fig.colorbar(im, ax=axes, shrink=0.6, label="probability (sqrt scale)")
    if title:
        fig.suptitle(title, fontsize=12)
    return fig


def plot_attention_weights(model, batch, layer: int = 0, head: int | None = None, i: int = 0, tokenizer=None,
                           max_labels: int = 128, window: tuple[int, int] | None = None):
    """Attention probabilities of `layer` for sample i of `batch` (Batch or Sample), one head or all heads.

    Uses `model.attention_probs(tokens, position_ids, block_position_ids, sep, layer)` -> (B, nh, T, T).
    Rows and columns beyond the sample's real length (padding) are cropped; `window` crops further.
    """
    tokens, _, pos, block, sep, length, _, objective = as_row(batch, i)
    probs = model.attention_probs(tokens[None, :length], pos[None, :length], block[None, :length],
                                  np.array([sep]), layer)
    probs = np.asarray(probs)[0]  # (nh, T, T)
    labels = token_labels(tokens[:length], tokenizer)
    lo, hi = (0, length) if window is None else (max(0, int(window[0])), min(length, int(window[1])))
    if hi <= lo:
        raise ValueError(f"plot_attention_weights: window {window} is empty for a sample of length {length}")
    probs = probs[:, lo:hi, lo:hi]
    what = f"layer {layer}" + (f", head {head}" if head is not None else f", all {probs.shape[0]} heads")
    title = f"Attention weights, {what} ({objective or 'sample'}; dashed = sep {sep})"
    return plot_attention_map(probs, sep - lo, labels[lo:hi], head=head, max_labels=max_labels, title=title)
