"""Byte-level BPE as a picture: how the merges a tokenizer learned build a word up from its bytes.

``bpe_steps(tokenizer, word)`` replays the tokenizer's merges in the order they were learned and keeps each state of
the word that a merge changed: the bytes first, the tokenizer's own encoding last. ``plot_bpe_merges`` draws those
states one row each, every piece a box, with the merge that made the row written beside it, so a reader sees
``t h e`` become ``th e`` and then ``the``. ``plot_bpe_merges`` takes several words at once (one panel each).

Everything comes from ``minglm.tokenizer.BPETokenizer`` (its ``merges`` and ``token_bytes``); replaying the merges in
rank order gives exactly its encoding, because a merge only ever creates pairs of a later rank.
Left out: the pre-tokenisation into words (a word here is one pre-token, such as " theatre").
"""

from __future__ import annotations

from matplotlib.patches import FancyBboxPatch

from minglm.tokenizer import N_SPECIAL, merge_pair
from viz.style import OKABE_ITO, PART_A_COLOR, new_figure, text_color_on

_NEW = OKABE_ITO["orange"]  # the piece a row's merge just made


def _piece(tokenizer, i: int) -> str:
    text = tokenizer.token_bytes[i].decode("utf-8", errors="replace")
    return text.replace(" ", "␣").replace("\n", "↵")


def bpe_steps(tokenizer, word: str) -> list[tuple[int | None, list[int]]]:
    """[(merge rank or None for the bytes, ids after it)] for every merge that changes ``word``."""
    ids = [b + N_SPECIAL for b in word.encode("utf-8")]
    steps = [(None, ids)]
    first_id = N_SPECIAL + 256
    for rank, (a, b) in enumerate(tokenizer.merges):
        merged = merge_pair(ids, (a, b), first_id + rank)
        if merged != ids:
            ids = merged
            steps.append((rank, ids))
    final = list(tokenizer.encode(word))
    if ids != final:
        raise ValueError(f"bpe_steps: replaying the merges gave {ids}, the tokenizer encodes {word!r} as {final}")
    return steps


def plot_bpe_merges(tokenizer, words, title: str | None = None):
    """One panel per word: its pieces after every merge that changed it, from bytes (top) to tokens (bottom)."""
    words = [words] if isinstance(words, str) else list(words)
    all_steps = [bpe_steps(tokenizer, w) for w in words]
    rows = max(len(s) for s in all_steps)
    widest = max(len(w.encode("utf-8")) for w in words)
    margin = 8.5  # room for the "merge k: a + b" labels, in byte widths
    fig = new_figure(max(5.0, (0.3 * (widest + margin) + 0.3) * len(words)), 0.42 * rows + 1.0)
    axes = fig.subplots(1, len(words), squeeze=False)[0]
    for ax, word, steps in zip(axes, words, all_steps):
        for r, (rank, ids) in enumerate(steps):
            x = 0.0
            for i in ids:
                n = len(tokenizer.token_bytes[i])
                new = rank is not None and i == N_SPECIAL + 256 + rank
                face = _NEW if new else PART_A_COLOR
                ax.add_patch(FancyBboxPatch((x + 0.06, r + 0.12), n - 0.12, 0.76, facecolor=face, edgecolor="white",
                                            linewidth=1.0, boxstyle="round,pad=0.0,rounding_size=0.12"))
                ax.text(x + n / 2, r + 0.5, _piece(tokenizer, i), ha="center", va="center", fontsize=10,
                        color=text_color_on(face))
                x += n
            a, b = tokenizer.merges[rank] if rank is not None else (None, None)
            label = "bytes" if rank is None else f"merge {rank}: {_piece(tokenizer, a)} + {_piece(tokenizer, b)}"
            ax.text(-0.3, r + 0.5, label, ha="right", va="center", fontsize=8, color="#444444")
        ax.set_xlim(-margin, widest + 0.1)
        ax.set_ylim(rows, 0)
        ax.axis("off")
        ax.set_title(f"{word!r}: {len(steps[0][1])} bytes -> {len(steps[-1][1])} tokens", fontsize=10)
    fig.suptitle(title or "Byte-level BPE: the learned merges, replayed in order (orange = the new piece)",
                 fontsize=11)
    return fig


__all__ = ["bpe_steps", "plot_bpe_merges"]
