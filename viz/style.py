"""Shared look of every minglm figure: the colour-blind-safe palette, token labels, CJK font fallback, label thinning.

Every plotting function in `viz/` builds a `matplotlib.figure.Figure` directly (no pyplot, so no global figure
registry and nothing to close) and takes its colours and labels from here, so the same region (Part A, a Part-B
span, padding) has the same colour in every picture.

Palette: Okabe & Ito (2008), "Color Universal Design", eight colours distinguishable under the common forms of
colour blindness. Sequential values (positions, attention probabilities) use `cividis`, which is designed for the
same purpose.

Left out: themes, and any change to matplotlib's global rcParams (fonts are passed per text object instead).
"""

from __future__ import annotations

import functools
import io
import re
import warnings

import numpy as np
from matplotlib import font_manager
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure

from minglm.tokenizer import SPECIAL_TOKENS

# Okabe-Ito colours by name.
OKABE_ITO = {
    "black": "#000000",
    "orange": "#E69F00",
    "skyblue": "#56B4E9",
    "green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "purple": "#CC79A7",
}
PART_A_COLOR = OKABE_ITO["skyblue"]
# Part-B spans cycle through these, in the spans' text order (span 0 = the leftmost blank in the original text).
SPAN_COLORS = [OKABE_ITO[k] for k in ("orange", "green", "purple", "vermillion", "yellow", "blue")]
PAD_COLOR = "#9A9A9A"
MASKED_COLOR = "#FFFFFF"  # a key the query may not see
GRID_COLOR = "#D9D9D9"
SEP_COLOR = OKABE_ITO["black"]
# Lines of several runs / objectives.
LINE_COLORS = [OKABE_ITO[k] for k in ("blue", "orange", "green", "vermillion", "purple", "skyblue", "black")]
SEQUENTIAL_CMAP = "cividis"

# Shown instead of the whitespace characters a tick label could not show.
_VISIBLE_WS = {" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"}
_SHORT_SPECIALS = {"[PAD]": "[PAD]", "[CLS]": "[CLS]", "[MASK]": "[M]", "[sMASK]": "[sM]", "[gMASK]": "[gM]",
                   "<sop>": "[S]", "<eop>": "[E]", "[UNK]": "[UNK]"}

_CJK_RE = re.compile("[\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef\U00020000-\U0002fa1f]")
_CJK_FONT_NAMES = ("Noto Sans CJK SC", "Noto Sans CJK TC", "Noto Sans CJK JP", "Noto Sans SC", "Noto Sans TC",
                   "Source Han Sans SC", "Source Han Sans CN", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei",
                   "AR PL UMing CN", "AR PL UKai CN", "Droid Sans Fallback", "SimHei", "Microsoft YaHei",
                   "PingFang SC", "Hiragino Sans GB", "Heiti SC", "Arial Unicode MS")


class VizFigure(Figure):
    """A plain matplotlib Figure that also shows itself in Jupyter when it is a cell's value.

    A Figure made without pyplot has no display hook until pyplot's inline backend is imported; `_repr_png_` is
    the hook IPython looks for, so `fig` as the last line of a cell draws it (once), pyplot imported or not.
    """

    def _repr_png_(self) -> bytes:
        buf = io.BytesIO()
        self.savefig(buf, format="png")
        return buf.getvalue()


def new_figure(width: float, height: float, dpi: int = 100) -> Figure:
    """A Figure that belongs to no pyplot state (safe in tests, servers and notebooks) with constrained layout."""
    return VizFigure(figsize=(width, height), dpi=dpi, layout="constrained")


def has_cjk(labels) -> bool:
    """True when any label holds a CJK (Chinese, Japanese, Korean) character."""
    return any(_CJK_RE.search(str(s)) for s in labels)


@functools.cache
def cjk_font_name() -> str | None:
    """The name of an installed font with CJK glyphs, or None (looked up once)."""
    def known() -> str | None:
        installed = {f.name for f in font_manager.fontManager.ttflist}
        return next((name for name in _CJK_FONT_NAMES if name in installed), None)

    name = known()
    if name is None:
        # matplotlib caches its font list, so a font installed after that cache was built is unknown to it:
        # look for CJK font files on the system and register them (cheap: file names only, no parsing).
        hints = ("notosanscjk", "notoserifcjk", "wqy", "sourcehansans", "droidsansfallback", "ukai", "uming")
        for path in font_manager.findSystemFonts():
            if any(h in path.lower().replace("-", "").replace("_", "") for h in hints):
                try:
                    font_manager.fontManager.addfont(path)
                except (OSError, RuntimeError, ValueError):
                    continue
        name = known()
    return name


def font_kwargs(labels) -> dict:
    """Text keyword arguments that make `labels` render: a font-family fallback list when they hold CJK text.

    Matplotlib (>= 3.6) falls back glyph by glyph along a family list, so Latin text keeps DejaVu Sans. Without
    any CJK font installed this warns once and returns {} (the glyphs then show as boxes, nothing fails).
    """
    if not has_cjk(labels):
        return {}
    name = cjk_font_name()
    if name is None:
        _warn_no_cjk_font()
        return {}
    return {"fontfamily": ["DejaVu Sans", name]}


@functools.cache
def _warn_no_cjk_font() -> None:
    warnings.warn("viz: the labels hold CJK characters but no CJK font is installed (tried Noto Sans CJK, "
                  "WenQuanYi, Source Han Sans, ...); they will render as boxes. On Debian/Ubuntu: "
                  "apt-get install fonts-noto-cjk", stacklevel=3)


def _special_names() -> list[str]:
    return list(SPECIAL_TOKENS)


def token_labels(ids, tokenizer=None, length: int | None = None, short: bool = True) -> list[str]:
    """Readable label for each token id.

    tokenizer: a minglm tokenizer (decoded one id at a time), a list of strings (one per position, used as given),
      a dict {id: label} (e.g. {8: "x1", 9: "x2"} for the paper's example), or None (specials by name, ids as
      numbers).
    length: id 0 is [PAD] and also <eos>; before `length` it is shown as <eos>, from `length` on as [PAD].
    short: paper-style short names for the specials ([M], [S], [E]) so that tick labels stay narrow.
    Whitespace is made visible (space as ␣, newline as ↵).
    """
    ids = np.asarray(ids).reshape(-1)
    if isinstance(tokenizer, dict):  # {id: label}; ids not in it fall back to the default naming
        default = token_labels(ids, None, length, short)
        return [str(tokenizer.get(t, d)) for t, d in zip(ids.tolist(), default)]
    if tokenizer is not None and isinstance(tokenizer, (list, tuple)):
        if len(tokenizer) < len(ids):
            raise ValueError(f"token_labels: got {len(tokenizer)} labels for {len(ids)} tokens")
        return [str(s) for s in tokenizer[: len(ids)]]
    specials = _special_names()
    n_special = len(specials)
    length = len(ids) if length is None else int(length)
    out = []
    for k, t in enumerate(ids.tolist()):
        if t == 0:
            out.append("<eos>" if k < length else "[PAD]")
        elif 0 <= t < n_special:
            name = specials[t]
            out.append(_SHORT_SPECIALS.get(name, name) if short else name)
        elif tokenizer is None:
            out.append(str(t))
        else:
            s = tokenizer.decode([t])
            out.append("".join(_VISIBLE_WS.get(c, c) for c in s) or "''")
    return out


def thin_ticks(n: int, max_labels: int = 64) -> np.ndarray:
    """Indices of the ticks to label along an axis of n cells, at most `max_labels` of them (every k-th)."""
    if n <= max_labels:
        return np.arange(n)
    step = int(np.ceil(n / max_labels))
    return np.arange(0, n, step)


def tick_fontsize(n: int, length_in: float | None = None) -> float:
    """Tick-label size for n labelled cells along an axis about `length_in` inches long (default: 0.3 in a cell).

    About 65 % of the space a label gets, in points, clipped to 5..11 pt: readable for 10 cells, separate for 64.
    """
    n = max(n, 1)
    per_cell_pt = 72.0 * (length_in if length_in is not None else 0.3 * n) / n
    return float(np.clip(0.65 * per_cell_pt, 5.0, 11.0))


def span_pieces(tokens, position_ids, block_position_ids, sep: int, length: int | None = None):
    """Split Part B into its spans, and rank them in text order.

    Returns (starts, ends, text_rank): Part-B pieces as half-open [starts[k], ends[k]) in sequence coordinates,
    in the order they appear in Part B, and for each piece its index in text order (the rank of the position of
    its blank in Part A). Works for any objective: a piece starts where the block position is 1.
    """
    tokens = np.asarray(tokens).reshape(-1)
    length = len(tokens) if length is None else int(length)
    block = np.asarray(block_position_ids).reshape(-1)[:length]
    pos = np.asarray(position_ids).reshape(-1)[:length]
    starts = sep + np.flatnonzero(block[sep:] == 1)
    if len(starts) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    ends = np.append(starts[1:], length)
    text_rank = np.argsort(np.argsort(pos[starts], kind="stable"), kind="stable")
    return starts, ends, text_rank


def region_of_tokens(length: int, sep: int, padded_length: int, starts, ends, text_rank) -> np.ndarray:
    """Region code per column: 1 = Part A, 2 + k = span of text rank k, and -1 = padding. (T,) int array."""
    region = np.full(padded_length, -1, dtype=np.int64)
    region[:length] = 1
    for s, e, r in zip(np.asarray(starts).tolist(), np.asarray(ends).tolist(), np.asarray(text_rank).tolist()):
        region[s:e] = 2 + r
    return region


def span_color(rank: int) -> str:
    return SPAN_COLORS[int(rank) % len(SPAN_COLORS)]


def as_row(sample_or_batch, i: int = 0):
    """(tokens, targets, position_ids, block_position_ids, sep, length, padded_length, objective) of one row.

    Accepts a minglm Batch (row i, padding kept), a Sample, or anything with those attributes.
    """
    tokens = np.asarray(sample_or_batch.tokens)
    if tokens.ndim == 2:
        B, T = tokens.shape
        if not 0 <= i < B:
            raise ValueError(f"viz: row i={i} is out of range for a batch of {B}")
        lengths = getattr(sample_or_batch, "lengths", None)
        length = int(lengths[i]) if lengths is not None else T
        sep = int(np.asarray(sample_or_batch.sep).reshape(-1)[i])
        return (tokens[i], np.asarray(sample_or_batch.targets)[i], np.asarray(sample_or_batch.position_ids)[i],
                np.asarray(sample_or_batch.block_position_ids)[i], sep, length, T,
                getattr(sample_or_batch, "objective", ""))
    if tokens.ndim != 1:
        raise ValueError(f"viz: tokens must be (T,) or (B, T), got shape {tokens.shape}")
    T = len(tokens)
    return (tokens, np.asarray(sample_or_batch.targets), np.asarray(sample_or_batch.position_ids),
            np.asarray(sample_or_batch.block_position_ids), int(sample_or_batch.sep), T, T,
            getattr(sample_or_batch, "objective", ""))


def text_color_on(facecolor) -> str:
    """Black or white, whichever reads better on `facecolor` (by relative luminance)."""
    r, g, b = to_rgb(facecolor)
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.45 else "white"
