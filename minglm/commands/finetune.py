"""``python -m minglm finetune``: the genre of a Shakespeare passage as a cloze task, full fine-tuning and LoRA.

The task, the scoring and the fine-tuning loop are ``minglm.finetune``. This command finds the pretrained run
(``--run``, else the newest run under ``runs/``, else it trains a quick 300-step tiny run first), builds the split by
play, and prints one table: the majority baseline, zero-shot, full fine-tuning, LoRA and prefix tuning
(``minglm.prefix``), with their trained parameters and seconds.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np

from minglm.checkpoint import write_json_atomic
from minglm.commands import fail
from minglm.commands import train as train_command
from minglm.finetune import DEFAULT_PATTERN, GENRES, ClozeScorer, ClozeTask, finetune, genre_task
from minglm.lora import apply_lora, lora_summary, save_lora
from minglm.prefix import apply_prefix, prefix_summary
from minglm.runs import BUNDLED_RUNS, load_run, newest_run


def _train_quick_run(out: Path, steps: int, say) -> Path:
    """No pretrained run was found: train the tiny config for ``steps`` steps (a few CPU minutes)."""
    name = f"finetune-base-{int(time.time())}"
    say(f"no run under {out}/: training a quick one ({steps} steps of the tiny config) into {out / name}")
    code = train_command.main(["--steps", str(steps), "--out", str(out), "--name", name, "--quiet"])
    if code != 0:
        raise RuntimeError(f"finetune: the quick pretraining run failed (exit code {code})")
    return out / name


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m minglm finetune",
        description="Cloze fine-tuning (GLM paper §3.1) on the genre of Shakespeare passages, split by play: "
                    "majority baseline, zero-shot, full fine-tuning, LoRA and prefix tuning.")
    ap.add_argument("--run", help="pretrained run folder, checkpoint or 'course' (default: the bundled course "
                                  "model; without it, the newest run under --out, else a quick tiny run trained "
                                  "first)")
    ap.add_argument("--out", default="runs", help="folder that holds run folders (default: runs)")
    ap.add_argument("--pretrain-steps", type=int, default=300, help="steps of the quick run when none exists")
    ap.add_argument("--pattern", default=DEFAULT_PATTERN, help="the cloze pattern with {text} and one [MASK]")
    ap.add_argument("--verbalizers", default=None,
                    help="comma-separated words for comedy,tragedy,history (default: comedy,tragedy,history)")
    ap.add_argument("--n-train", type=int, default=1500, help="training passages (balanced over genres)")
    ap.add_argument("--n-test", type=int, default=300, help="test passages from the held-out plays")
    ap.add_argument("--test-plays", type=int, default=2, help="held-out plays per genre")
    ap.add_argument("--chars", type=int, default=100, help="characters per passage (cut to fit max_len)")
    ap.add_argument("--steps", type=int, default=300, help="fine-tuning steps (each for full and for LoRA)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-4, help="learning rate of full fine-tuning")
    ap.add_argument("--lora-lr", type=float, default=3e-3, help="learning rate of LoRA")
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--lora-alpha", type=float, default=16.0)
    ap.add_argument("--prefix-len", type=int, default=16, help="keys and values per layer of prefix tuning (0 = skip)")
    ap.add_argument("--prefix-lr", type=float, default=3e-2, help="learning rate of prefix tuning")
    ap.add_argument("--length-penalty", type=float, default=0.0, help="divide multi-token scores by (k+1)^p")
    ap.add_argument("--mode", choices=("multi", "first", "single", "auto"), default="multi",
                    help="multi (default): sum of log-probs of the whole verbaliser words and <eop>; first: "
                         "single-token scoring (logits at <sop>) of each word's first token (c/t/h with the character "
                         "tokenizer, about 3x cheaper); single/auto: see ClozeScorer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-lora", default=None, help="write the LoRA adapters here (.npz + .json)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--skip-full", action="store_true", help="only LoRA (faster)")
    args = ap.parse_args(argv)
    try:
        task = check_args(args)  # before a run is loaded, or a quick one trained
        return _run(args, task)
    except (ValueError, OSError, RuntimeError) as e:
        return fail(e)


def check_args(args) -> ClozeTask:
    """Refuse sizes the task cannot use and a malformed pattern in one line; returns the cloze task."""
    genres = len(GENRES)  # train and test passages are balanced over the genres: at least one each
    at_least = {"--n-train": (args.n_train, genres), "--n-test": (args.n_test, genres),
                "--test-plays": (args.test_plays, 1), "--chars": (args.chars, 1), "--steps": (args.steps, 1),
                "--batch-size": (args.batch_size, 1), "--lora-rank": (args.lora_rank, 1),
                "--prefix-len": (args.prefix_len, 0), "--pretrain-steps": (args.pretrain_steps, 1)}
    for flag, (value, low) in at_least.items():
        if value < low:
            raise ValueError(f"{flag} must be at least {low}, got {value}")
    for flag, value in (("--lr", args.lr), ("--lora-lr", args.lora_lr), ("--prefix-lr", args.prefix_lr),
                        ("--lora-alpha", args.lora_alpha)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{flag} must be a finite number > 0, got {value}")
    words = args.verbalizers.split(",") if args.verbalizers else list(GENRES.values())
    if len(words) != len(GENRES):
        raise ValueError(f"--verbalizers needs {len(GENRES)} comma-separated words, got {words!r}")
    try:
        return ClozeTask(args.pattern, [w.strip() for w in words], list(GENRES.values()))
    except ValueError as e:
        raise ValueError(f"--pattern: {e}") from None


def _default_run(out) -> Path | None:
    """The run fine-tuned when none is named: the bundled course model, else the newest run under ``out``."""
    if BUNDLED_RUNS["course"].is_dir():
        return BUNDLED_RUNS["course"]
    return newest_run(out)


def _run(args, task: ClozeTask) -> int:
    say = print
    t_start = time.perf_counter()
    run = Path(args.run) if args.run else _default_run(args.out)
    if run is None:
        run = _train_quick_run(Path(args.out), args.pretrain_steps, say)
    model, tokenizer = load_run(run)
    max_len = model.config.max_len
    scorer = ClozeScorer(tokenizer, task, max_len, args.length_penalty, args.mode)
    data = genre_task(args.n_train, args.n_test, args.test_plays, args.chars, args.seed)
    train_ex, test_ex = scorer.encode(data.train_texts), scorer.encode(data.test_texts)
    say(f"pretrained run: {run} ({model.num_parameters():,} parameters, max_len {max_len})")
    say(f"task: genre of a {args.chars}-character passage; {len(train_ex)} train passages from "
        f"{len(data.train_plays)} plays, {len(test_ex)} test passages from {len(data.test_plays)} held-out plays "
        f"({', '.join(data.test_plays)})")
    say(f"pattern {task.pattern!r}, verbalisers {task.verbalizers} ({scorer.mode}-token scoring)")

    rows = []
    counts = np.bincount(data.train_labels, minlength=len(GENRES))
    majority = int(counts.argmax())
    rows.append(("majority class (" + data.label_names[majority] + ")",
                 float(np.mean(np.asarray(data.test_labels) == majority)), "-", 0.0))

    t = time.perf_counter()
    zero = scorer.accuracy(model, test_ex, data.test_labels)
    rows.append(("zero-shot cloze (pretrained, no update)", zero, "0", time.perf_counter() - t))
    say(f"zero-shot accuracy {zero:.3f}")

    if not args.skip_full:
        t = time.perf_counter()
        say(f"full fine-tuning: {args.steps} steps, batch {args.batch_size}, lr {args.lr}")
        finetune(model, scorer, train_ex, data.train_labels, args.steps, args.batch_size, args.lr,
                 np.random.default_rng(args.seed + 1), warmup=args.steps // 10, log_every=max(args.steps // 5, 1))
        acc = scorer.accuracy(model, test_ex, data.test_labels)
        rows.append(("full fine-tuning", acc, f"{model.num_parameters():,}", time.perf_counter() - t))
        say(f"full fine-tuning accuracy {acc:.3f}")

    model, _ = load_run(run)  # a fresh copy of the pretrained weights
    t = time.perf_counter()
    apply_lora(model, args.lora_rank, args.lora_alpha, np.random.default_rng(args.seed + 2))
    n_train = sum(p.size for _, p in model.named_parameters() if p.requires_grad)
    say(lora_summary(model))
    say(f"LoRA fine-tuning: rank {args.lora_rank}, alpha {args.lora_alpha}, {args.steps} steps, lr {args.lora_lr}")
    finetune(model, scorer, train_ex, data.train_labels, args.steps, args.batch_size, args.lora_lr,
             np.random.default_rng(args.seed + 1), weight_decay=0.0, warmup=args.steps // 10,
             log_every=max(args.steps // 5, 1))
    acc = scorer.accuracy(model, test_ex, data.test_labels)
    rows.append((f"LoRA fine-tuning (rank {args.lora_rank})", acc, f"{n_train:,}", time.perf_counter() - t))
    say(f"LoRA accuracy {acc:.3f}")
    if args.save_lora:
        npz, meta = save_lora(model, args.save_lora)
        say(f"LoRA adapters saved to {npz} and {meta}")

    if args.prefix_len:
        model, _ = load_run(run)
        t = time.perf_counter()
        apply_prefix(model, args.prefix_len, np.random.default_rng(args.seed + 3))
        n_train = sum(p.size for _, p in model.named_parameters() if p.requires_grad)
        say(prefix_summary(model))
        say(f"prefix tuning: {args.prefix_len} per layer, {args.steps} steps, lr {args.prefix_lr}")
        finetune(model, scorer, train_ex, data.train_labels, args.steps, args.batch_size, args.prefix_lr,
                 np.random.default_rng(args.seed + 1), weight_decay=0.0, warmup=args.steps // 10,
                 log_every=max(args.steps // 5, 1))
        acc = scorer.accuracy(model, test_ex, data.test_labels)
        rows.append((f"prefix tuning ({args.prefix_len} per layer)", acc, f"{n_train:,}", time.perf_counter() - t))
        say(f"prefix tuning accuracy {acc:.3f}")

    total = time.perf_counter() - t_start
    print()
    per_genre = np.bincount(data.test_labels, minlength=len(GENRES)).tolist()
    print(f"Genre of a {args.chars}-character Shakespeare passage (comedy / tragedy / history), {scorer.mode}-token "
          f"cloze; {len(test_ex)} test passages ({per_genre} per genre) from {len(data.test_plays)} held-out plays; "
          f"pretrained run `{run.name}`; {args.steps} steps of batch {args.batch_size}; total {total:.0f} s on "
          f"this machine.")
    print()
    print("| method | test accuracy | trained parameters | seconds |")
    print("|---|---|---|---|")
    for name, acc, n, sec in rows:
        print(f"| {name} | {acc:.3f} | {n} | {sec:.0f} |")
    if args.json:
        write_json_atomic(Path(args.json), {
            "run": str(run), "test_plays": data.test_plays, "train_plays": data.train_plays,
            "rows": [{"method": r[0], "accuracy": r[1], "trained_parameters": r[2], "seconds": r[3]} for r in rows],
            "args": vars(args), "seconds": total})
    return 0
