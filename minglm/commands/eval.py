"""``python -m minglm eval fill RUN``: the fill benchmark of a trained run against counting words.

Blanks are cut from the validation documents of the run's own corpus (the split it was trained with), the model
fills them greedily, and a most-frequent-word baseline and a bidirectional word n-gram counted on the training
documents fill the same blanks (``minglm/fill_eval.py`` says exactly how). One table comes out, with the model's
rank and a few example rows; ``--json`` writes the numbers too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from minglm.checkpoint import write_json_atomic
from minglm.commands import fail
from minglm.data.corpus import load_corpus
from minglm.fill_eval import FILL_SEED, N_SPAN, N_WORD, evaluate_fill, format_report
from minglm.runs import load_run, resolve_run


def run_corpus(run_dir: Path):
    """The corpus a run was trained on, split as in training (its config.json names it)."""
    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    train = config.get("train") or {}
    return load_corpus(train.get("corpus", "shakespeare"), val_fraction=train.get("val_fraction", 0.1), seed=0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m minglm eval",
                                 description="Benchmarks of a trained run. `fill`: greedy blank filling on held-out "
                                             "lines against a most-frequent-word and a word n-gram baseline.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("task", choices=("fill",), help="what to measure")
    ap.add_argument("run", help="a run folder runs/<name>, one of its checkpoints, or `course` (the bundled model)")
    ap.add_argument("--words", type=int, default=N_WORD, help="one-word blanks")
    ap.add_argument("--spans", type=int, default=N_SPAN, help="blanks of 2-4 words")
    ap.add_argument("--seed", type=int, default=FILL_SEED, help="seed of the blank set")
    ap.add_argument("--max-new-tokens", type=int, default=40, help="at most this many tokens per fill")
    ap.add_argument("--beams", type=int, default=1,
                    help="above 1: also score the model decoded by a beam search of this width (fill's default: 4)")
    ap.add_argument("--json", default=None, help="also write the report as JSON to this file")
    ap.add_argument("--device", choices=("cpu", "gpu", "auto"), default="cpu")
    args = ap.parse_args(argv)
    try:
        run_dir, _ = resolve_run(args.run)
        model, tokenizer = load_run(args.run, device=args.device)
        corpus = run_corpus(run_dir)
        report = evaluate_fill(model, tokenizer, corpus.train, corpus.val, n_word=args.words, n_span=args.spans,
                               seed=args.seed, max_new=args.max_new_tokens, beams=args.beams)
        if args.json:
            write_json_atomic(Path(args.json), report.to_dict())
    except (ValueError, RuntimeError, OSError) as e:
        return fail(e)
    print(f"run {run_dir} on {corpus.name}")
    print(format_report(report))
    return 0
