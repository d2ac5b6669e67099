"""Data-pipeline speed: samples/second of the GLM objectives on one core, and BPE training time.

`python -m minglm bench data [--seq-len 512] [--batch-size 16] [--seconds 2] [--corpus shakespeare]`

Measures whole batches as the trainer gets them (window choice, span sampling, blank infilling, padding) for each
objective, with BLAS/OpenMP pinned to one thread, then trains a byte-level BPE on 1 MB of the corpus to 1,000 ids.
Targets: >= 3,000 token-level 512-token samples/s on one core, also for the glm-10b mix; BPE <= 3 s. Then the
time to build one batch of the default run (`words` preset) and of the course model (`course`), word tokens.
"""

from __future__ import annotations

import argparse
import os
import time

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

from minglm.config import TRAIN_PRESETS, make_train_config  # noqa: E402
from minglm.data import BlockLoader, encode_corpus, load_corpus  # noqa: E402
from minglm.runs import make_tokenizer, objective_overrides  # noqa: E402
from minglm.tokenizer import BPETokenizer, CharTokenizer  # noqa: E402


def _rate(loader: BlockLoader, seconds: float, mode: str | None = None) -> tuple[float, int]:
    """Samples per CPU second (process time, one thread): robust to other processes sharing the machine."""
    rng = np.random.default_rng(0)
    loader.next_batch(rng, mode=mode)  # warm-up
    n, t0 = 0, time.process_time()
    while True:
        b = loader.next_batch(rng, mode=mode)
        n += b.tokens.shape[0]
        dt = time.process_time() - t0
        if dt >= seconds:
            return n / dt, b.tokens.shape[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m minglm bench data", description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default="shakespeare")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    p.add_argument("--bpe-bytes", type=int, default=1_000_000)
    p.add_argument("--bpe-vocab", type=int, default=1000)
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    corpus = load_corpus(args.corpus)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    tok = CharTokenizer.from_texts(corpus.train)
    train_ids, _ = encode_corpus(corpus, tok)
    t_enc = time.perf_counter() - t0
    n_tokens = sum(map(len, train_ids))
    print(f"corpus {corpus.name}: {len(corpus.docs)} docs, load {t_load:.2f} s; char tokenizer (V={tok.vocab_size}) "
          f"built + encoded {n_tokens:,} tokens in {t_enc:.2f} s")
    print(f"seq_len {args.seq_len}, batch {args.batch_size}, one thread; samples per CPU second, "
          f"{args.seconds:.1f} s of CPU each")
    print(f"{'objective':<22}{'samples/s':>12}{'tokens/s':>14}{'T (padded)':>12}  note")
    rows = [("glm-base (token)", "glm-base", None), ("glm-10b (mix)", "glm-10b", None),
            ("glm-10b sentence", "glm-10b", "sentence"), ("glm-10b document", "glm-10b", "document"),
            ("glm-doc (mix)", "glm-doc", None), ("glm-130b (mix)", "glm-130b", None),
            ("bert", "bert", None), ("gpt", "gpt", None), ("prefix", "prefix", None), ("t5", "t5", None)]
    for label, name, mode in rows:
        loader = BlockLoader(train_ids, tok, args.seq_len, args.batch_size, objective=name)
        rate, T = _rate(loader, args.seconds, mode)
        note = ""
        if name in ("glm-base", "glm-10b") and mode is None:
            note = "target >= 3000: " + ("ok" if rate >= 3000 else "BELOW")
        resampled = loader.stats.get("resampled", 0) if isinstance(loader.stats, dict) else 0
        if resampled:
            note += f" (resampled {resampled})"
        print(f"{label:<22}{rate:>12,.0f}{rate * args.seq_len:>14,.0f}{T:>12}  {note}")

    # the batches the two word-level runs train on: the default run's 32 windows of 32 word tokens, and the course
    # model's 128, half of them cut to lines (minglm/config.py, the `words` and `course` presets)
    encoded = {}  # (tokenizer, vocab size) -> the tokenizer and the encoded train documents; the presets share one
    for preset in ("words", "course"):
        cfg = make_train_config(TRAIN_PRESETS[preset])
        key = (cfg.tokenizer, cfg.bpe_vocab)
        if key not in encoded:
            tok = make_tokenizer(cfg, corpus)
            encoded[key] = tok, encode_corpus(corpus, tok)[0]
        word_tok, word_ids = encoded[key]
        overrides = objective_overrides(cfg)
        # a preset with all_words draws two kinds of batch (round 11 of the README): time each kind on its own, and
        # their mean at the preset's share, so the figure does not depend on which kind a short run happened to draw
        kinds = [("", overrides)]
        if cfg.all_words:
            kinds = [(" all words", {**overrides, "all_words": 1.0}),
                     (" GLM's blanks", {**overrides, "all_words": 0.0})]
        ms = []
        for kind, kw in kinds:
            loader = BlockLoader(word_ids, word_tok, cfg.seq_len, cfg.batch_size, objective=cfg.objective,
                                 line_windows=cfg.line_windows, **kw)
            rate, T = _rate(loader, args.seconds)
            ms.append(1e3 * cfg.batch_size / rate)
            print(f"`{preset}` preset's batch{kind} ({cfg.batch_size} windows of {cfg.seq_len} word tokens"
                  f"{', half cut to lines' if cfg.line_windows else ''}): {ms[-1]:.1f} ms "
                  f"({rate:,.0f} windows/s, T = {T})")
        if cfg.all_words:
            mean = cfg.all_words * ms[0] + (1 - cfg.all_words) * ms[1]
            print(f"`{preset}` preset's batch on average ({cfg.all_words:g} of them all words): {mean:.1f} ms")

    text = "".join(corpus.train)[: args.bpe_bytes]
    t0 = time.process_time()
    bpe = BPETokenizer.train(text, vocab_size=args.bpe_vocab)
    t_train = time.process_time() - t0
    t0 = time.process_time()
    ids = bpe.encode_array(text)
    t_bpe_enc = time.process_time() - t0
    print(f"BPE: trained on {len(text.encode()):,} bytes to {bpe.vocab_size} ids in {t_train:.2f} CPU s "
          f"(target <= 3 s: {'ok' if t_train <= 3 else 'BELOW'}); encoded it in {t_bpe_enc:.2f} s "
          f"({len(text.encode()) / len(ids):.2f} bytes/token)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
