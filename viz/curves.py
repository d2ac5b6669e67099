"""Loss curves of one or several training runs, read from their `log.jsonl` (the run-folder contract).

Left axes: the training loss (faint raw values, a bold exponential moving average) and the validation loss
(markers) of every run, with the learning rate on a twin axis (dotted) and each rollback event (the trainer's
loss-spike guard) as a vertical line; the steps a rollback undid (logged, then redone from the restored
checkpoint) are crosses, and the curves follow the redone steps. Right axes: the loss per objective
(`loss_<mode>`, e.g. token / sentence / document for GLM's mixture; one objective is drawn per batch, so each
series has gaps) and the validation loss per objective. Several runs overlay: colour = run on the left,
colour = objective and line style = run on the right.

Log lines: {"step", "loss", "lr", "grad_norm", "tokens_per_s", "loss_<objective>"..., and on eval steps
"val_loss", "val_loss_<objective>", "val_acc"}; events as {"step", "event": "rollback", "reason"}.
Left out: wall-clock axes and throughput plots (tokens_per_s is in the log for that).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
from matplotlib.lines import Line2D

from viz.style import LINE_COLORS, OKABE_ITO, new_figure

RUN_STYLES = ["-", "--", ":", "-."]
_NOT_OBJECTIVES = {"mask"}  # "loss_mask" would be a mask, not an objective; kept out if a logger ever writes it


def read_log(path) -> list[dict]:
    """The records of a run's log.jsonl (a run folder or the file itself). Malformed lines are skipped with a warning
    (a run that is still writing may have a half-written last line)."""
    p = Path(path)
    if p.is_dir():
        p = p / "log.jsonl"
    if not p.exists():
        raise FileNotFoundError(f"read_log: no log file at {str(p)!r} (expected runs/<name>/log.jsonl)")
    records, bad = [], 0
    for line in p.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(rec, dict) and "step" in rec:
            records.append(rec)
        else:
            bad += 1
    if bad:
        warnings.warn(f"read_log: skipped {bad} malformed line(s) in {p}", stacklevel=2)
    return records


def ema(values, smooth: float) -> np.ndarray:
    """Debiased exponential moving average (as TensorBoard's smoothing slider): smooth = 0 keeps the raw values."""
    if not 0.0 <= smooth < 1.0:
        raise ValueError(f"ema: smooth must be in [0, 1), got {smooth}")
    x = np.asarray(values, dtype=np.float64)
    out = np.empty_like(x)
    acc, weight = 0.0, 0.0
    for k, v in enumerate(x.tolist()):  # a recurrence: each value depends on the previous one
        if np.isfinite(v):
            acc = smooth * acc + (1.0 - smooth) * v
            weight = smooth * weight + (1.0 - smooth)
        out[k] = acc / weight if weight > 0 else np.nan
    return out


def series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the records that carry `key` (events excluded)."""
    pts = [(r["step"], r[key]) for r in records if key in r and "event" not in r and r[key] is not None]
    if not pts:
        return np.zeros(0), np.zeros(0)
    steps, vals = zip(*pts)
    return np.asarray(steps, dtype=np.float64), np.asarray(vals, dtype=np.float64)


def split_rollbacks(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """(kept, abandoned): after a rollback to step R, the steps > R logged before it were undone and get redone.

    The rollback event carries "restored_step" (else the next logged step - 1 is used). Events stay in `kept`.
    """
    kept: list[dict] = []
    abandoned: list[dict] = []
    for k, r in enumerate(records):
        if r.get("event") == "rollback":
            restored = r.get("restored_step")
            if restored is None:
                later = [q["step"] for q in records[k + 1:] if "event" not in q]
                restored = later[0] - 1 if later else r["step"]
            abandoned += [q for q in kept if "event" not in q and q["step"] > restored]
            kept = [q for q in kept if "event" in q or q["step"] <= restored]
        kept.append(r)
    return kept, abandoned


def objectives_in(records: list[dict]) -> list[str]:
    """Objective names that have a per-objective training or validation loss in the log, in first-seen order."""
    seen: dict[str, None] = {}
    for r in records:
        for k in r:
            for prefix in ("val_loss_", "loss_"):
                if k.startswith(prefix) and k[len(prefix):] not in _NOT_OBJECTIVES:
                    seen.setdefault(k[len(prefix):], None)
                    break
    return list(seen)


def _as_runs(run_dirs, labels):
    if isinstance(run_dirs, (str, Path)):
        run_dirs = [run_dirs]
    runs = []
    for k, item in enumerate(run_dirs):
        if isinstance(item, (str, Path)):
            recs, name = read_log(item), Path(item).name if Path(item).is_dir() else Path(item).parent.name
        else:  # already a list of records
            recs, name = list(item), f"run {k + 1}"
        runs.append((labels[k] if labels is not None else name, recs))
    if not runs:
        raise ValueError("plot_loss_curves: pass at least one run folder")
    return runs


def plot_loss_curves(run_dirs, smooth: float = 0.8, labels: list[str] | None = None, show_lr: bool = True,
                     per_objective: bool = True, log_y: bool = False, title: str | None = None):
    """Training / validation loss of one or several runs, per objective, with the lr and rollbacks marked.

    run_dirs: a run folder (or log.jsonl path), a list of them, or lists of log records (dicts).
    smooth: EMA weight for the training curves in [0, 1) (raw values are drawn faintly behind).
    labels: legend names of the runs (default: the folder names).
    """
    runs = _as_runs(run_dirs, labels)
    objectives = []
    for _, recs in runs:
        objectives += [o for o in objectives_in(recs) if o not in objectives]
    # the per-objective panel only says something new when there are two objectives or more: with one, it would
    # repeat the left panel's curve under another name
    two = per_objective and len(objectives) > 1
    fig = new_figure(13.0 if two else 8.0, 5.4)
    axes = fig.subplots(1, 2 if two else 1, squeeze=False)[0]
    ax = axes[0]
    ax_lr = ax.twinx() if show_lr else None
    handles = []
    any_rollback = any_undone = False
    for k, (name, recs) in enumerate(runs):
        color = LINE_COLORS[k % len(LINE_COLORS)]
        recs, undone = split_rollbacks(recs)
        runs[k] = (name, recs)
        bs, bl = series(undone, "loss")
        if len(bs):  # steps a rollback undid: drawn faintly, the redone steps replace them
            ax.plot(bs, bl, "x", color=OKABE_ITO["vermillion"], markersize=4, alpha=0.6)
            any_undone = True
        steps, loss = series(recs, "loss")
        if len(steps):
            ax.plot(steps, loss, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(steps, ema(loss, smooth), color=color, linewidth=1.8)
        vs, vl = series(recs, "val_loss")
        if len(vs):
            ax.plot(vs, vl, "o--", color=color, markersize=5, linewidth=1.0, markeredgecolor="white")
        if ax_lr is not None:
            ls, lr = series(recs, "lr")
            if len(ls):
                ax_lr.plot(ls, lr, ":", color=color, linewidth=1.4)
        for r in recs:
            if r.get("event") == "rollback":
                any_rollback = True
                for a in axes:
                    a.axvline(r["step"], color=OKABE_ITO["vermillion"], linewidth=1.2, linestyle="-.", alpha=0.8)
        handles.append(Line2D([], [], color=color, linewidth=1.8, label=name))
    handles += [Line2D([], [], color="#555555", linewidth=1.8, label=f"train (EMA {smooth:g}; raw faint)"),
                Line2D([], [], color="#555555", marker="o", linestyle="--", label="validation")]
    if ax_lr is not None:
        handles.append(Line2D([], [], color="#555555", linestyle=":", label="learning rate (right axis)"))
        ax_lr.set_ylabel("learning rate")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    if any_rollback:
        handles.append(Line2D([], [], color=OKABE_ITO["vermillion"], linestyle="-.", label="rollback"))
    if any_undone:
        handles.append(Line2D([], [], color=OKABE_ITO["vermillion"], marker="x", linestyle="",
                              label="steps undone by a rollback"))
    ax.legend(handles=handles, fontsize=8, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (cross-entropy, nats per target token)")
    ax.set_title("Training and validation loss" if title is None else title, fontsize=11)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)

    if two:
        ax2 = axes[1]
        handles2 = []
        for j, obj in enumerate(objectives):
            color = LINE_COLORS[j % len(LINE_COLORS)]
            for k, (_, recs) in enumerate(runs):
                style = RUN_STYLES[k % len(RUN_STYLES)]
                st, lo = series(recs, f"loss_{obj}")
                if len(st):
                    ax2.plot(st, ema(lo, smooth), style, color=color, linewidth=1.6)
                vs, vl = series(recs, f"val_loss_{obj}")
                if len(vs):
                    ax2.plot(vs, vl, "o", color=color, markersize=5, markeredgecolor="white")
            handles2.append(Line2D([], [], color=color, linewidth=1.6, label=obj))
        if len(runs) > 1:
            handles2 += [Line2D([], [], color="#555555", linestyle=RUN_STYLES[k % len(RUN_STYLES)], label=name)
                         for k, (name, _) in enumerate(runs)]
        handles2.append(Line2D([], [], color="#555555", marker="o", linestyle="", label="validation"))
        ax2.legend(handles=handles2, fontsize=8, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.13),
                   ncol=4)
        ax2.set_xlabel("step")
        ax2.set_ylabel("loss")
        ax2.set_title("Loss per objective (train EMA, validation dots)", fontsize=11)
        if log_y:
            ax2.set_yscale("log")
        ax2.grid(alpha=0.3)
    return fig
