"""Rebuild the gallery `viz/gallery/*.png` (shown in viz/README.md) from real data, in one command:

    python -m viz.make_gallery                  # trains a tiny 60-step run in a temporary folder first
    python -m viz.make_gallery --run runs/NAME  # uses an existing run instead

Text comes from the Shakespeare corpus (`minglm.data.load_corpus("shakespeare")`), the samples from the data
module with a fixed seed, the loss curves and attention maps from the run. The tiny run uses the GLM-10B mixture
(token / sentence / document) so that the loss splits by objective, and injects one NaN loss (step 40) so that the
trainer's rollback shows in the curves. Every image is drawn at dpi 100 to keep the PNGs small.

Left out: anything that needs a GPU or a download.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import minglm
import minglm.functional as F
import viz
from minglm.commands.train import main as train_main
from minglm.data.corpus import load_corpus
from minglm.runs import load_run
from minglm.tokenizer import CharTokenizer
from viz.examples import corpus_excerpt
from viz.graph import draw_graph
from viz.style import cjk_font_name

GALLERY = Path(__file__).resolve().parent / "gallery"


def train_tiny_run(out: Path, steps: int = 60) -> Path:
    """Train the tiny config for `steps` steps into out/gallery (the trainer's own CLI) and return the run folder."""
    rc = train_main(["--steps", str(steps), "--objective", "glm-10b", "--eval-every", "20", "--ckpt-every", "30",
                     "--out", str(out), "--name", "gallery", "--inject-nan-at", "40", "--quiet"])
    if rc != 0:
        raise RuntimeError(f"make_gallery: the tiny training run failed (exit code {rc})")
    return out / "gallery"


def build(out_dir: Path, run: Path | None, seed: int = 0, steps: int = 60, dpi: int = 100) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def save(name: str, fig) -> None:
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=dpi)
        written.append(path)
        print(f"{path}  ({path.stat().st_size / 1024:.0f} KB)")

    # the paper's example
    f2, names = viz.figure2_sample()
    save("figure2_mask", viz.plot_attention_mask(f2, tokenizer=names))
    save("figure2_positions", viz.plot_positions(f2, convention="paper", tokenizer=names,
                                                 title="2D positions of the paper's Figure 2 (1-based view)"))
    save("figure2_infill", viz.plot_blank_infilling(f2, tokenizer=names, line_width=14))
    save("objectives", viz.plot_objective_masks())
    save("objectives_data", viz.plot_objective_masks(text="Friends, Romans, countrymen", seed=seed))

    # real Shakespeare text, the character tokenizer of the corpus, the GLM-10B mixture (one sample per mode)
    corpus = load_corpus("shakespeare")
    tok = CharTokenizer.from_texts(corpus.docs)
    text = corpus_excerpt("shakespeare", 72, seed=seed)
    for mode in ("token", "sentence", "document"):
        batch, _ = viz.sample_from_text(text, tok, objective="glm-10b", seed=seed, mode=mode)
        save(f"infill_{mode}", viz.plot_blank_infilling(batch, tok, title=f"Blank infilling of Shakespeare, {mode} "
                                                                        "level (GLM-10B mixture)"))
    # Chinese: a public-domain poem (Li Bai), drawn only where a CJK font is installed (see viz/style.py)
    if cjk_font_name() is not None:
        poem = "床前明月光，疑是地上霜。举头望明月，低头思故乡。"
        zh, zh_tok = viz.sample_from_text(poem, objective="glm-10b", seed=2, mode="token")
        save("infill_chinese", viz.plot_blank_infilling(zh, zh_tok, title="Blank infilling of a Chinese text "
                                                                           "(character tokenizer, CJK font fallback)"))
    else:
        print("no CJK font installed: skipping infill_chinese.png (apt-get install fonts-noto-cjk)")
    short, _ = viz.sample_from_text(text[:40], tok, objective="glm-base", seed=seed)
    save("mask_shakespeare", viz.plot_attention_mask(short, tokenizer=tok))
    batch, _ = viz.sample_from_text(text, tok, objective="glm-base", seed=seed)
    save("positions_shakespeare", viz.plot_positions(batch, convention="code", tokenizer=tok))
    save("span_lengths", viz.plot_span_lengths(n=3000, rng=np.random.default_rng(seed), seq_len=128))
    save("tile_map", viz.plot_tile_map(512, [0, 200, 512], block_q=64, block_k=64))

    # a training run: loss curves and attention maps
    with tempfile.TemporaryDirectory(prefix="minglm-gallery-") as tmp:
        if run is None:
            t0 = time.perf_counter()
            run = train_tiny_run(Path(tmp), steps)
            print(f"trained a {steps}-step tiny run in {time.perf_counter() - t0:.0f} s: {run}")
        save("loss_curves", viz.plot_loss_curves(run, smooth=0.6))
        model, run_tok = load_run(run)
        sample, _ = viz.sample_from_text(text[:40], run_tok, objective="glm-base", seed=seed)
        last = model.config.n_layer - 1
        save("attention_heads", viz.plot_attention_weights(model, sample, layer=last, tokenizer=run_tok))
        save("attention_head0", viz.plot_attention_weights(model, sample, layer=last, head=0, tokenizer=run_tok))

    # the autograd graph of a small computation: one attention head's scores -> softmax -> weighted values
    save("autograd_graph", _graph_figure(seed))
    return written


def _graph_figure(seed: int):
    rng = np.random.default_rng(seed)
    x = minglm.Tensor(rng.standard_normal((4, 8)).astype(np.float32))
    wq, wk, wv = (minglm.Tensor(0.1 * rng.standard_normal((8, 8)).astype(np.float32), requires_grad=True)
                  for _ in range(3))
    q, k, v = F.linear(x, wq), F.linear(x, wk), F.linear(x, wv)  # (T, C) each
    att = F.softmax((q @ k.transpose(1, 0)) * (1.0 / np.sqrt(8.0)), axis=-1)  # (T, T)
    loss = F.cross_entropy(att @ v, np.array([0, 1, 2, 3]))
    return draw_graph(loss, names={id(x): "x", id(wq): "W_q", id(wk): "W_k", id(wv): "W_v"},
                      title="Autograd graph of one attention head and its loss (output at the bottom)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m viz.make_gallery", description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, help="an existing run folder (default: train a tiny one)")
    ap.add_argument("--out", type=Path, default=GALLERY, help=f"output folder (default {GALLERY})")
    ap.add_argument("--steps", type=int, default=60, help="steps of the tiny run when no --run is given")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    build(args.out, args.run, seed=args.seed, steps=args.steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
