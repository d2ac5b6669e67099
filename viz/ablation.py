"""The GLM-130B ablation in one picture: a row of bar charts, one per measured column, one bar per setting.

Input: the result of ``minglm.ablate.run_ablation`` (or its ``ablation.json``). Each bar is the mean over seeds, each
dot one seed; the deliberately unstable settings (a high learning rate) are drawn in a second colour, and a diverged
seed is marked with an x at the axis. The four panels are the columns of the table: final validation loss, exact
match of greedy fills, the largest gradient-norm spike (×, against the median of the 20 steps before it) and
training tokens per second; a fifth panel shows the fills' character F1, which still tells settings apart when
the runs are too short for exact fills.
Left out: loss curves (``loss_curve`` of each run is in the JSON for that) and error bars from two seeds.
"""

from __future__ import annotations

import math

import numpy as np

from viz.style import OKABE_ITO, new_figure

PANELS = (  # (key in a run record, title, scale applied to the values)
    ("val_loss", "validation loss (lower is better)", 1.0),
    ("fill_exact", "fill exact match, % (higher is better)", 100.0),
    ("fill_f1", "fill character F1, %", 100.0),
    ("grad_spike", "largest grad-norm spike, × median", 1.0),
    ("tokens_per_s", "training tokens / s", 1.0),
)


def plot_ablation(result: dict, title: str | None = None):
    """Bars per setting (mean over seeds) with one dot per seed, one panel per column; returns the Figure."""
    summary, runs = result.get("summary"), result.get("runs")
    if not summary or runs is None:
        raise ValueError("plot_ablation: expected the result of minglm.ablate.run_ablation (with summary and runs)")
    labels = [row["label"] for row in summary]
    n = len(labels)
    fig = new_figure(3.4 * len(PANELS), 0.9 + 0.32 * n)
    axes = fig.subplots(1, len(PANELS), sharey=True)
    y = np.arange(n)
    stable, unstable = OKABE_ITO["blue"], OKABE_ITO["orange"]
    for ax, (key, panel_title, scale) in zip(axes, PANELS):
        means = np.array([row.get(key, float("nan")) for row in summary], dtype=np.float64) * scale
        if key == "grad_spike":  # the summary keeps the largest spike over seeds: draw that bar
            means = np.array([row["grad_spike"] for row in summary], dtype=np.float64)
        colors = [unstable if row["unstable"] else stable for row in summary]
        ax.barh(y, np.nan_to_num(means, nan=0.0), color=colors, alpha=0.75, height=0.7)
        for i, row in enumerate(summary):
            seeds = [r for r in runs if r["setting"] == row["setting"]]
            vals = [r.get(key, float("nan")) * scale for r in seeds]
            finite = [v for v in vals if math.isfinite(v)]
            ax.plot(finite, [i] * len(finite), "o", color="black", markersize=3)
            if len(finite) < len(vals):  # a diverged seed: no value to draw
                ax.plot([0], [i], "x", color=OKABE_ITO["vermillion"], markersize=7, mew=2)
        finite_means = means[np.isfinite(means)]
        if key == "val_loss" and finite_means.size:  # the differences are small: zoom in on them
            lo, hi = finite_means.min(), finite_means.max()
            pad = max(0.05, 0.15 * (hi - lo))
            ax.set_xlim(lo - pad, hi + pad)
        ax.set_title(panel_title, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y)
    axes[0].set_yticklabels(labels, fontsize=8)
    axes[0].invert_yaxis()
    cfg = result.get("config", {})
    fig.suptitle(title or f"GLM-130B's switches on the {cfg.get('model', 'tiny')} config: {cfg.get('steps', '?')} "
                          f"steps, seeds {cfg.get('seeds', '?')} (orange: lr {cfg.get('high_lr', '?')})", fontsize=10)
    return fig
