"""``python -m minglm plot <what> ...``: the visualizer's pictures (``viz``) from the command line.

    plot mask       [--text T | --run DIR | --figure2] [--objective O] [--mode M] [--seed S] [--window A:B]
    plot positions  [same] [--convention code|paper]
    plot infill     [same]
    plot objectives [--text T]         BERT / GPT / prefix LM / T5 / GLM masks (Figure-2 text, or T via the
                                       data module's objectives)
    plot spans      [--n N] [--seq-len L] [--seed S]
    plot loss       --run DIR [--run DIR ...] [--smooth 0.8] [--log-y]
    plot attention  --run DIR [--layer K] [--head H] [--text T] [--seed S]
    plot run        --run DIR          all of a run's plots into DIR/plots/

Every command writes one image, `--out FILE` (PNG, SVG or PDF by the suffix; default plot_<what>.png) and prints
its path; the file is written through a temporary file and a rename, never through a symbolic link. The sample of
mask / positions / infill comes from --text (a character tokenizer of the text, or the run's tokenizer with --run),
from a short excerpt of the run's corpus (--run alone), or the paper's example. A run given with --run is first
checked against its newest checkpoint (``minglm.runs.verify_run``), so an edited config.json cannot make a plot read
another corpus. `plot run` that writes no picture exits with code 2.
Left out: interactive windows (nothing is ever shown; open the file).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from minglm.checkpoint import atomic_write
from minglm.commands import fail
from minglm.runs import check_no_links, load_run, verify_run
from minglm.tokenizer import load_tokenizer
from viz.attention import plot_attention_weights
from viz.curves import plot_loss_curves
from viz.examples import DEFAULT_TEXT, figure2_sample, run_sample, sample_from_text
from viz.infill import plot_blank_infilling
from viz.masks import plot_attention_mask, plot_objective_masks
from viz.positions import plot_positions
from viz.run import save_run_plots
from viz.spans import plot_span_lengths

KINDS = ("mask", "positions", "infill", "objectives", "spans", "loss", "attention", "run")


def _window(text: str | None):
    if text is None:
        return None
    try:
        a, b = text.split(":")
        return int(a), int(b)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--window must look like START:STOP, got {text!r}") from exc


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m minglm plot", description="Draw GLM pictures into an image file.")
    ap.add_argument("what", choices=KINDS, help="which picture")
    ap.add_argument("--out", help="output file (.png, .svg, .pdf); default plot_<what>.png")
    ap.add_argument("--run", action="append", default=[], metavar="DIR",
                    help="a run folder (runs/<name>); repeat for several runs with `loss`")
    ap.add_argument("--text", help="the text to blank out (mask, positions, infill, attention)")
    ap.add_argument("--figure2", action="store_true", help="the paper's Figure-2 example x1..x6")
    ap.add_argument("--objective", default=None, help="objective for --text (default: the run's, else glm-base)")
    ap.add_argument("--mode", choices=("token", "sentence", "document"), help="force a GLM objective's mode")
    ap.add_argument("--seed", type=int, default=0, help="seed of the numpy Generator (default 0)")
    ap.add_argument("--window", type=_window, help="START:STOP, only these tokens (mask, positions, attention)")
    ap.add_argument("--convention", choices=("code", "paper"), default="code", help="positions: 0-based or paper")
    ap.add_argument("--n", type=int, default=2000, help="spans: how many windows to sample")
    ap.add_argument("--seq-len", type=int, default=128, help="spans: window length")
    ap.add_argument("--smooth", type=float, default=0.8, help="loss: EMA weight in [0, 1)")
    ap.add_argument("--log-y", action="store_true", help="loss: logarithmic loss axis")
    ap.add_argument("--layer", type=int, default=0, help="attention: layer")
    ap.add_argument("--head", type=int, default=None, help="attention: one head (default: all heads)")
    ap.add_argument("--dpi", type=int, default=100)
    return ap


def _sample(args):
    """(batch or sample, labels/tokenizer) for the sample-based plots."""
    if args.figure2:
        return figure2_sample()
    run = args.run[0] if args.run else None
    if run is not None:
        if args.text is not None and args.objective is not None:
            return sample_from_text(args.text, load_tokenizer(Path(run) / "tokenizer.json"), args.objective,
                                    args.seed, args.mode)
        if args.objective is not None:
            raise ValueError("plot: --objective with --run needs --text (the run's own objective is used otherwise)")
        return run_sample(run, seed=args.seed, text=args.text, mode=args.mode)
    return sample_from_text(args.text or DEFAULT_TEXT, None, args.objective or "glm-base", args.seed, args.mode)


def make_figure(args):
    if args.what in ("mask", "positions", "infill"):
        sample, tok = _sample(args)
        if args.what == "mask":
            return plot_attention_mask(sample, 0, tok, window=args.window)
        if args.what == "positions":
            return plot_positions(sample, args.convention, tok, window=args.window)
        return plot_blank_infilling(sample, tok)
    if args.what == "objectives":
        if args.text:  # each objective built by the data module from this text
            return plot_objective_masks(text=args.text, seed=args.seed)
        return plot_objective_masks()
    if args.what == "spans":
        return plot_span_lengths(None, n=args.n, rng=np.random.default_rng(args.seed), seq_len=args.seq_len)
    if args.what == "loss":
        if not args.run:
            raise ValueError("plot loss: pass --run DIR (one or more)")
        return plot_loss_curves(args.run, smooth=args.smooth, log_y=args.log_y)
    if args.what == "attention":
        if not args.run:
            raise ValueError("plot attention: pass --run DIR (a trained run with a checkpoint)")
        model, _ = load_run(args.run[0])
        batch, tok = run_sample(args.run[0], seed=args.seed, text=args.text, mode=args.mode)
        return plot_attention_weights(model, batch, args.layer, args.head, tokenizer=tok, window=args.window)
    raise ValueError(f"plot: unknown picture {args.what!r}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.what in ("mask", "positions", "infill", "attention", "run") and args.run:
            verify_run(args.run[0])  # config.json and tokenizer.json must be what the checkpoint was trained with
        if args.what == "run":
            if not args.run:
                raise ValueError("plot run: pass --run DIR")
            check_no_links(args.run[0])
            written = save_run_plots(args.run[0], seed=args.seed, dpi=args.dpi)
            if not written:
                raise ValueError(f"wrote no picture into {Path(args.run[0]) / 'plots'} (the warnings above say why)")
            for p in written:
                print(p)
            return 0
        out = Path(args.out or f"plot_{args.what}.png")
        if out.suffix.lower() not in (".png", ".svg", ".pdf"):
            raise ValueError(f"plot: --out must end in .png, .svg or .pdf, got {str(out)!r}")
        fig = make_figure(args)
        if out.parent != Path(""):
            out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, lambda f: fig.savefig(f, format=out.suffix.lower()[1:], dpi=args.dpi))
    except (ValueError, OSError) as exc:
        return fail(exc, prefix=f"plot {args.what}")
    print(out)
    return 0
