"""The tile map of the fused attention: which (query tile, key tile) pairs the GLM mask lets the kernel skip.

The kernel (minglm/kernels/flash_attn.cu) and its NumPy twin (minglm/kernels/twin.py) walk the score matrix in
bq × bk tiles. With GLM's mask (key j visible to query i when j < sep or j <= i, docs/mask.md) a tile is
- **skipped** when no query in it sees any key in it (keys at or past sep, all later than every query),
- **full** when every query sees every key (no mask arithmetic needed),
- **partial** otherwise (the mask is applied inside the tile).
``tile_status`` computes that from the mask itself, so a test can hold it against the twin's own skipping rule;
``plot_tile_map`` draws it over the mask, one panel per ``sep``.

Left out: padding (``lengths``), which skips whole tiles of pad rows too.
"""

from __future__ import annotations

import numpy as np
from matplotlib.colors import ListedColormap, to_rgb
from matplotlib.patches import Patch

from viz.masks import glm_visible
from viz.style import GRID_COLOR, MASKED_COLOR, OKABE_ITO, PART_A_COLOR, SEP_COLOR, new_figure

SKIPPED, PARTIAL, FULL = 0, 1, 2
_TILE_COLORS = [MASKED_COLOR, OKABE_ITO["orange"], PART_A_COLOR]  # skipped, partial, full
SHADE_ALPHA = 0.12  # the black veil over masked cells; a skipped tile is masked everywhere, so it shows grey


def shaded(color: str, alpha: float = SHADE_ALPHA) -> tuple[float, float, float]:
    """``color`` as it looks under the black veil of masked cells (what the legend must show for skipped tiles)."""
    return tuple((1.0 - alpha) * c for c in to_rgb(color))


def tile_status(T: int, sep: int, block_q: int, block_k: int) -> np.ndarray:
    """(ceil(T / block_q), ceil(T / block_k)) int array: 0 skipped, 1 partial, 2 full, for one sample's mask."""
    if T < 1 or block_q < 1 or block_k < 1 or not 0 <= sep <= T:
        raise ValueError(f"tile_status: need T >= 1, tiles >= 1 and 0 <= sep <= T, got T={T}, sep={sep}, "
                         f"tiles {block_q}x{block_k}")
    visible = glm_visible(sep, T)  # (T, T), True = the query (row) sees the key (column)
    rows, cols = range(0, T, block_q), range(0, T, block_k)
    status = np.empty((len(rows), len(cols)), dtype=int)
    for a, i0 in enumerate(rows):
        for b, j0 in enumerate(cols):
            tile = visible[i0:i0 + block_q, j0:j0 + block_k]
            status[a, b] = FULL if tile.all() else (PARTIAL if tile.any() else SKIPPED)
    return status


def computed_share(T: int, sep: int, block_q: int, block_k: int) -> float:
    """The share of the T × T score matrix that lies in tiles the kernel computes (partial or full)."""
    status = tile_status(T, sep, block_q, block_k)
    q_sizes = np.diff(np.r_[np.arange(0, T, block_q), T])
    k_sizes = np.diff(np.r_[np.arange(0, T, block_k), T])
    area = np.outer(q_sizes, k_sizes)
    return float(area[status != SKIPPED].sum() / (T * T))


def plot_tile_map(T: int, seps, block_q: int = 64, block_k: int = 64, width: float = 3.6):
    """One panel per ``sep``: the tiles coloured skipped / partial / full, the masked cells shaded, sep marked.

    Each panel's title gives the share of the score matrix the kernel computes for that sep. ``ax.images[0]`` holds
    the tile code of every cell (0 skipped, 1 partial, 2 full).
    """
    seps = [int(s) for s in np.atleast_1d(seps)]
    fig = new_figure(width * len(seps) + 0.4, width + 0.9)
    axes = fig.subplots(1, len(seps), squeeze=False)[0]
    cmap = ListedColormap(_TILE_COLORS)
    for ax, sep in zip(axes, seps):
        status = tile_status(T, sep, block_q, block_k)
        cells = np.repeat(np.repeat(status, block_q, axis=0), block_k, axis=1)[:T, :T]  # a tile's code per cell
        ax.imshow(cells, cmap=cmap, vmin=0, vmax=2, interpolation="nearest", extent=(0, T, T, 0))
        hidden = ~glm_visible(sep, T)
        ax.imshow(np.ma.masked_where(~hidden, np.ones((T, T))), cmap=ListedColormap(["#000000"]), alpha=SHADE_ALPHA,
                  interpolation="nearest", extent=(0, T, T, 0))  # shade the masked cells inside the tiles
        for x in range(0, T + 1, block_k):
            ax.axvline(x, color=GRID_COLOR, lw=0.6)
        for y in range(0, T + 1, block_q):
            ax.axhline(y, color=GRID_COLOR, lw=0.6)
        if 0 < sep < T:
            ax.axvline(sep, color=SEP_COLOR, lw=1.2, ls="--")
            ax.axhline(sep, color=SEP_COLOR, lw=1.2, ls="--")
        share = computed_share(T, sep, block_q, block_k)
        ax.set_title(f"sep = {sep}: computes {100 * share:.0f} %", fontsize=10)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
    swatches = [shaded(_TILE_COLORS[SKIPPED]), _TILE_COLORS[PARTIAL], _TILE_COLORS[FULL]]  # as the tiles look
    fig.legend(handles=[Patch(facecolor=c, edgecolor=GRID_COLOR, label=label) for c, label in
                        zip(swatches, ("skipped", "partial (mask inside)", "full"))],
               loc="outside lower center", ncols=3, frameon=False, fontsize=9)
    fig.suptitle(f"{T} × {T} scores in {block_q} × {block_k} tiles (shaded: masked cells)", fontsize=11)
    return fig
