"""``python -m minglm fill RUN "text with [MASK]"``: fill the blanks of a text with a trained run.

The decoding itself is ``minglm.generate.fill``; this command loads the run, builds the ``Sampling`` from the flags,
prints the filled text (fills marked «like this»), and with ``--steps`` the table of every decoding step.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from minglm.generate import Sampling, fill, format_steps
from minglm.runs import load_run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m minglm fill",
                                 description="Fill the blanks of a text with a trained GLM (GLM-REFERENCE §6).")
    ap.add_argument("run", help="a run folder runs/<name> (its latest checkpoint) or runs/<name>/ckpt/step_N.npz")
    ap.add_argument("text", help='the text, with [MASK], [sMASK] or [gMASK] blanks (none: "[gMASK]" is appended)')
    ap.add_argument("--greedy", action="store_true", help="take the most likely token at every step")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0, help="keep only the k best tokens (0 = all)")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (1.0 = off)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-len", type=int, default=None,
                    help="at most this many tokens per blank (default: 64, or the model's max_len if smaller)")
    ap.add_argument("--steps", action="store_true", help="print every decoding step with its top-5 candidates")
    ap.add_argument("--device", choices=("cpu", "gpu", "auto"), default="cpu")
    ap.add_argument("--decoder", choices=("auto", "fast", "cached"), default="auto")
    args = ap.parse_args(argv)
    try:
        model, tokenizer = load_run(args.run, device=args.device)
        max_new = args.max_len if args.max_len is not None else min(64, model.config.max_len)
        sampling = Sampling(greedy=args.greedy, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            max_len=max_new)
        t0 = time.perf_counter()
        result = fill(model, tokenizer, args.text, sampling, np.random.default_rng(args.seed), decoder=args.decoder)
        dt = time.perf_counter() - t0
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result.marked_text)
    if args.steps:
        print()
        print(format_steps(result, tokenizer))
    n_new = sum(len(f) for f in result.fill_ids)
    print(f"\n[{len(result.fills)} blank(s), {n_new} tokens, stops: {', '.join(result.stop_reasons)}, "
          f"{dt * 1000:.0f} ms]", file=sys.stderr)
    return 0
