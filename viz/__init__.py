"""viz: the minglm visualizer. Plain matplotlib functions that take minglm objects or arrays and return a Figure.

    from viz import plot_attention_mask, plot_positions, plot_blank_infilling, plot_span_lengths
    fig = plot_attention_mask(batch, i=0, tokenizer=tok); fig.savefig("mask.png")

No pyplot state is used (figures are `matplotlib.figure.Figure` objects; nothing to close, nothing shown), so
everything runs headless, in tests and in notebooks (display a figure by leaving it as the cell's last value).
The command line is `python -m minglm plot ...` (minglm/commands/plot.py); the gallery is viz/README.md
(`python -m viz.make_gallery` rebuilds it). Follows docs/official-code.md §2.5, docs/mask.md and docs/figure2.md.
"""

from viz.ablation import plot_ablation
from viz.attention import plot_attention_map, plot_attention_weights
from viz.curves import plot_loss_curves, read_log
from viz.examples import figure2_sample, sample_from_text
from viz.graph import draw_graph
from viz.infill import plot_blank_infilling
from viz.masks import plot_attention_mask, plot_objective_masks
from viz.positions import plot_positions
from viz.run import save_run_plots
from viz.spans import plot_span_lengths
from viz.tiles import computed_share, plot_tile_map, tile_status
from viz.tokens import bpe_steps, plot_bpe_merges

__all__ = [
    "plot_attention_mask", "plot_objective_masks", "plot_positions", "plot_blank_infilling", "plot_span_lengths",
    "plot_loss_curves", "read_log", "plot_attention_weights", "plot_attention_map", "draw_graph", "save_run_plots",
    "figure2_sample", "sample_from_text", "plot_tile_map", "tile_status", "computed_share", "plot_ablation",
    "plot_bpe_merges", "bpe_steps",
]
