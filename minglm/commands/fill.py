"""``python -m minglm fill RUN "text with [MASK]"``: fill the blanks of a text with a trained run.

The decoding itself is ``minglm.generate.fill``; this command loads the run, builds the ``Sampling`` from the flags
(a beam search of 4 for the most likely whole fill unless ``--sample`` or a sampling flag is given; ``--beams 1``
or ``--greedy`` is the plain greedy decoding), warns in one line about blank types the run never trained
with and characters its tokenizer cannot encode, prints the filled text (fills marked «like this»), and with
``--steps`` the table of every decoding step.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from minglm.commands import fail
from minglm.config import TrainConfig
from minglm.data.objectives import GLM_PRESETS
from minglm.generate import BLANK_RE, Sampling, fill, format_steps
from minglm.runs import load_run, resolve_run

DEFAULT_BEAMS = 4  # greedy commits to its first token; 4 beams let a fill that ends cleanly win (README)


def trained_blank_types(run_dir: Path) -> set[str]:
    """The blank markers a run was trained with, read from its config.json (objective defaults to glm-base)."""
    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    objective = (config.get("train") or {}).get("objective", TrainConfig.objective)
    preset = GLM_PRESETS.get(objective)
    if preset is None:  # BERT, GPT, prefix LM, T5: [MASK] only
        return {"[MASK]"}
    out = {"[MASK]"}
    if preset.get("task_mask"):
        if preset.get("sentence_prob", 0.0) > 0:
            out.add("[sMASK]")
        if preset.get("bert_prob", 1.0) + preset.get("sentence_prob", 0.0) < 1.0:
            out.add("[gMASK]")
    return out


def warnings_for(text: str, tokenizer, run_dir: Path) -> list[str]:
    """One-line warnings: blank types the run never saw in training, and characters the tokenizer cannot encode."""
    out = []
    used = set(BLANK_RE.findall(text)) or {"[gMASK]"}  # no blank at all: fill appends [gMASK]
    untrained = sorted(used - trained_blank_types(run_dir))
    if untrained:
        out.append(f"warning: this run was never trained with {' or '.join(untrained)} blanks (its objective has "
                   f"none); expect poor fills. Train with --objective glm-10b or use the course model")
    unknown = tokenizer.count_unknown(text)
    if unknown:
        out.append(f"warning: {unknown} characters of the text are unknown to the tokenizer and become [UNK]")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m minglm fill",
                                 description="Fill the blanks of a text with a trained GLM, greedily unless asked "
                                             "to sample (GLM paper section 2.3; the official generate_samples.py).",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("run", help="a run folder runs/<name> (its latest checkpoint), runs/<name>/ckpt/step_N.npz, or "
                                "`course` (the model that comes with minglm)")
    ap.add_argument("text", help='the text, with [MASK], [sMASK] or [gMASK] blanks (none: "[gMASK]" is appended)')
    ap.add_argument("--sample", action="store_true",
                    help="sample from the distribution instead of taking the most likely token; --temperature, "
                         "--top-k and --top-p imply it")
    ap.add_argument("--greedy", action="store_true", help="the most likely token at every step (--beams 1)")
    ap.add_argument("--beams", type=int, default=None,
                    help="keep this many partial fills and return the most likely whole fill, <eop> included "
                         "(None: 4, or 1 when sampling; 1 = greedy)")
    ap.add_argument("--temperature", type=float, default=None, help="divide the logits by this (sampling: 1.0)")
    ap.add_argument("--top-k", type=int, default=None, help="keep only the k best tokens (sampling: 0 = all)")
    ap.add_argument("--top-p", type=float, default=None, help="nucleus threshold (sampling: 1.0 = off)")
    ap.add_argument("--repetition-penalty", type=float, default=1.0,
                    help="divide positive logits of tokens already in the fill by this (1.0 = off)")
    ap.add_argument("--no-repeat-ngram", type=int, default=0,
                    help="forbid repeating any n-gram of this length inside a fill (0 = off)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    ap.add_argument("--max-len", type=int, default=None,
                    help="at most this many tokens per blank (None: 64, or the model's max_len if smaller)")
    ap.add_argument("--steps", action="store_true", help="print every decoding step with its top-5 candidates")
    ap.add_argument("--device", choices=("cpu", "gpu", "auto"), default="cpu")
    ap.add_argument("--decoder", choices=("auto", "fast", "cached"), default="auto")
    args = ap.parse_args(argv)
    sample = args.sample or any(v is not None for v in (args.temperature, args.top_k, args.top_p))
    if sample and args.greedy:
        ap.error("--greedy cannot go with --sample, --temperature, --top-k or --top-p")
    if args.beams is not None and args.beams > 1 and (sample or args.greedy):
        ap.error("--beams above 1 is a search for the most likely fill; it cannot go with sampling or --greedy")
    if args.beams is None:  # the trace of --steps is the greedy one, step by step
        beams = 1 if sample or args.greedy or args.steps else DEFAULT_BEAMS
    else:
        beams = args.beams
    try:
        run_dir, _ = resolve_run(args.run)
        model, tokenizer = load_run(args.run, device=args.device)
        for line in warnings_for(args.text, tokenizer, run_dir):
            print(line, file=sys.stderr)
        max_new = args.max_len if args.max_len is not None else min(64, model.config.max_len)
        sampling = Sampling(greedy=not sample, temperature=1.0 if args.temperature is None else args.temperature,
                            top_k=args.top_k or 0, top_p=1.0 if args.top_p is None else args.top_p,
                            max_new_tokens=max_new, repetition_penalty=args.repetition_penalty,
                            no_repeat_ngram=args.no_repeat_ngram, beams=beams)
        t0 = time.perf_counter()
        result = fill(model, tokenizer, args.text, sampling, np.random.default_rng(args.seed), decoder=args.decoder)
        dt = time.perf_counter() - t0
    except (ValueError, OSError, RuntimeError) as e:
        return fail(e)
    print(result.marked_text)
    if args.steps:
        print()
        print(format_steps(result, tokenizer))
    n_new = sum(len(f) for f in result.fill_ids)
    print(f"\n[{len(result.fills)} blank(s), {n_new} tokens, stops: {', '.join(result.stop_reasons)}, "
          f"{'sampled' if sample else 'greedy' if beams == 1 else f'{beams} beams'}, {dt * 1000:.0f} ms]",
          file=sys.stderr)
    return 0
