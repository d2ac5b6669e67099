"""Pictures of a training run, written into its folder: `save_run_plots(runs/<name>)` -> runs/<name>/plots/*.png.

`python -m minglm train` calls it at the end of a run. It reads only the run folder (config.json,
tokenizer.json, log.jsonl; the run-folder contract) and draws:
- loss.png: training / validation loss per objective, lr, rollbacks (`plot_loss_curves`);
- mask.png, positions.png, infill.png: one sample built with the run's tokenizer and objective from a short
  excerpt of its corpus, with a fixed seed (`run_sample`), so every run of a config shows the same sample.

A plot that fails is skipped with a warning: a finished training run must never crash while drawing.
Left out: attention maps (they need the checkpoint; use `python -m minglm plot attention --run DIR`).
"""

from __future__ import annotations

import warnings
from pathlib import Path

from minglm.checkpoint import atomic_write
from viz.curves import plot_loss_curves
from viz.examples import run_sample
from viz.infill import BASELINE_OBJECTIVES, plot_blank_infilling
from viz.masks import plot_attention_mask
from viz.positions import plot_positions


def save_run_plots(run_dir, seed: int = 0, dpi: int = 100, fmt: str = "png") -> list[Path]:
    """Draw the run's plots into `<run_dir>/plots/`; returns the files written."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"save_run_plots: {run_dir} is not a folder")
    out = run_dir / "plots"
    if out.is_symlink():  # a write must never land outside the run folder
        raise ValueError(f"save_run_plots: {out} is a symbolic link; refusing to write through it")
    out.mkdir(exist_ok=True)
    written: list[Path] = []

    def save(name: str, make) -> None:
        try:
            fig = make()
            path = out / f"{name}.{fmt}"
            # a temporary file renamed into place; a planted symbolic link is refused, never written through
            atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=dpi))
            written.append(path)
        except Exception as exc:  # noqa: BLE001 - drawing is optional, the run's results are not
            warnings.warn(f"save_run_plots: skipped {name}.{fmt} ({type(exc).__name__}: {exc})", stacklevel=2)

    if (run_dir / "log.jsonl").exists():
        save("loss", lambda: plot_loss_curves(run_dir))
    try:
        batch, tok = run_sample(run_dir, seed=seed)
    except Exception as exc:  # noqa: BLE001
        warnings.warn(f"save_run_plots: no sample plots ({type(exc).__name__}: {exc})", stacklevel=2)
        return written
    save("mask", lambda: plot_attention_mask(batch, 0, tok))
    save("positions", lambda: plot_positions(batch, "code", tok))
    if batch.objective not in BASELINE_OBJECTIVES:  # the baselines have no blanks to draw
        save("infill", lambda: plot_blank_infilling(batch, tok))
    return written
