"""Blank infilling with a trained GLM: encode the context once, then fill each blank token by token from <sop>.

This follows the official ``generate_samples.py`` step by step (docs/decoding.md):

1. The context is ``[CLS] text <eos>``. The text may hold ``[MASK]``, ``[sMASK]`` and ``[gMASK]`` blanks; when it has
   none, ``[gMASK]`` is appended, and no ``<eos>`` follows a text that ends with ``[gMASK]``.
2. The context is encoded once with ``sep = len(context)``: every context token sees every other (Part A). Its
   keys and values stay in a cache.
3. The blanks are filled in ascending position order. For a blank at context index ``m`` we feed ``<sop>`` at
   (position ``m``, block id 1), then each sampled token at (``m``, 2), (``m``, 3), ... one at a time, causally
   (``sep = 0``) against everything cached. We stop when the model samples ``<eop>`` or ``<eos>``; that end token
   is never fed back. The cache keeps growing, so a later blank sees the earlier fills, exactly like the
   "antecedent spans" of Part B in training.

Steps 2-3 run the model's own layers with its ``KVCache`` (``CachedDecoder``), by default through ``GLM.infer``,
the array-level twin of ``GLM.forward`` that sits beside it in minglm/model.py; ``decoder="cached"`` takes
``GLM.forward`` itself. Both are tested against a full recomputation without any cache (``recompute_logits``).

Two conveniences the official script does not have, both off by default: a repetition penalty and a ban on
repeated n-grams inside a fill (``Sampling``). And one convention about spaces: the spaces right before a blank
are left out of the context, because a blank in training starts where a word starts, with its leading space
(byte-level BPE pieces carry it, and so do word-aligned spans); the fill brings its own space back, and
``_splice`` trims the spaces that would double up around it.

Left out on purpose: beam search and batching several prompts.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from minglm.backend import get_xp, to_numpy
from minglm.model import KVCache
from minglm.tensor import no_grad

# The blank markers a user may type (the same three the tokenizer turns into special ids).
BLANK_RE = re.compile(r"\[(?:MASK|sMASK|gMASK)\]")
SPACE_BEFORE_BLANK_RE = re.compile(r" +(\[(?:MASK|sMASK|gMASK)\])")


# --------------------------------------------------------------------------------------------------------------
# Inputs: the context and the GLM ids of every fed token
# --------------------------------------------------------------------------------------------------------------


def blank_ids(tokenizer) -> tuple[int, int, int]:
    return (tokenizer.mask_id, tokenizer.smask_id, tokenizer.gmask_id)


def build_context(tokenizer, text: str) -> tuple[np.ndarray, list[int], bool]:
    """The context ids ``[CLS] text <eos>`` (docs/decoding.md, step 1), the blank indices in it, and whether a
    ``[gMASK]`` had to be appended because the text had no blank.

    Returns (ids (n,) int64, mask_positions in ascending order, appended_gmask).
    """
    if not isinstance(text, str):
        raise ValueError(f"build_context: text must be a str, got {type(text).__name__}")
    ids = list(tokenizer.encode(SPACE_BEFORE_BLANK_RE.sub(r"\1", text)))
    blanks = blank_ids(tokenizer)
    appended = not any(i in blanks for i in ids)
    if appended:
        ids.append(tokenizer.gmask_id)
    context = [tokenizer.cls_id, *ids]
    if context[-1] != tokenizer.gmask_id:
        context.append(tokenizer.eos_id)
    arr = np.asarray(context, dtype=np.int64)
    positions = np.flatnonzero(np.isin(arr, blanks)).tolist()
    return arr, positions, appended


def check_lengths(config, n_context: int, n_blanks: int, max_new: int) -> None:
    """Raise a clear ValueError when the context or the fills do not fit the model's position tables."""
    limit = int(config.max_len)
    if n_context > limit:
        raise ValueError(
            f"generate: the context is {n_context} tokens ([CLS] + text + <eos>), longer than the model's "
            f"max_len={limit}; shorten the text"
        )
    if max_new > limit:  # fed block ids run 1 (<sop>) .. max_new; the last sampled token is never fed
        raise ValueError(f"generate: max_new_tokens={max_new} per blank needs block ids up to {max_new}, more than "
                         f"the model's max_len={limit}")
    if n_blanks == 0:
        raise ValueError("generate: the context has no blank to fill")


# --------------------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Sampling:
    """How the next token is chosen. ``greedy`` takes the argmax (``fill`` without a Sampling is greedy; a Sampling
    built with only a temperature or a top-k samples); otherwise the logits are divided by
    ``temperature``, cut to the ``top_k`` best (0 = no cut) and to the smallest set whose probability reaches
    ``top_p`` (1.0 = no cut), then sampled (the order of the official ``top_k_logits``).

    Before either, two optional controls act on the tokens this fill has produced so far: ``repetition_penalty``
    p > 1 divides a positive logit of such a token by p and multiplies a negative one by p (the rule of CTRL,
    Keskar et al. 2019, section 4.1), and ``no_repeat_ngram`` n > 0 forbids the token that would repeat an n-gram
    already in the fill. Both are off by default (1.0 and 0)."""

    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 32  # at most this many tokens per blank (the end token not counted)
    repetition_penalty: float = 1.0  # 1.0 = off
    no_repeat_ngram: int = 0  # 0 = off
    beams: int = 1  # > 1: beam search over each blank's whole fill, its end token included (greedy only)

    def __post_init__(self):
        if not isinstance(self.beams, int | np.integer) or self.beams < 1:
            raise ValueError(f"Sampling: beams must be an integer >= 1, got {self.beams!r}")
        if self.beams > 1 and not self.greedy:
            raise ValueError("Sampling: beams > 1 is a search for the most likely fill; it needs greedy=True "
                             "(sampling draws one token at a time)")
        if not self.repetition_penalty >= 1.0 or self.repetition_penalty == float("inf"):
            raise ValueError(f"Sampling: repetition_penalty must be a finite number >= 1, "
                             f"got {self.repetition_penalty}")
        if self.no_repeat_ngram < 0:
            raise ValueError(f"Sampling: no_repeat_ngram must be >= 0, got {self.no_repeat_ngram}")
        if not self.temperature > 0.0:
            raise ValueError(f"Sampling: temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"Sampling: top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"Sampling: top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"Sampling: max_new_tokens must be >= 1, got {self.max_new_tokens}")


def _softmax64(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64) - z.max()
    p = np.exp(z)
    return p / p.sum()


def sampling_probs(logits: np.ndarray, s: Sampling) -> np.ndarray:
    """The distribution the next token is drawn from (V,), float64, after temperature, top-k and top-p."""
    z = np.asarray(logits, dtype=np.float64) / s.temperature
    V = z.shape[0]
    if 0 < s.top_k < V:
        kth = np.partition(z, V - s.top_k)[V - s.top_k]
        z = np.where(z < kth, -np.inf, z)
    p = _softmax64(z)
    if s.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        # keep every token until the cumulative probability reaches top_p, including the one that crosses it
        keep_sorted = np.concatenate([[True], cum[:-1] < s.top_p])
        keep = np.zeros(V, dtype=bool)
        keep[order[keep_sorted]] = True
        p = np.where(keep, p, 0.0)
        p /= p.sum()
    return p


def repetition_controls(logits: np.ndarray, history, s: Sampling) -> np.ndarray:
    """``logits`` (V,) after the repetition penalty and the n-gram ban of ``s`` for a fill that so far produced
    ``history`` (token ids); the input itself when both are off."""
    if s.repetition_penalty == 1.0 and not s.no_repeat_ngram or not len(history):
        return logits
    z = np.array(logits, dtype=np.float64)  # a copy: the decoder's buffer is left alone
    if s.repetition_penalty != 1.0:
        seen = np.unique(np.asarray(history, dtype=np.int64))
        z[seen] = np.where(z[seen] > 0, z[seen] / s.repetition_penalty, z[seen] * s.repetition_penalty)
    n = s.no_repeat_ngram
    if n and len(history) >= n:  # ban t when history[-(n-1):] + [t] already occurred as an n-gram
        h = list(history)
        prefix = h[len(h) - n + 1:] if n > 1 else []
        banned = [h[i + n - 1] for i in range(len(h) - n + 1) if h[i: i + n - 1] == prefix]
        z[banned] = -np.inf
    return z


def choose_token(logits: np.ndarray, s: Sampling, rng: np.random.Generator | None, history=()) -> int:
    """The next token id: argmax when greedy, else a draw from ``sampling_probs`` with ``rng``; ``history`` (the
    fill's tokens so far) feeds the repetition controls of ``s``."""
    logits = repetition_controls(logits, history, s)
    if s.greedy:
        return int(np.argmax(logits))
    if rng is None:
        raise ValueError("choose_token: sampling needs an explicit numpy Generator `rng` (or greedy=True)")
    p = sampling_probs(logits, s)
    cdf = np.cumsum(p)
    u = rng.random() * cdf[-1]
    return int(min(np.searchsorted(cdf, u, side="right"), len(p) - 1))


def top_candidates(logits: np.ndarray, n: int, temperature: float = 1.0) -> list[tuple[int, float]]:
    """The ``n`` most likely tokens under softmax(logits / temperature), as (id, probability), best first."""
    p = _softmax64(np.asarray(logits, dtype=np.float64) / temperature)
    n = min(n, p.shape[0])
    best = np.argpartition(-p, n - 1)[:n]
    best = best[np.argsort(-p[best], kind="stable")]
    return [(int(i), float(p[i])) for i in best]


# --------------------------------------------------------------------------------------------------------------
# Decoders: encode the context once, then one token at a time with a cache
# --------------------------------------------------------------------------------------------------------------


class CachedDecoder:
    """Encode the context once, then feed one token at a time, with the model's ``KVCache``.

    ``prefill(ids)`` encodes the context with sep = its length (all bidirectional) and returns its logits (n, V);
    ``step(token, pos, block)`` feeds one token causally (sep = 0) against everything cached and returns its logits
    (V,). Both return NumPy. Two paths through the same layers, with the same logits:

    - ``fast=True``: ``GLM.infer``, each layer's array-level ``infer`` method, with no Tensor objects and no graph.
      One decoding step of a small model is a chain of tiny matrix-vector products, so its time is per-call
      overhead rather than arithmetic, and skipping the Tensor engine about doubles the tokens per second;
    - ``fast=False``: ``GLM.forward`` under ``no_grad``, the Tensor path that training uses.
    """

    def __init__(self, model, capacity: int, fast: bool = True):
        self.model, self.fast = model, fast
        self.cache = KVCache(model, 1, capacity)
        self.xp = get_xp(model.word_embeddings.weight.data)
        cfg = model.config
        # every id a step can feed, as a (1, 1) array made once: a step then builds no arrays from Python lists
        self._ids = self.xp.arange(max(cfg.vocab_size, cfg.max_len + 1), dtype=np.int64).reshape(-1, 1, 1)
        self._sep0 = self.xp.zeros(1, dtype=np.int64)

    @property
    def length(self) -> int:
        """How many tokens the cache holds."""
        return self.cache.length

    def _run(self, tokens, pos, block, sep: int) -> np.ndarray:
        xp = self.xp
        args = (xp.asarray(tokens, dtype=np.int64).reshape(1, -1), xp.asarray(pos, dtype=np.int64).reshape(1, -1),
                xp.asarray(block, dtype=np.int64).reshape(1, -1), xp.asarray([sep], dtype=np.int64))
        if self.fast:
            logits = self.model.infer(*args, cache=self.cache)  # (1, T, V) array
        else:
            with no_grad():
                logits = self.model.forward(*args, cache=self.cache).data  # (1, T, V)
        return to_numpy(logits)[0]

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        n = len(ids)
        return self._run(ids, np.arange(n), np.zeros(n, dtype=np.int64), sep=self.length + n)

    def rewind(self, length: int) -> None:
        """Forget every token fed after the first ``length`` (a beam search tries several continuations)."""
        self.cache.truncate(length)

    def feed(self, tokens, pos, block) -> np.ndarray:
        """Feed several tokens causally (sep = 0) in one call; the logits (V,) of the last."""
        return self._run(tokens, pos, block, sep=0)[-1]

    def step(self, token: int, pos: int, block: int) -> np.ndarray:
        # Three integer comparisons here instead of the model's array checks, which cost ~5 % of a step.
        cfg = self.model.config
        if not (0 <= token < cfg.vocab_size and 0 <= pos <= cfg.max_len and 0 <= block <= cfg.max_len):
            raise ValueError(f"CachedDecoder.step: token {token}, position {pos} or block id {block} is out of range "
                             f"(vocabulary {cfg.vocab_size}, positions 0..{cfg.max_len})")
        if self.cache.length >= self.cache.capacity:
            raise ValueError(f"CachedDecoder.step: the cache is full ({self.cache.capacity} positions)")
        ids = self._ids
        if self.fast:
            logits = self.model.infer(ids[token], ids[pos], ids[block], self._sep0, cache=self.cache, check=False)
            return to_numpy(logits)[0, 0]  # (V,)
        return self._run([token], [pos], [block], sep=0)[0]


def make_decoder(model, capacity: int, kind: str = "auto") -> CachedDecoder:
    """``"fast"`` (``GLM.infer``), ``"cached"`` (``GLM.forward`` with the Tensor engine), or ``"auto"`` (fast)."""
    if kind not in ("auto", "fast", "cached"):
        raise ValueError(f"make_decoder: kind must be 'auto', 'fast' or 'cached', got {kind!r}")
    return CachedDecoder(model, capacity, fast=kind != "cached")


def recompute_logits(model, tokens, position_ids, block_position_ids, sep: int) -> np.ndarray:
    """Logits (T, V) of one full forward over a whole sequence, no cache: the reference a cached decoder must
    equal. The sequence is ``context + <sop> fill ...`` with GLM's 2D positions and ``sep`` = the context length."""
    xp = get_xp(model.word_embeddings.weight.data)
    with no_grad():
        logits = model.forward(
            xp.asarray(tokens, dtype=np.int64).reshape(1, -1),
            xp.asarray(position_ids, dtype=np.int64).reshape(1, -1),
            xp.asarray(block_position_ids, dtype=np.int64).reshape(1, -1),
            xp.asarray([sep], dtype=np.int64),
        )
    return to_numpy(logits.data)[0]


# --------------------------------------------------------------------------------------------------------------
# Filling the blanks
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Step:
    """One decoding step, for learners: the token fed, its two position ids, and what came out."""

    blank: int  # which blank (0 = the first in the text)
    token_in: int  # the id fed (<sop> or the previous sample)
    position_id: int  # first position row: the blank's index in the context
    block_id: int  # second position row: 1 for <sop>, 2, 3, ... after it
    token_out: int  # the id chosen from this step's logits
    top: list[tuple[int, float]]  # the best candidates as (id, probability)


@dataclass
class FillResult:
    """What ``fill`` returns.

    ``tokens``/``position_ids``/``block_position_ids`` are every token the model saw, in order (context, then
    ``<sop> fill…`` for each blank; an end token is never fed), so ``recompute_logits`` can replay them.
    ``fills`` are the decoded fills trimmed of the spaces that would double up in the text (``trim_fill``);
    ``fill_ids`` are the ids exactly as produced.
    """

    text: str
    filled_text: str
    marked_text: str
    fills: list[str]
    fill_ids: list[list[int]]
    stop_reasons: list[str]  # "eop", "eos" or "max_new_tokens" per blank
    mask_positions: list[int]
    context_len: int
    tokens: list[int] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)
    block_position_ids: list[int] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)


def trim_fill(fill: str, before: str, after: str) -> str:
    """The fill without the spaces that would double up with the text around its blank: leading whitespace goes
    when ``before`` ends with a space (or is empty: the start of the text), trailing whitespace when ``after``
    starts with one."""
    if not before or before[-1].isspace():
        fill = fill.lstrip()
    if not after or after[0].isspace():
        fill = fill.rstrip()
    return fill


def _splice(text: str, fills: list[str], appended: bool, left: str = "", right: str = "") -> str:
    """Put each (trimmed) fill into its blank of the original text (an appended [gMASK] means: after the text)."""
    if appended:
        return text + left + fills[0] + right
    pieces = BLANK_RE.split(text)
    out = [pieces[0]]
    for fill, rest in zip(fills, pieces[1:]):
        out.append(left + fill + right)
        out.append(rest)
    return "".join(out)


def fill(model, tokenizer, text: str, sampling: Sampling | None = None, rng: np.random.Generator | None = None,
         decoder: str | Callable = "auto", n_top: int = 5) -> FillResult:
    """Fill every blank of ``text`` (docs/decoding.md). ``rng`` is required unless ``sampling.greedy``.

    ``decoder``: "auto", "fast" or "cached" (see ``make_decoder``), or a callable ``(model, capacity) -> decoder``
    with ``prefill(ids)`` and ``step(token, position_id, block_id) -> logits (V,)`` (tests use one to record).
    ``n_top``: how many candidates each ``Step`` of the trace keeps (0 = no trace).
    """
    s = sampling or Sampling(greedy=True)
    if not s.greedy and rng is None:
        raise ValueError("fill: sampling needs an explicit numpy Generator `rng` (or Sampling(greedy=True))")
    context, masks, appended = build_context(tokenizer, text)
    n = len(context)
    check_lengths(model.config, n, len(masks), s.max_new_tokens)
    capacity = n + len(masks) * (s.max_new_tokens + 1)
    dec = decoder(model, capacity) if callable(decoder) else make_decoder(model, capacity, decoder)
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        dec.prefill(context)
        tokens, pos_ids, block_ids = context.tolist(), list(range(n)), [0] * n
        fills, fill_ids, reasons, steps = [], [], [], []
        ends = (tokenizer.eop_id, tokenizer.eos_id)
        for b, m in enumerate(masks):
            token, out = tokenizer.sop_id, []
            reason = "max_new_tokens"
            if s.beams > 1:
                out, reason = beam_search(dec, tokenizer, m, s)
                fed = [tokenizer.sop_id, *(out if reason != "max_new_tokens" else out[:-1])]
                tokens += fed
                pos_ids += [m] * len(fed)
                block_ids += list(range(1, len(fed) + 1))
            else:
                for c in range(s.max_new_tokens):
                    logits = dec.step(token, m, c + 1)  # (V,)
                    tokens.append(token)
                    pos_ids.append(m)
                    block_ids.append(c + 1)
                    nxt = choose_token(logits, s, rng, out)
                    if n_top:
                        top = top_candidates(logits, n_top, 1.0 if s.greedy else s.temperature)
                        steps.append(Step(b, token, m, c + 1, nxt, top))
                    if nxt in ends:
                        reason = "eop" if nxt == tokenizer.eop_id else "eos"
                        break
                    out.append(nxt)
                    token = nxt
            fill_ids.append(out)
            fills.append(tokenizer.decode(out))
            reasons.append(reason)
        if appended:
            fills[0] = fills[0].rstrip()
        else:
            pieces = BLANK_RE.split(text)
            fills = [trim_fill(f, pieces[i], pieces[i + 1]) for i, f in enumerate(fills)]
    finally:
        if was_training:
            model.train()
    return FillResult(
        text=text,
        filled_text=_splice(text, fills, appended),
        marked_text=_splice(text, fills, appended, "«", "»"),
        fills=fills,
        fill_ids=fill_ids,
        stop_reasons=reasons,
        mask_positions=masks,
        context_len=n,
        tokens=tokens,
        position_ids=pos_ids,
        block_position_ids=block_ids,
        steps=steps,
    )


def beam_search(dec, tokenizer, m: int, s: Sampling) -> tuple[list[int], str]:
    """The fill of the blank at context index ``m`` with the highest log-probability, its end token included, among
    ``s.beams`` hypotheses kept at each step (docs/decoding.md); returns (ids, stop reason).

    Greedy decoding commits to its first token: after ``I`` in ``[MASK] me thy hand`` nothing ends the blank well,
    and it spells on. A beam keeps the few best prefixes and scores whole fills, ``<eop>`` included, so a fill that
    ends cleanly can win. Each hypothesis is replayed from the cache's state before the blank (``rewind``, then one
    causal ``feed`` of ``<sop>`` + its tokens), so the cache is never copied; when the search ends, the cache holds
    the winner, as after a greedy fill. Scores are sums of log-probabilities, which only fall as a fill grows: the
    search stops when the best finished fill beats every open one.
    """
    if not (hasattr(dec, "rewind") and hasattr(dec, "feed")):
        raise ValueError("fill: beams > 1 needs a decoder with rewind() and feed() (make_decoder's)")
    base, sop = dec.length, tokenizer.sop_id
    ends = {tokenizer.eop_id: "eop", tokenizer.eos_id: "eos"}
    live: list[tuple[tuple[int, ...], float]] = [((), 0.0)]
    done: list[tuple[tuple[int, ...], float, str]] = []
    for _ in range(s.max_new_tokens):
        grown = []
        for ids, score in live:
            dec.rewind(base)
            fed = (sop, *ids)
            logits = dec.feed(fed, [m] * len(fed), list(range(1, len(fed) + 1)))
            z = np.asarray(repetition_controls(logits, ids, s), dtype=np.float64)
            logp = z - (z.max() + np.log(np.exp(z - z.max()).sum()))
            best = np.argpartition(-logp, s.beams - 1)[: s.beams]
            grown += [(ids + (int(t),), score + float(logp[t])) for t in best]
        grown.sort(key=lambda h: -h[1])
        live = []
        for ids, score in grown:
            if ids[-1] in ends:
                done.append((ids[:-1], score, ends[ids[-1]]))
            elif len(live) < s.beams:
                live.append((ids, score))
        if not live or (done and max(d[1] for d in done) >= live[0][1]):
            break
    if done:
        ids, _, reason = max(done, key=lambda d: d[1])
        fed = (sop, *ids)
    else:  # every hypothesis ran to max_new_tokens: the best open one, its last token never fed (as greedy)
        ids, reason = live[0][0], "max_new_tokens"
        fed = (sop, *ids[:-1])
    dec.rewind(base)
    dec.feed(fed, [m] * len(fed), list(range(1, len(fed) + 1)))
    return list(ids), reason


# --------------------------------------------------------------------------------------------------------------
# A readable trace of the decoding steps
# --------------------------------------------------------------------------------------------------------------


def _show(tokenizer, i: int) -> str:
    return repr(tokenizer.decode([i]))


def format_steps(result: FillResult, tokenizer) -> str:
    """A table of every decoding step: the token fed, its (position, block) ids, the choice and the top candidates."""
    lines = ["blank  fed         pos  block  chose       top candidates (probability)"]
    for st in result.steps:
        top = "  ".join(f"{tokenizer.decode([i])!r} {p:.3f}" for i, p in st.top)
        lines.append(
            f"{st.blank:5d}  {_show(tokenizer, st.token_in):10s} {st.position_id:4d}  {st.block_id:5d}  "
            f"{_show(tokenizer, st.token_out):10s}  {top}"
        )
    return "\n".join(lines)
