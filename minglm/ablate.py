"""The GLM-130B ablation: train the tiny config with each of GLM-130B's switches on and off, and measure.

GLM-130B (Zeng et al. 2022, §2.1-§3) changed GLM's recipe so that a 130B model would train stably in fp16: RoPE for
the learned position tables, DeepNorm for pre-LN, GeGLU for the GeLU MLP, a shrunken gradient into the word
embeddings (EGS) and an FP32 softmax. Each is a switch on ``GLMConfig`` (``minglm/model.py``). This module trains the
same tiny model on the same data with each switch alone, with all of them, and in a deliberately unstable setting
(a learning rate ten times the default, where DeepNorm and EGS are supposed to help), at several seeds, and reports
per setting:

- ``val_loss``: the final validation loss on fixed Part-B targets (the trainer's ``evaluate``);
- ``fill_exact``: exact match of greedy fills on a fixed set of word and span blanks cut from validation lines
  (``minglm.fill_eval``: ``build_blank_set``, ``model_fills``, ``score``), and their character F1 (``fill_f1``),
  which still separates settings when runs are too short for any exact fill;
- ``grad_spike``: the largest gradient-norm spike, max over steps of ‖g_t‖ / median(‖g‖ of the 20 steps before),
  before clipping;
- ``tokens_per_s``: the median training throughput (input tokens per second, on this machine).

A run whose loss or gradient turns NaN/inf is rolled back by the trainer's guard (its ratio test is switched off here,
so loss spikes are measured rather than hidden); after ``max_rollbacks`` it counts as diverged.

What this leaves out: fp16 (NumPy trains in float32, where GLM-130B's instabilities mostly do not arise, so the
FP32 softmax can change nothing here but speed), large depth (DeepNorm's point is depth; tiny has 4 layers), and
any claim beyond a few hundred steps of a character model. The numbers say what these switches do at this scale.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from minglm.backend import cpu_name
from minglm.config import TrainConfig
from minglm.data.corpus import encode_corpus, load_corpus
from minglm.data.loader import BlockLoader, iter_eval_batches
from minglm.fill_eval import NgramFiller, build_blank_set, model_fills, score
from minglm.model import GLM, GLMConfig
from minglm.optim import AdamW, CosineSchedule
from minglm.tokenizer import CharTokenizer
from minglm.train import Trainer

GLM130B_SWITCHES = dict(position="rope1d", gmask_positions="continue", norm="deepnorm", ffn="geglu",
                        embedding_grad_scale=0.1, softmax_scaling=True)  # the glm-130b preset's switches
VAL_SEED = 1234  # the validation blanks of the trainer's evaluation, as ``python -m minglm train`` uses
SPIKE_WINDOW = 20  # steps of history the gradient-norm spike is measured against
BUDGET_MINUTES = 30  # the full ablation must fit in this on 2 cores (README, "GLM-130B's switches")


@dataclass(frozen=True)
class Setting:
    key: str  # a short id, used by --only and in the JSON
    label: str  # what the table and the plot call it
    switches: dict = field(default_factory=dict)  # GLMConfig overrides
    unstable: bool = False  # trained at AblationConfig.high_lr instead of lr


SETTINGS = (
    Setting("glm1", "GLM-1 (all off)"),
    Setting("rope1d", "RoPE 1-D", dict(position="rope1d")),
    Setting("rope2d", "RoPE 2-D", dict(position="rope2d")),
    Setting("deepnorm", "DeepNorm", dict(norm="deepnorm")),
    Setting("geglu", "GeGLU", dict(ffn="geglu")),
    Setting("egs", "EGS 0.1", dict(embedding_grad_scale=0.1)),
    Setting("fp32softmax", "FP32 softmax", dict(softmax_scaling=True)),
    Setting("glm130b", "GLM-130B (all on)", GLM130B_SWITCHES),
    Setting("glm1-highlr", "GLM-1, high lr", unstable=True),
    Setting("deepnorm-highlr", "DeepNorm, high lr", dict(norm="deepnorm"), unstable=True),
    Setting("egs-highlr", "EGS 0.1, high lr", dict(embedding_grad_scale=0.1), unstable=True),
    Setting("glm130b-highlr", "GLM-130B, high lr", GLM130B_SWITCHES, unstable=True),
)


@dataclass
class AblationConfig:
    """What every run shares. The defaults are the full ablation (20-25 minutes on 2 cores); ``QUICK`` is the
    lesson's few-minute version."""

    steps: int = 800  # per run: 12 settings × 2 seeds at about 0.06 s a step, with their evaluations, fit in 30 min
    seeds: tuple[int, ...] = (0, 1)
    lr: float = 2e-3  # the tiny preset's peak learning rate
    high_lr: float = 2e-2  # the unstable setting: ten times it
    warmup: int = 25
    batch_size: int = 8  # the tiny preset's windows per step
    seq_len: int = 64
    eval_batches: int = 8  # fixed validation batches for val_loss
    fill_word: int = 100  # one-word blanks of the fill benchmark
    fill_span: int = 50  # 2-4-word blanks
    fill_max_new: int = 12  # tokens per fill
    max_rollbacks: int = 3  # NaN/inf rollbacks before a run counts as diverged
    corpus: str = "shakespeare"
    model: str = "tiny"  # the GLMConfig preset the switches are applied to

    def __post_init__(self):
        if self.steps < 1 or not self.seeds:
            raise ValueError(f"AblationConfig: need steps >= 1 and at least one seed, got {self.steps}, {self.seeds}")


QUICK = AblationConfig(steps=120, warmup=10, eval_batches=2, fill_word=20, fill_span=10, fill_max_new=10)


# --------------------------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Data:
    """Everything the runs share: corpus, tokenizer, encoded documents, validation batches, the blank set."""

    corpus: object
    tokenizer: object
    train_ids: list
    val_ids: list
    val_batches: list
    blanks: list
    ngram_exact: float  # the fill benchmark's n-gram baseline on the same blanks, for scale
    ngram_f1: float


def prepare_data(cfg: AblationConfig) -> Data:

    corpus = load_corpus(cfg.corpus, val_fraction=TrainConfig.val_fraction, seed=0)
    tokenizer = CharTokenizer.from_texts(corpus.docs)
    train_ids, val_ids = encode_corpus(corpus, tokenizer)
    mask_ratio = TrainConfig.mask_ratio
    val_batches = [(b.objective, b) for b in iter_eval_batches(
        val_ids, tokenizer, cfg.seq_len, cfg.batch_size, objective="glm-base", seed=VAL_SEED,
        max_batches=cfg.eval_batches, mask_ratio=mask_ratio)]
    # lines that fit the trained positions ([CLS] line <eos> within seq_len), as the train command's closing fills:
    # longer ones would reach position-table rows no step trained, a handicap for learned2d that RoPE does not share
    blanks = build_blank_set(corpus.val, cfg.fill_word, cfg.fill_span, max_chars=min(90, cfg.seq_len - 6))
    ngram = NgramFiller(corpus.train, blanks)
    baseline = score([ngram.fill(b) for b in blanks], blanks)["all"]
    return Data(corpus, tokenizer, train_ids, val_ids, val_batches, blanks, baseline["exact"], baseline["f1"])


def grad_spike(norms, window: int = SPIKE_WINDOW) -> float:
    """max_t ‖g_t‖ / median(‖g_{t-window}‖ .. ‖g_{t-1}‖) over the finite norms; 1.0 when the run is too short."""
    g = np.asarray([n for n in norms if math.isfinite(n)], dtype=np.float64)
    best = 1.0
    for t in range(window, len(g)):
        median = float(np.median(g[t - window:t]))
        if median > 0:
            best = max(best, float(g[t]) / median)
    return best


def train_one(setting: Setting, seed: int, cfg: AblationConfig, data: Data) -> dict:
    """Train one setting at one seed; returns its record (the columns plus a few details)."""

    lr = cfg.high_lr if setting.unstable else cfg.lr
    tcfg = TrainConfig(steps=cfg.steps, lr=lr, warmup=cfg.warmup, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                       eval_every=0, eval_batches=cfg.eval_batches, ckpt_every=max(cfg.steps // 5, 1), seed=seed,
                       spike_factor=0.0, max_rollbacks=cfg.max_rollbacks, fill_lines=0, plots=False,
                       corpus=cfg.corpus)
    mcfg = GLMConfig.preset(cfg.model, vocab_size=data.tokenizer.vocab_size, seq_len=cfg.seq_len, **setting.switches)
    rng = np.random.default_rng(seed)
    model = GLM(mcfg, rng)
    optimizer = AdamW(model, lr=lr, betas=(tcfg.beta1, tcfg.beta2), eps=tcfg.eps, weight_decay=tcfg.weight_decay)
    loader = BlockLoader(data.train_ids, data.tokenizer, cfg.seq_len, cfg.batch_size, objective="glm-base",
                         mask_ratio=tcfg.mask_ratio)
    trainer = Trainer(model, optimizer, CosineSchedule(lr, cfg.warmup, cfg.steps, tcfg.min_lr_ratio), loader, rng,
                      tcfg, data.val_batches, verbose=False)
    t0 = time.perf_counter()
    record = {"setting": setting.key, "label": setting.label, "seed": seed, "lr": lr, "switches": setting.switches,
              "parameters": model.num_parameters()}
    try:
        trainer.fit()
        diverged = False
    except RuntimeError as e:  # too many NaN/inf rollbacks
        diverged, record["error"] = True, str(e)
    steps = [r for r in trainer.records if "grad_norm" in r]
    norms = [r["grad_norm"] for r in steps]
    record.update(diverged=diverged, rollbacks=trainer.rollbacks, steps_done=trainer.step,
                  train_seconds=round(time.perf_counter() - t0, 2),
                  tokens_per_s=float(np.median([r["tokens_per_s"] for r in steps])) if steps else float("nan"),
                  grad_spike=grad_spike(norms), max_grad_norm=max(norms) if norms else float("nan"),
                  loss_curve=[round(float(r["loss"]), 4) for r in steps])
    if diverged:
        record.update(val_loss=float("nan"), fill_exact=float("nan"), fill_f1=float("nan"),
                      run_seconds=round(time.perf_counter() - t0, 2))
        return record
    record["val_loss"] = float(trainer.evaluate()["val_loss"])
    model.eval()
    preds = model_fills(model, data.tokenizer, data.blanks, cfg.fill_max_new)
    scores = score(preds, data.blanks)["all"]
    record.update(fill_exact=float(scores["exact"]), fill_f1=float(scores["f1"]),
                  run_seconds=round(time.perf_counter() - t0, 2))  # training, evaluation and fills
    return record


# --------------------------------------------------------------------------------------------------------------
# The whole ablation and its table
# --------------------------------------------------------------------------------------------------------------


def select(keys: list[str] | None) -> list[Setting]:
    """The settings named in ``keys`` (all when None); an unknown key is a ValueError listing the known ones."""
    if not keys:
        return list(SETTINGS)
    known = {s.key: s for s in SETTINGS}
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise ValueError(f"ablate: unknown setting(s) {unknown}; choose from {', '.join(known)}")
    return [known[k] for k in keys]


def run_ablation(cfg: AblationConfig, settings: list[Setting] | None = None, say=print) -> dict:
    """Train every setting at every seed; returns {"config", "runs", "summary", "ngram_exact", "seconds"}."""
    settings = list(settings or SETTINGS)
    load_at_start = _load()
    t0 = time.perf_counter()
    data = prepare_data(cfg)
    say(f"ablation: {len(settings)} settings x {len(cfg.seeds)} seeds, {cfg.steps} steps each, "
        f"{len(data.blanks)} fill blanks")
    runs = []
    for setting in settings:
        for seed in cfg.seeds:
            r = train_one(setting, seed, cfg, data)
            runs.append(r)
            say(f"  {setting.label:<20} seed {seed}: val {r['val_loss']:.3f}  fill {100 * r['fill_exact']:.1f} % "
                f"(F1 {100 * r['fill_f1']:.1f} %)  "
                f"spike x{r['grad_spike']:.1f}  {r['tokens_per_s']:.0f} tok/s  ({r['train_seconds']:.0f} s"
                f"{', diverged' if r['diverged'] else ''})")
    return {"config": {**asdict(cfg), "seeds": list(cfg.seeds)}, "runs": runs, "summary": summarize(runs, settings),
            "ngram_exact": data.ngram_exact, "ngram_f1": data.ngram_f1, "seconds": round(time.perf_counter() - t0, 1),
            "machine": machine(load_at_start)}


def machine(load_at_start: float | None = None) -> dict:
    """Where the timings come from: the CPU, its cores, and the load average (at the start and now)."""
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "load_start": load_at_start, "load_end": _load()}


def _load() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def estimate(cfg: AblationConfig, settings: list[Setting] | None = None, probe_steps: int = 20,
             say=print) -> dict:
    """How long the whole ablation of ``cfg`` would take here, from a short run of every setting at one seed.

    Each probe run is timed as training (per step) and the rest (its evaluation and fills, which do not grow with
    the steps); the estimate is the data preparation plus, per setting and seed, the rest plus ``cfg.steps`` steps.
    Returns {"minutes", "budget_minutes", "fits", "per_setting", "machine"}; on a shared machine it moves with the
    load, which ``machine`` records."""
    settings = list(settings or SETTINGS)
    load_at_start = _load()
    t0 = time.perf_counter()
    data = prepare_data(cfg)
    total = time.perf_counter() - t0
    probe = replace(cfg, steps=probe_steps, warmup=min(cfg.warmup, probe_steps))
    per_setting = []
    for setting in settings:
        r = train_one(setting, cfg.seeds[0], probe, data)
        per_step = r["train_seconds"] / max(r["steps_done"], 1)
        run = (r["run_seconds"] - r["train_seconds"]) + per_step * cfg.steps
        total += run * len(cfg.seeds)
        per_setting.append({"setting": setting.key, "seconds_per_step": per_step, "run_seconds": run})
        say(f"  {setting.label:<20} {1e3 * per_step:6.0f} ms/step -> about {run / 60:.1f} min a run")
    minutes = total / 60
    return {"minutes": minutes, "budget_minutes": BUDGET_MINUTES, "fits": minutes <= BUDGET_MINUTES,
            "per_setting": per_setting, "machine": machine(load_at_start)}


def summarize(runs: list[dict], settings: list[Setting]) -> list[dict]:
    """One row per setting: means over seeds (NaN-aware), the per-seed values, and the largest spike."""
    def mean(records, key):
        vals = [r[key] for r in records if math.isfinite(r[key])]
        return float(np.mean(vals)) if vals else float("nan")

    rows = []
    for s in settings:
        mine = [r for r in runs if r["setting"] == s.key]
        if not mine:
            continue
        rows.append({"setting": s.key, "label": s.label, "unstable": s.unstable, "lr": mine[0]["lr"],
                     "val_loss": mean(mine, "val_loss"), "val_loss_seeds": [r["val_loss"] for r in mine],
                     "fill_exact": mean(mine, "fill_exact"), "fill_exact_seeds": [r["fill_exact"] for r in mine],
                     "fill_f1": mean(mine, "fill_f1"),
                     "grad_spike": max(r["grad_spike"] for r in mine), "tokens_per_s": mean(mine, "tokens_per_s"),
                     "diverged": sum(r["diverged"] for r in mine), "rollbacks": sum(r["rollbacks"] for r in mine),
                     "seeds": len(mine)})
    return rows


def format_table(result: dict) -> str:
    """The markdown table: one row per setting, the columns of the module docstring."""
    cfg = result["config"]
    lines = [f"{cfg['steps']} steps of the {cfg['model']} config ({cfg['batch_size']} windows of {cfg['seq_len']}), "
             f"seeds {cfg['seeds']}, lr {cfg['lr']:g} (high lr {cfg['high_lr']:g}); fill = exact match on "
             f"{cfg['fill_word']} word + {cfg['fill_span']} span blanks (n-gram baseline "
             f"{100 * result['ngram_exact']:.1f} %, char-F1 {100 * result.get('ngram_f1', float('nan')):.1f} %); "
             f"{result['seconds'] / 60:.1f} min in all{_where(result.get('machine'))}.",
             "",
             "| setting | lr | val loss (per seed) | fill exact | fill char-F1 | largest grad-norm spike | tokens/s |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for row in result["summary"]:
        seeds = ", ".join("diverged" if not math.isfinite(v) else f"{v:.3f}" for v in row["val_loss_seeds"])
        note = f" ({row['rollbacks']} rollbacks)" if row["rollbacks"] else ""
        lines.append(f"| {row['label']}{note} | {row['lr']:g} | {row['val_loss']:.3f} ({seeds}) | "
                     f"{100 * row['fill_exact']:.1f} % | {100 * row['fill_f1']:.1f} % | x{row['grad_spike']:.1f} | "
                     f"{row['tokens_per_s']:,.0f} |")
    return "\n".join(lines)


def _where(m: dict | None) -> str:
    """ " on <CPU>, <n> cores, load a → b" for the table's first line (older results have no machine)."""
    if not m:
        return ""
    return (f" on {m['cpu']}, {m['cores']} cores, load average {m['load_start']} at the start, "
            f"{m['load_end']} at the end")


__all__ = ["AblationConfig", "BUDGET_MINUTES", "QUICK", "SETTINGS", "Setting", "estimate", "format_table",
           "grad_spike", "machine", "prepare_data", "run_ablation", "select", "summarize", "train_one"]
