"""Attention-mask pictures: GLM's Part A / Part B mask (paper Fig. 2(d)) and the compared objectives side by side.

A cell (row = query, column = key) is coloured by the region its KEY belongs to when the query may see that key:
Part A, a Part-B span (coloured by the span's place in the original text, as in `plot_blank_infilling`), or
padding. Keys the query may not see are white. The data of the image is the integer region code, so a test can
read the visibility back from `ax.images[0].get_array() > 0`.

The mask itself is ``minglm.masks.glm_mask`` (docs/mask.md): tril plus every column < sep (the worked example is
docs/figure2.md §5). The
comparison layouts follow the paper's §2.3 / Table 1 framing of BERT, GPT, prefix LM (UniLM) and T5 as masks over
one stack; here T5's encoder and decoder are drawn as one sequence (encoder rows see only the encoder, decoder rows
see the encoder and the decoder causally).

Left out: the per-layer memory columns of the official code (`mems`), and masks with explicit pad hiding (fine-tuning).
"""

from __future__ import annotations

import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch

from minglm.data.blank import blank_infill
from minglm.masks import glm_mask
from viz.examples import sample_from_text
from viz.style import (
    GRID_COLOR,
    MASKED_COLOR,
    PAD_COLOR,
    PART_A_COLOR,
    SEP_COLOR,
    SPAN_COLORS,
    as_row,
    font_kwargs,
    new_figure,
    region_of_tokens,
    span_color,
    span_pieces,
    thin_ticks,
    tick_fontsize,
    token_labels,
)

# Cell codes of the mask image: 0 = hidden, 1 = Part A key, 2..2+len(SPAN_COLORS)-1 = span keys, then padding.
HIDDEN, PART_A = 0, 1
PAD_CODE = 2 + len(SPAN_COLORS)
MASK_CMAP = ListedColormap([MASKED_COLOR, PART_A_COLOR, *SPAN_COLORS, PAD_COLOR], name="glm_mask")


def glm_visible(sep: int, T: int) -> np.ndarray:
    """(T, T) bool of one sample, True = query (row) may attend key (column): ``minglm.masks.glm_mask``."""
    return glm_mask(np, sep, T)[0, 0]  # (T, T)


def mask_codes(visible: np.ndarray, key_region: np.ndarray) -> np.ndarray:
    """Image codes (T, T): the key's region code where visible, HIDDEN elsewhere.

    key_region: (T,) with 1 = Part A, 2 + k = span of text rank k, -1 = padding.
    """
    key_region = np.asarray(key_region)
    span_code = 2 + (key_region - 2) % len(SPAN_COLORS)
    code = np.where(key_region < 0, PAD_CODE, np.where(key_region >= 2, span_code, PART_A))
    return np.where(visible, code[None, :], HIDDEN).astype(np.int64)  # (T, T)


def _draw_codes(ax, codes: np.ndarray, labels: list[str], sep: int | None, title: str, offset: int = 0,
                max_labels: int = 64, fontsize: float | None = None, ylabel: bool = True, xlabel: bool = True) -> None:
    """Draw a (T, T) code image on `ax` with token tick labels, a cell grid and the sep lines."""
    T = codes.shape[0]
    ax.imshow(codes, cmap=MASK_CMAP, vmin=-0.5, vmax=PAD_CODE + 0.5, interpolation="nearest", aspect="equal")
    ticks = thin_ticks(T, max_labels)
    if fontsize is None:
        bbox = ax.get_position()
        fig_w, fig_h = ax.figure.get_size_inches()
        fontsize = tick_fontsize(len(ticks), 0.9 * min(bbox.width * fig_w, bbox.height * fig_h))
    fs = fontsize
    shown = [labels[t] if len(ticks) == T else f"{labels[t]} {t + offset}" for t in ticks]
    fk = font_kwargs(shown)
    ax.set_xticks(ticks, shown, rotation=90, fontsize=fs, **fk)
    ax.set_yticks(ticks, shown, fontsize=fs, **fk)
    ax.tick_params(length=0)
    ax.xaxis.set_ticks_position("top")
    ax.xaxis.set_label_position("top")
    if T <= 80:  # a light cell grid; for long sequences it would only darken the picture
        ax.set_xticks(np.arange(-0.5, T, 1.0), minor=True)
        ax.set_yticks(np.arange(-0.5, T, 1.0), minor=True)
        ax.grid(which="minor", color=GRID_COLOR, linewidth=0.5)
        ax.tick_params(which="minor", length=0)
    for side in ax.spines.values():
        side.set_color("#808080")
    if sep is not None and 0 < sep < T:
        ax.axvline(sep - 0.5, color=SEP_COLOR, linewidth=1.2, linestyle="--")
        ax.axhline(sep - 0.5, color=SEP_COLOR, linewidth=1.2, linestyle="--")
    if xlabel:
        ax.set_xlabel("key (attended to)")
    if ylabel:
        ax.set_ylabel("query (attending)")
    ax.set_title(title, fontsize=11)


def _legend_handles(n_spans: int, has_pad: bool, part_a: str = "Part A (bidirectional)",
                    span_name: str = "Part B span", span_texts: list[str] | None = None) -> list[Patch]:
    handles = [Patch(facecolor=PART_A_COLOR, edgecolor="#808080", label=part_a)]
    for k in range(min(n_spans, len(SPAN_COLORS))):
        what = f": {span_texts[k]}" if span_texts else ""
        handles.append(Patch(facecolor=span_color(k), edgecolor="#808080", label=f"{span_name} {k + 1}{what}"))
    if n_spans > len(SPAN_COLORS):
        handles[-1].set_label(f"{span_name} {len(SPAN_COLORS)}, {len(SPAN_COLORS) + 1}, ... (colours repeat)")
    if has_pad:
        handles.append(Patch(facecolor=PAD_COLOR, edgecolor="#808080", label="padding"))
    handles.append(Patch(facecolor=MASKED_COLOR, edgecolor="#808080", label="not visible"))
    return handles


def plot_attention_mask(batch, i: int = 0, tokenizer=None, window: tuple[int, int] | None = None,
                        max_labels: int = 64, title: str | None = None):
    """The attention mask of sample i as a token grid, coloured like the paper's Fig. 2(d).

    batch: a minglm Batch (row i, padding included) or a Sample. tokenizer: a minglm tokenizer, a list of token
    labels, or None (ids). window: (start, stop) shows only those rows and columns, for long sequences; without
    it at most `max_labels` tick labels are printed (every k-th, each followed by its index).
    Returns a matplotlib Figure with one image axes (plus the legend).
    """
    tokens, _, pos, block, sep, length, T, objective = as_row(batch, i)
    starts, ends, rank = span_pieces(tokens, pos, block, sep, length)
    region = region_of_tokens(length, sep, T, starts, ends, rank)
    codes = mask_codes(glm_visible(sep, T), region)
    labels = token_labels(tokens, tokenizer, length=length)
    labels_all = labels
    lo, hi = (0, T) if window is None else (max(0, int(window[0])), min(T, int(window[1])))
    if hi <= lo:
        raise ValueError(f"plot_attention_mask: window {window} is empty for a sequence of length {T}")
    codes, labels = codes[lo:hi, lo:hi], labels[lo:hi]
    n = hi - lo
    side = float(np.clip(0.32 * min(n, max_labels) + 2.0, 4.5, 14.0))
    fig = new_figure(side + 2.4, side)
    ax = fig.add_subplot(1, 1, 1)
    if title is None:
        title = (f"GLM attention mask ({objective or 'sample'} objective), sep = {sep}"
                 + (f", rows/cols {lo}..{hi - 1}" if window is not None else ""))
    _draw_codes(ax, codes, labels, sep - lo, title, offset=lo, max_labels=max_labels)
    # the legend names each span by its text (spans numbered in text order, as their colours are)
    texts = [""] * len(starts)
    for st, en, r in zip(starts.tolist(), ends.tolist(), rank.tolist()):
        piece = labels_all[st + 1:en]
        joined = "".join(piece) if all(len(p) == 1 for p in piece) else " ".join(piece)
        texts[r] = joined if len(joined) <= 14 else joined[:13] + "…"
    fk = font_kwargs(texts)
    prop = {"family": fk["fontfamily"], "size": 9} if fk else {"size": 9}
    ax.legend(handles=_legend_handles(len(starts), T > length, span_texts=texts), loc="upper left",
              bbox_to_anchor=(1.02, 1.0), prop=prop, frameon=False, title="colour = region of the key",
              title_fontsize=9)
    return fig


# -- the compared objectives --------------------------------------------------------------------------------------

def _example_layouts(tokens, spans, order, tokenizer, prefix_len):
    """Five (title, labels, visible, key_region, sep) layouts of one text: BERT, GPT, prefix LM, T5, GLM.

    Built from the data module's `blank_infill` for GLM (the exact official tensors) and from the sep rule
    (tril + columns < sep) for the others: BERT is sep = T (all visible), GPT sep = 0, prefix LM sep = prefix.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    L = len(tokens)
    spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    spans = spans[np.argsort(spans[:, 0])]
    text = token_labels(tokens, tokenizer)
    in_span = np.zeros(L, dtype=np.int64) - 1  # text rank of the span holding each token, -1 outside
    for k, (s, e) in enumerate(spans.tolist()):
        in_span[s:e] = k
    out = []

    # BERT: every span token replaced in place by [M]; every query sees every key.
    labels = ["[M]" if in_span[t] >= 0 else text[t] for t in range(L)]
    out.append(("BERT (masked LM)", labels, glm_visible(L, L), np.ones(L, np.int64), None))
    # GPT: the plain text, causal.
    out.append(("GPT (causal LM)", text, glm_visible(0, L), np.ones(L, np.int64), None))
    # Prefix LM (UniLM): a bidirectional prefix, then causal.
    p = int(np.clip(prefix_len if prefix_len is not None else L // 2, 1, L - 1))
    out.append((f"Prefix LM (prefix = {p})", text, glm_visible(p, L),
                np.where(np.arange(L) < p, 1, 2), p))
    # T5: encoder = text with one sentinel per span; decoder = each sentinel followed by its span, in text order.
    enc, dec, dec_region = [], [], []
    sentinels = [f"<X{k}>" for k in range(len(spans))]
    for t in range(L):
        k = in_span[t]
        if k < 0:
            enc.append(text[t])
        elif t == spans[k, 0]:
            enc.append(sentinels[k])
    for k, (s, e) in enumerate(spans.tolist()):
        dec += [sentinels[k]] + text[s:e]
        dec_region += [2 + k] * (e - s + 1)
    ne = len(enc)
    out.append(("T5 (encoder | decoder)", enc + dec, glm_visible(ne, ne + len(dec)),
                np.array([1] * ne + dec_region), ne))
    # GLM: Part A | Part B with the spans in the sampled (shuffled) order.
    s = blank_infill(tokens, spans, vocab=tokenizer if hasattr(tokenizer, "mask_id") else None, order=order,
                     shuffle=False)
    starts, ends, rank = span_pieces(s.tokens, s.position_ids, s.block_position_ids, s.sep)
    # Part A: the text with each span collapsed onto one [M]; Part B: for each span in Part-B order, [S] + span.
    kept = [t for t in range(L) if in_span[t] < 0 or t == spans[in_span[t], 0]]
    glm_labels = ["[M]" if in_span[t] >= 0 else text[t] for t in kept]
    for a, b in spans[np.asarray(s.order)].tolist():
        glm_labels += ["[S]"] + text[a:b]
    region = region_of_tokens(len(s.tokens), s.sep, len(s.tokens), starts, ends, rank)
    out.append(("GLM (blank infilling)", glm_labels, glm_visible(s.sep, len(s.tokens)), region, s.sep))
    return out


OBJECTIVE_TITLES = {"bert": "BERT (masked LM)", "gpt": "GPT (causal LM)", "prefix": "Prefix LM",
                    "t5": "T5 (encoder | decoder)", "glm-base": "GLM (blank infilling)"}


def _data_layouts(text: str, tokenizer, seed: int):
    """The same five objectives built by the data module (`make_objective(name).make_batch`) from one text:
    exactly the tensors the trainer would feed, including their random choices (seeded)."""
    out = []
    for name, title in OBJECTIVE_TITLES.items():
        batch, tok = sample_from_text(text, tokenizer, objective=name, seed=seed)
        tokens, _, pos, block, sep, length, T, _ = as_row(batch, 0)
        starts, ends, rank = span_pieces(tokens, pos, block, sep, length)
        region = region_of_tokens(length, sep, T, starts, ends, rank)
        if name == "gpt":  # no context: every key is just an earlier token
            region = np.ones(T, dtype=np.int64)
        elif name == "prefix":  # the bidirectional prefix, then one target stream
            region = np.where(np.arange(T) < sep, 1, 2)
        labels = token_labels(tokens, tok, length=length)
        out.append((f"{title}\nsep = {sep}, T = {length}", labels, glm_visible(sep, T), region,
                    sep if 0 < sep < T else None))
    return out


def plot_objective_masks(tokens=None, spans=None, order=None, tokenizer=None, prefix_len: int | None = None,
                         text: str | None = None, seed: int = 0):
    """BERT, GPT, prefix LM, T5 and GLM attention masks of the same text, side by side.

    Defaults to the paper's Figure-2 text x1..x6 with spans [x3] and [x5 x6], Part B in the order [x5 x6], [x3],
    laid out by hand from the sep rule (BERT sep = T, GPT sep = 0, prefix LM sep = prefix, T5 and GLM sep = the
    encoder / Part A length). tokens: ids (a tokenizer, or a {id: label} dict, names them); spans: (start, end)
    pairs in text order; order: the Part-B order of the spans (a permutation of range(n)); None keeps text order.
    text: instead, build each objective with the data module (`minglm.data.make_objective`) from this text, with
    `seed` (tokenizer: a minglm tokenizer or None for a character tokenizer of the text).
    """
    if text is not None:
        layouts = _data_layouts(text, tokenizer, seed)
        n_spans = max(int(np.max(r)) - 1 for *_, r, _ in layouts)
        return _objectives_figure(layouts, max(n_spans, 1), fontsize=None)
    if tokens is None:
        tokens = np.arange(8, 14)
        tokenizer = [f"x{k}" for k in range(1, 7)] if tokenizer is None else tokenizer
        spans = [(2, 3), (4, 6)] if spans is None else spans
        order = [1, 0] if order is None else order
    if spans is None:
        raise ValueError("plot_objective_masks: pass spans together with tokens")
    layouts = _example_layouts(tokens, spans, order, tokenizer, prefix_len)
    return _objectives_figure(layouts, len(np.asarray(spans).reshape(-1, 2)), fontsize=8)


def _objectives_figure(layouts, n_spans: int, fontsize: float | None):
    longest = max(len(lab) for _, lab, *_ in layouts)
    cell = float(np.clip(0.07 * longest + 1.4, 2.2, 4.2))  # inches a panel: enough for the longest sequence
    fig = new_figure(cell * len(layouts) + 1.0, cell + 1.15)
    axes = fig.subplots(1, len(layouts))
    for k, (ax, (title, labels, visible, key_region, sep)) in enumerate(zip(axes, layouts)):
        _draw_codes(ax, mask_codes(visible, key_region), labels, sep, "", fontsize=fontsize, ylabel=(k == 0),
                    xlabel=False, max_labels=24)
        # The name goes under the panel: the token labels are on top, and their heights differ between panels.
        ax.xaxis.set_label_position("bottom")
        ax.set_xlabel(title, fontsize=11)
    fig.legend(handles=_legend_handles(n_spans, False, part_a="context / Part A / encoder",
                                       span_name="span / target"),
               loc="outside lower center", ncol=min(n_spans + 2, 8), fontsize=9, frameon=False)
    fig.suptitle("Attention masks of the compared objectives (row = query, column = key)", fontsize=12)
    return fig
