"""``python -m minglm sample``: print one blank-infilling sample of a corpus (Part A, Part B, positions, mask).

The quickest way to see what the model is trained on, for Shakespeare or for your own folder of text. The table
itself is ``minglm.data.describe``; this command only picks the corpus, objective and seed. A corpus or length it
cannot use is one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import argparse

import numpy as np

from minglm.commands import fail
from minglm.data.batch import describe
from minglm.data.corpus import encode_corpus, load_corpus
from minglm.data.loader import BlockLoader
from minglm.data.objectives import OBJECTIVE_NAMES
from minglm.tokenizer import CharTokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minglm sample",
                                     description="Print a blank-infilling sample: Part A, Part B, positions, mask.")
    parser.add_argument("--corpus", default="shakespeare", help="shakespeare | tang | a .txt file or folder")
    parser.add_argument("--objective", default="glm-base", choices=OBJECTIVE_NAMES)
    parser.add_argument("--seq-len", type=int, default=48, help="window length in tokens ([CLS] and <eos> count)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=64, help="columns shown in the per-token table")
    args = parser.parse_args(argv)
    try:
        if args.max_tokens < 1:
            raise ValueError(f"--max-tokens must be at least 1, got {args.max_tokens}")
        corpus = load_corpus(args.corpus)
        tok = CharTokenizer.from_texts(corpus.train)
        train_ids, _ = encode_corpus(corpus, tok)
        rng = np.random.default_rng(args.seed)
        loader = BlockLoader(train_ids, tok, seq_len=args.seq_len, batch_size=1, objective=args.objective)
        batch = loader.next_batch(rng)
        table = describe(batch, tok, max_tokens=args.max_tokens)
    except (ValueError, OSError) as e:
        return fail(e)
    print(f"corpus {corpus.name!r}: {len(corpus.train)} training documents, vocabulary {tok.vocab_size}")
    print(table)
    return 0
