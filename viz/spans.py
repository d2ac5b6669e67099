"""Span-length and mask-ratio distributions of the token-level sampler (docs/official-code.md §2.2).

Left axes: the histogram of the span lengths the sampler actually produced, against the truncated Poisson(3) pmf
it draws from (1..39, renormalised without 0). Right axes: the distribution of the share of a sample's tokens
that ended up masked, against the 15 % target: the sampler keeps drawing until at least int(0.15 L) tokens are
masked, so the last span overshoots and the ratio sits a little above 15 %.

Left out: sentence- and document-level spans (their lengths follow the text and the [gMASK] bound, not a pmf).
"""

from __future__ import annotations

import numpy as np

from minglm.data.samplers import TokenSpanSampler, truncated_poisson_pmf
from minglm.tokenizer import CLS_ID, EOS_ID, N_SPECIAL
from viz.style import OKABE_ITO, new_figure


def poisson_pmf(lam: float = 3.0, max_span_len: int = 39) -> np.ndarray:
    """P(len = k), k = 1..max_span_len: Poisson(lam) without 0, renormalised (the official `range(1, 40)` weights)."""
    return truncated_poisson_pmf(lam, max_span_len)


def draw_from_sampler(sampler, n: int, rng: np.random.Generator, seq_len: int = 128):
    """Run `sampler(window, rng)` on n framed single-document windows `[CLS] ... <eos>` of seq_len tokens.

    Returns (lengths of every span, masked ratio of every window).
    """
    window = np.full(seq_len, N_SPECIAL, dtype=np.int64)  # ordinary tokens; only the framing matters to the sampler
    window[0], window[-1] = CLS_ID, EOS_ID
    lengths, ratios = [], np.zeros(n)
    for k in range(n):  # one sampler call per sample: this is how the data pipeline calls it too
        spans = np.asarray(sampler(window, rng)).reshape(-1, 2)
        lens = spans[:, 1] - spans[:, 0]
        lengths.append(lens)
        ratios[k] = lens.sum() / seq_len
    return np.concatenate(lengths), ratios


def plot_span_lengths(sampler_or_lengths=None, n: int = 2000, rng: np.random.Generator | None = None,
                      seq_len: int = 128, ratios=None, lam: float = 3.0, max_span_len: int = 39, target: float = 0.15):
    """Histogram of span lengths against the truncated Poisson pmf, and the distribution of the mask ratio.

    sampler_or_lengths: a span sampler (e.g. `minglm.data.TokenSpanSampler()`, called as sampler(window, rng) on
      n windows of seq_len tokens), an array of span lengths, or None (a default TokenSpanSampler).
    ratios: mask ratios per sample, when passing lengths (otherwise the right panel says none were given).
    rng: a numpy Generator (default: seed 0), used only when sampling.
    """
    rng = np.random.default_rng(0) if rng is None else rng
    if sampler_or_lengths is None:
        sampler_or_lengths = TokenSpanSampler(ratio=target, lam=lam, max_span_len=max_span_len)
    if callable(sampler_or_lengths):
        source = f"{type(sampler_or_lengths).__name__}, {n} windows of {seq_len} tokens"
        lengths, ratios = draw_from_sampler(sampler_or_lengths, n, rng, seq_len)
        pmf = np.asarray(getattr(sampler_or_lengths, "pmf", poisson_pmf(lam, max_span_len)))
    else:
        lengths = np.asarray(sampler_or_lengths).reshape(-1)
        if lengths.size == 0 or lengths.min() < 1:
            raise ValueError(f"plot_span_lengths: span lengths must be >= 1 and non-empty, got {lengths[:10]}")
        source = f"{lengths.size} given spans"
        pmf = poisson_pmf(lam, max_span_len)
    lengths = lengths.astype(np.int64)
    fig = new_figure(11.0, 4.2)
    ax1, ax2 = fig.subplots(1, 2, width_ratios=[1.4, 1.0])

    top = int(min(max(lengths.max(), 12), len(pmf)))
    counts = np.bincount(lengths, minlength=top + 1)[1: top + 1]
    k = np.arange(1, top + 1)
    ax1.bar(k, counts / lengths.size, width=0.8, color=OKABE_ITO["skyblue"], edgecolor="white",
            label=f"sampled spans (mean {lengths.mean():.2f})")
    mean_pmf = float((np.arange(1, len(pmf) + 1) * pmf).sum())
    ax1.plot(k, pmf[:top], "o-", color=OKABE_ITO["vermillion"], markersize=4,
             label=f"Poisson({lam:g}) on 1..{len(pmf)}, renormalised (mean {mean_pmf:.2f})")
    ax1.set_xlabel("span length (tokens)")
    ax1.set_ylabel("share of spans")
    ax1.set_title(f"Span lengths ({source})", fontsize=11)
    ax1.set_xticks(k[:: max(1, top // 15)])
    ax1.legend(fontsize=9, frameon=False)

    if ratios is not None and len(ratios):
        ratios = np.asarray(ratios, dtype=np.float64)
        if callable(sampler_or_lengths):  # ratios are (masked count) / seq_len: one bar per possible count
            c = np.rint(ratios * seq_len)
            bins = (np.arange(c.min() - 0.5, c.max() + 1.5) / seq_len) * 100
            floor = int(target * seq_len)
            ax2.axvline(floor / seq_len * 100, color=OKABE_ITO["black"], linestyle="--", linewidth=1.2,
                        label=f"minimum int({target} × {seq_len}) = {floor} tokens")
        else:
            bins = 30
            ax2.axvline(target * 100, color=OKABE_ITO["black"], linestyle="--", linewidth=1.2,
                        label=f"target {target:.0%}")
        ax2.hist(ratios * 100, bins=bins, color=OKABE_ITO["green"], edgecolor="white")
        ax2.axvline(ratios.mean() * 100, color=OKABE_ITO["orange"], linewidth=1.5,
                    label=f"mean {ratios.mean():.1%}")
        ax2.legend(fontsize=9, frameon=False)
    else:
        ax2.text(0.5, 0.5, "no per-sample mask ratios given\n(pass a sampler, or ratios=...)", ha="center",
                 va="center", transform=ax2.transAxes, color="#666666")
    ax2.set_xlabel("masked tokens (% of the sample)")
    ax2.set_ylabel("samples")
    ax2.set_title("Mask ratio per sample", fontsize=11)
    return fig
