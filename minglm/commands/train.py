"""``python -m minglm train``: a run folder around the ``Trainer`` (minglm/train.py), the main job of minglm.

With no arguments it trains the tiny config on character-level Shakespeare for a few CPU minutes. It writes the run
folder ``runs/<name>/``: config.json, tokenizer.json, log.jsonl (one JSON line per step), ckpt/step_N.npz + .json and
summary.json, then plots/*.png through ``viz``. At the end it prints held-out lines with the model's greedy fill
beside the truth, and compares the validation loss with a unigram baseline.

``--resume RUN`` continues a run exactly from its latest checkpoint (the Trainer restores the rng, the data position
and the log position), and the ``--inject-*`` flags corrupt the loss at chosen steps to watch the spike guard roll back.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import viz
from minglm.backend import device_xp
from minglm.checkpoint import CheckpointError, latest_checkpoint, write_json_atomic
from minglm.config import TrainConfig, apply_overrides, field_types, load_config_source, make_train_config
from minglm.data.corpus import encode_corpus, load_corpus
from minglm.data.loader import BlockLoader, iter_eval_batches
from minglm.data.objectives import GLM_PRESETS
from minglm.fill_eval import candidate_lines, evaluate_fill, format_report
from minglm.model import GLM, GLMConfig
from minglm.optim import AdamW, CosineSchedule
from minglm.runs import run_meta
from minglm.tensor import Tensor
from minglm.tokenizer import BPETokenizer, CharTokenizer, WordTokenizer, load_tokenizer
from minglm.train import Trainer, unigram_baseline

VAL_SEED = 1234  # the validation blanks are drawn from this fixed seed, independent of --seed

# --------------------------------------------------------------------------------------------------------------
# The end of a run: the fill benchmark (minglm/fill_eval.py) on held-out lines
# --------------------------------------------------------------------------------------------------------------


def end_of_run_fill_eval(model, tokenizer, corpus, cfg: TrainConfig, say=print) -> dict | None:
    """Score the model's greedy fills against the two counting baselines, print the table, and return it.

    The sizes are ``cfg.fill_words`` and ``cfg.fill_spans``, scaled down together when the validation documents
    have fewer usable lines (a small corpus of your own); None when there are none or both sizes are 0.
    """
    want = cfg.fill_words + cfg.fill_spans
    have = len(candidate_lines(corpus.val))
    if want == 0 or have == 0:
        return None
    scale = min(1.0, have / want)
    n_word, n_span = int(cfg.fill_words * scale), int(cfg.fill_spans * scale)
    model.eval()
    report = evaluate_fill(model, tokenizer, corpus.train, corpus.val, n_word=n_word, n_span=n_span,
                           n_examples=cfg.fill_lines)
    model.train()
    say(format_report(report))
    return report.to_dict()


# --------------------------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m minglm train",
        description="Train a GLM. With no arguments: the tiny config on character-level Shakespeare (CPU, minutes).",
    )
    ap.add_argument("--config", default=None, help="tiny | small | base | FILE.json (a run's config.json works)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override one config field (train or model.<field>), repeatable, e.g. --set lr=1e-3")
    ap.add_argument("--steps", type=int, help="optimizer steps (default: the config's)")
    ap.add_argument("--out", default="runs", help="folder that holds run folders (default: runs)")
    ap.add_argument("--name", help="run folder name (default: <corpus>-<preset>-<objective>, numbered if taken)")
    ap.add_argument("--seed", type=int, help="seed of the one random generator")
    ap.add_argument("--device", choices=("auto", "cpu", "gpu"), help="where to train (default: the config's)")
    ap.add_argument("--resume", metavar="RUN", help="continue a run folder exactly from its latest checkpoint")
    ap.add_argument("--corpus", help="shakespeare | tang | a .txt file or folder of them")
    ap.add_argument("--objective", help="glm-base | glm-10b | glm-doc | glm-130b | bert | gpt | prefix | t5")
    ap.add_argument("--eval-every", type=int, help="validate every N steps")
    ap.add_argument("--ckpt-every", type=int, help="checkpoint every N steps")
    ap.add_argument("--keep", type=int, help="keep the newest K checkpoints")
    ap.add_argument("--time-limit", type=float, help="stop (evaluate and save) after this many seconds of training")
    ap.add_argument("--stop-at", type=int, metavar="STEP",
                    help="stop after STEP without saving, as if the process died (to try --resume)")
    ap.add_argument("--inject-spike-at", default="", metavar="STEPS",
                    help="testing the guard: multiply the loss by 1000 at these steps (comma list, once each)")
    ap.add_argument("--inject-nan-at", default="", metavar="STEPS",
                    help="testing the guard: make the loss NaN at these steps (comma list, once each)")
    ap.add_argument("--quiet", action="store_true", help="print only the final summary")
    return ap


def _steps_list(text: str, flag: str) -> set[int]:
    try:
        return {int(s) for s in text.split(",") if s.strip()}
    except ValueError:
        raise ValueError(f"{flag}: expected a comma-separated list of steps, got {text!r}") from None


def make_fault_hook(spike_at: set[int], nan_at: set[int]):
    """A fault_hook that corrupts the loss once at each listed step (after a rollback the step number repeats)."""
    spike_at, nan_at = set(spike_at), set(nan_at)
    if not spike_at and not nan_at:
        return None

    def hook(step: int, loss: Tensor) -> Tensor:
        if step in spike_at:
            spike_at.discard(step)
            return loss * 1000.0
        if step in nan_at:
            nan_at.discard(step)
            return loss * float("nan")
        return loss

    return hook


def _unique_run_dir(out: Path, name: str) -> Path:
    path, i = out / name, 2
    while path.exists():
        path, i = out / f"{name}-{i}", i + 1
    return path


def _truncate_log(path: Path, n_lines: int) -> None:
    """Keep the first ``n_lines`` lines of log.jsonl (what the checkpoint had seen), atomically."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True) if path.exists() else []
    if len(lines) < n_lines:
        raise CheckpointError(f"resume: {path} has {len(lines)} lines, the checkpoint expects at least {n_lines}")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".log.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.writelines(lines[:n_lines])
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _resolve_resume(resume: str, out: str) -> Path:
    for cand in (Path(resume), Path(out) / resume):
        if (cand / "config.json").is_file():
            return cand
    raise ValueError(f"--resume: {resume!r} is not a run folder with a config.json (looked in . and {out}/)")


def _model_config(preset: str | None, model: dict, train: TrainConfig, vocab_size: int) -> GLMConfig:
    model = dict(model)
    model.setdefault("vocab_size", vocab_size)
    if model["vocab_size"] < vocab_size:
        raise ValueError(f"model.vocab_size={model['vocab_size']} is smaller than the tokenizer's {vocab_size}")
    model["seq_len"] = train.seq_len
    # Part B reuses the blanks' positions, but a long [gMASK] span can have block ids up to seq_len + 1
    model["max_len"] = max(int(model.get("max_len") or 0), train.seq_len + 1)
    try:
        return GLMConfig.from_dict(model)
    except TypeError as e:
        raise ValueError(f"model config: {e}") from e


def make_tokenizer(cfg: TrainConfig, corpus):
    """A new run's tokenizer: every character of the corpus, or byte-level BPE learned on the train documents."""
    if cfg.tokenizer == "bpe":
        return BPETokenizer.train(corpus.train, vocab_size=cfg.bpe_vocab)
    if cfg.tokenizer == "word":
        return WordTokenizer.train(corpus.train, vocab_size=cfg.bpe_vocab)
    return CharTokenizer.from_texts(corpus.docs)


def _objective_overrides(cfg: TrainConfig) -> dict:
    """Data settings from the config that the objective takes (mask_ratio: the GLM mixtures and BERT only)."""
    if cfg.objective in GLM_PRESETS:
        return {"mask_ratio": cfg.mask_ratio, "span_unit": cfg.span_unit, "span_lambda": cfg.span_lambda}
    if cfg.span_unit != "token" or cfg.span_lambda != TrainConfig.span_lambda:
        raise ValueError("TrainConfig.span_unit and span_lambda apply to the glm-* objectives only")
    if cfg.objective == "bert":
        return {"mask_ratio": cfg.mask_ratio}
    if cfg.mask_ratio != TrainConfig.mask_ratio:
        raise ValueError(f"TrainConfig.mask_ratio does not apply to the {cfg.objective!r} objective")
    return {}


def _eval_modes(objective) -> list[str | None]:
    """The GLM modes to validate separately (those with a non-zero probability); [None] for the baselines."""
    if not hasattr(objective, "bert_prob"):
        return [None]
    doc = 1.0 - objective.bert_prob - objective.sentence_prob
    modes = [m for m, p in (("token", objective.bert_prob), ("sentence", objective.sentence_prob),
                            ("document", doc)) if p > 1e-9]
    return modes if len(modes) > 1 else [None]


def main(argv: list[str] | None = None) -> int:
    """``python -m minglm train [options]``; returns the exit code (2 for bad input)."""
    t_main = time.perf_counter()
    args = build_parser().parse_args(argv)
    try:
        return _run(args, t_main)
    except (ValueError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _run(args, t_main: float) -> int:
    model_fields = field_types(GLMConfig)
    flags = {"steps": args.steps, "seed": args.seed, "device": args.device, "corpus": args.corpus,
             "objective": args.objective, "eval_every": args.eval_every, "ckpt_every": args.ckpt_every,
             "keep": args.keep, "time_limit": args.time_limit}
    if args.resume:
        blocked = [f for f in ("config", "corpus", "objective", "seed") if getattr(args, f) is not None] + \
            (["set"] if args.set else [])
        if blocked:
            raise ValueError(f"--resume continues a run with its saved config; drop --{', --'.join(blocked)}")
        run_dir = _resolve_resume(args.resume, args.out)
        saved = json.loads((run_dir / "config.json").read_text())
        preset, model_dict, train_dict = saved.get("preset"), dict(saved["model"]), dict(saved["train"])
    else:
        preset, model_dict, train_dict = load_config_source(args.config or "tiny", GLMConfig.PRESETS)
        apply_overrides(model_dict, train_dict, args.set, model_fields)
        if os.environ.get("MINGLM_ATTENTION") and "attention" not in model_dict:  # the one place it is read
            model_dict["attention"] = os.environ["MINGLM_ATTENTION"].strip().lower()
    train_dict.update({k: v for k, v in flags.items() if v is not None})
    cfg = make_train_config(train_dict)
    verbose = not args.quiet
    say = print if verbose else (lambda *a, **k: None)

    # data and tokenizer
    corpus = load_corpus(cfg.corpus, val_fraction=cfg.val_fraction, seed=0)
    if args.resume:
        tokenizer = load_tokenizer(run_dir / "tokenizer.json")
    else:
        tokenizer = make_tokenizer(cfg, corpus)
    train_ids, val_ids = encode_corpus(corpus, tokenizer)
    if not val_ids:
        raise ValueError(f"corpus {cfg.corpus!r} has no validation documents (it needs at least two documents)")
    mcfg = _model_config(preset, model_dict, cfg, tokenizer.vocab_size)

    # the run folder
    if not args.resume:
        out = Path(args.out)
        if args.name:
            run_dir = out / args.name
            if run_dir.exists():
                raise ValueError(f"--name: {run_dir} exists; pick another name or --resume it")
        else:
            run_dir = _unique_run_dir(out, f"{corpus.name}-{preset or 'custom'}-{cfg.objective}".replace("/", "_"))
        run_dir.mkdir(parents=True)
        tokenizer.save(run_dir / "tokenizer.json")
        (run_dir / "log.jsonl").write_text("")
    config_record = {"preset": preset, "model": mcfg.to_dict(), "train": cfg.to_dict()}
    write_json_atomic(run_dir / "config.json", config_record)

    # model, optimizer, loaders (the rng: model init, then data order, blanks and dropout)
    rng = np.random.default_rng(cfg.seed)
    model = GLM(mcfg, rng)
    xp = device_xp(cfg.device)
    if xp is not np:
        model.to("gpu")  # before the optimizer: it makes the parameters views of its flat buffer
    optimizer = AdamW(model, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay)
    schedule = CosineSchedule(cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
    data_kw = _objective_overrides(cfg)
    loader = BlockLoader(train_ids, tokenizer, cfg.seq_len, cfg.batch_size, objective=cfg.objective, **data_kw)
    val_batches = []
    for mode in _eval_modes(loader.objective):
        for b in iter_eval_batches(val_ids, tokenizer, cfg.seq_len, cfg.batch_size, objective=cfg.objective,
                                   seed=VAL_SEED, max_batches=cfg.eval_batches, mode=mode, **data_kw):
            val_batches.append((b.objective, b))
    meta = {**run_meta(mcfg, tokenizer), "train_config": cfg.to_dict()}
    expect = {"model_config": meta["model_config"], "vocab_sha256": meta["vocab_sha256"]}
    spike = _steps_list(args.inject_spike_at, "--inject-spike-at")
    nan = _steps_list(args.inject_nan_at, "--inject-nan-at")
    trainer = Trainer(model, optimizer, schedule, loader, rng, cfg, val_batches, ckpt_dir=run_dir / "ckpt",
                      log_path=run_dir / "log.jsonl", meta=meta, expect=expect,
                      fault_hook=make_fault_hook(spike, nan), verbose=verbose)
    if args.resume:
        ckpt_dir = run_dir / "ckpt"
        if latest_checkpoint(ckpt_dir) is None:
            raise CheckpointError(f"--resume: no valid checkpoint in {ckpt_dir}")
        step = trainer.load_checkpoint(ckpt_dir, full=True)
        _truncate_log(run_dir / "log.jsonl", trainer.log_lines)
        say(f"resumed {run_dir} at step {step}")

    n_params = model.num_parameters()
    say(f"run {run_dir}: {n_params:,} parameters, vocab {tokenizer.vocab_size}, {cfg.objective} on {corpus.name} "
        f"({sum(map(len, train_ids)):,} train / {sum(map(len, val_ids)):,} val tokens), {cfg.steps} steps of "
        f"{cfg.batch_size}x{cfg.grad_accum} windows of {cfg.seq_len}, device {cfg.device}")
    t_train = time.perf_counter()
    reason = trainer.fit(until=args.stop_at)
    train_s = time.perf_counter() - t_train
    if reason == "until":
        say(f"stopped after step {trainer.step} (--stop-at); continue with --resume {run_dir}")
        return 0

    # the end: final numbers, baseline, fills, plots
    final = trainer.last_eval if trainer.last_eval.get("step") == trainer.step else {
        "step": trainer.step, **trainer.evaluate()}
    base_loader = BlockLoader(train_ids, tokenizer, cfg.seq_len, cfg.batch_size, objective=cfg.objective, **data_kw)
    unigram = unigram_baseline(base_loader, val_batches, tokenizer.vocab_size)
    fill_report = end_of_run_fill_eval(model, tokenizer, corpus, cfg, say=say)
    steps_done = [r for r in trainer.records if "loss" in r]
    summary = {
        "run": str(run_dir), "steps": trainer.step, "stop_reason": reason, "rollbacks": trainer.rollbacks,
        "train_seconds": round(train_s, 2), "wall_seconds": round(time.perf_counter() - t_main, 2),
        "tokens_per_s": round(float(np.median([r["tokens_per_s"] for r in steps_done])), 1) if steps_done else None,
        "parameters": n_params, **{k: v for k, v in final.items() if k != "step"},
        "unigram_loss": unigram,
        "unigram_note": "unigram of Part-B target ids counted over 64 train batches (add-one smoothed), "
                        "scored on the same validation Part-B targets as val_loss",
        "val_over_unigram": final.get("val_loss", float("nan")) / unigram,
        "fill_eval": fill_report,
    }
    write_json_atomic(run_dir / "summary.json", summary)
    if cfg.plots:
        viz.save_run_plots(run_dir)  # a plot that fails is skipped with a warning, never the run
    val_loss = final.get("val_loss", float("nan"))
    fills = ""
    if fill_report:
        word = {name: fill_report["scores"][name]["word"]["exact"] for name in ("model", "n-gram")}
        fills = f"; one-word fills {100 * word['model']:.1f} % exact (n-gram {100 * word['n-gram']:.1f} %)"
    print(f"done: {trainer.step} steps in {train_s:.0f} s ({reason}); val loss {val_loss:.3f}"
          f" vs unigram {unigram:.3f} (ratio {summary['val_over_unigram']:.2f}){fills}; run folder {run_dir}")
    return 0
