"""Blank infilling with a trained GLM: encode the context once, then fill each blank token by token from <sop>.

This follows GLM-REFERENCE.md §6 (the official ``generate_samples.py``) step by step:

1. The context is ``[CLS] text <eos>``. The text may hold ``[MASK]``, ``[sMASK]`` and ``[gMASK]`` blanks; when it has
   none, ``[gMASK]`` is appended, and no ``<eos>`` follows a text that ends with ``[gMASK]``.
2. The context is encoded once with ``sep = len(context)``: every context token sees every other (Part A). Its
   keys and values stay in a cache.
3. The blanks are filled in ascending position order. For a blank at context index ``m`` we feed ``<sop>`` at
   (position ``m``, block id 1), then each sampled token at (``m``, 2), (``m``, 3), ... one at a time, causally
   (``sep = 0``) against everything cached. We stop when the model samples ``<eop>`` or ``<eos>``; that end token
   is never fed back. The cache keeps growing, so a later blank sees the earlier fills, exactly like the
   "antecedent spans" of Part B in training.

Two decoders implement steps 2-3 and give the same logits:
- ``CachedDecoder``: the model's own ``forward(..., cache=KVCache)``, the readable path;
- ``FastDecoder``: the same arithmetic in plain array code on the model's weights, with no Tensor objects, no graph
  and preallocated buffers, because decoding one token is bound by per-op overhead (PERFORMANCE.md).
Both are tested against a full recomputation without any cache (``recompute_logits``).

Left out on purpose: beam search, batching several prompts, and repetition penalties (the official interactive
script has none of them either).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from minglm.backend import get_xp, to_numpy
from minglm.tensor import no_grad

# The blank markers a user may type (the same three the tokenizer turns into special ids).
BLANK_RE = re.compile(r"\[(?:MASK|sMASK|gMASK)\]")


# --------------------------------------------------------------------------------------------------------------
# Inputs: the context and the GLM ids of every fed token
# --------------------------------------------------------------------------------------------------------------


def blank_ids(tokenizer) -> tuple[int, int, int]:
    return (tokenizer.mask_id, tokenizer.smask_id, tokenizer.gmask_id)


def build_context(tokenizer, text: str) -> tuple[np.ndarray, list[int], bool]:
    """The context ids ``[CLS] text <eos>`` (GLM-REFERENCE §6.1), the blank indices in it, and whether a
    ``[gMASK]`` had to be appended because the text had no blank.

    Returns (ids (n,) int64, mask_positions in ascending order, appended_gmask).
    """
    if not isinstance(text, str):
        raise ValueError(f"build_context: text must be a str, got {type(text).__name__}")
    ids = list(tokenizer.encode(text))
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
        raise ValueError(f"generate: max_len per blank {max_new} needs block ids up to {max_new}, more than the "
                         f"model's max_len={limit}")
    if n_blanks == 0:
        raise ValueError("generate: the context has no blank to fill")


# --------------------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Sampling:
    """How the next token is chosen. ``greedy`` takes the argmax; otherwise the logits are divided by
    ``temperature``, cut to the ``top_k`` best (0 = no cut) and to the smallest set whose probability reaches
    ``top_p`` (1.0 = no cut), then sampled (the order of the official ``top_k_logits``)."""

    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_len: int = 32  # at most this many tokens per blank (the end token not counted)

    def __post_init__(self):
        if not self.temperature > 0.0:
            raise ValueError(f"Sampling: temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"Sampling: top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"Sampling: top_p must be in (0, 1], got {self.top_p}")
        if self.max_len < 1:
            raise ValueError(f"Sampling: max_len must be >= 1, got {self.max_len}")


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


def choose_token(logits: np.ndarray, s: Sampling, rng: np.random.Generator | None) -> int:
    """The next token id: argmax when greedy, else a draw from ``sampling_probs`` with ``rng``."""
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
    """Decoding through ``model.forward`` with the model's ``KVCache`` (the plain, readable path).

    ``prefill(ids)`` encodes the context with sep = len (all bidirectional) and returns its logits (n, V);
    ``step(token, pos, block)`` feeds one token causally (sep = 0) and returns its logits (V,). Both return NumPy.
    """

    def __init__(self, model, capacity: int, xp=None):
        from minglm.model import KVCache

        self.model = model
        self.xp = xp or _model_xp(model)
        self.cache = KVCache(model, 1, capacity, xp=self.xp)
        self.length = 0

    def _forward(self, tokens, pos, block, sep: int) -> np.ndarray:
        xp = self.xp
        with no_grad():
            logits = self.model.forward(
                xp.asarray(tokens, dtype=np.int64).reshape(1, -1),
                xp.asarray(pos, dtype=np.int64).reshape(1, -1),
                xp.asarray(block, dtype=np.int64).reshape(1, -1),
                xp.asarray([sep], dtype=np.int64),
                cache=self.cache,
            )
        self.length += len(tokens)
        return to_numpy(logits.data)[0]

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        n = len(ids)
        return self._forward(ids, np.arange(n), np.zeros(n, dtype=np.int64), sep=n)

    def step(self, token: int, pos: int, block: int) -> np.ndarray:
        return self._forward([token], [pos], [block], sep=0)[0]


def _model_xp(model):
    """The array module that holds the model's weights."""
    for _, p in model.named_parameters():
        return get_xp(p.data)
    return np


class FastDecoder:
    """The same decoding as ``CachedDecoder``, written directly on the model's weight arrays.

    Why it exists: one decoding step of a 4-layer model is about 8 MFLOP, so its time is the per-op overhead of
    Python and the Tensor engine, not arithmetic (PERFORMANCE.md). Here a step is about 25 array calls per layer
    with no Tensor objects, no graph, no input checks and a preallocated cache (L, nh, capacity, hs). The weights
    are read by reference, so the decoder sees the model's current parameters; it must be rebuilt if they are
    replaced by new arrays (e.g. ``model.to("gpu")``). Tested against ``CachedDecoder`` and ``recompute_logits``.
    """

    def __init__(self, model, capacity: int):
        if not self.supports(model):
            raise ValueError("FastDecoder: the model's layers are not plain GLM blocks (adapters?); use CachedDecoder")
        cfg = model.config
        self.config = cfg
        self.nh, self.hs, self.C = cfg.n_head, cfg.head_size, cfg.d_model
        self.eps = float(cfg.layernorm_eps)
        self.wte = model.word_embeddings.weight.data  # (V, C), also the output head
        self.wpe = model.position_embeddings.weight.data  # (max_len + 1, C)
        self.wbe = model.block_position_embeddings.weight.data  # (max_len + 1, C)
        self.lnf = (model.final_layernorm.weight.data, model.final_layernorm.bias.data)
        self.layers = []
        for blk in model.layers:
            a, m = blk.attention, blk.mlp
            self.layers.append((
                blk.input_layernorm.weight.data, blk.input_layernorm.bias.data,
                a.query_key_value.weight.data, a.query_key_value.bias.data,  # (3C, C), (3C,)
                a.dense.weight.data, a.dense.bias.data,  # (C, C), (C,)
                blk.post_attention_layernorm.weight.data, blk.post_attention_layernorm.bias.data,
                m.dense_h_to_4h.weight.data, m.dense_h_to_4h.bias.data,  # (4C, C), (4C,)
                m.dense_4h_to_h.weight.data, m.dense_4h_to_h.bias.data,  # (C, 4C), (C,)
            ))
        self.xp = get_xp(self.wte)
        shape = (cfg.n_layer, self.nh, capacity, self.hs)
        self.k = self.xp.zeros(shape, dtype=self.wte.dtype)  # (L, nh, capacity, hs)
        self.v = self.xp.zeros(shape, dtype=self.wte.dtype)  # (L, nh, capacity, hs)
        self.capacity, self.length = capacity, 0
        self.scale = 1.0 / math.sqrt(self.hs)
        # index arrays of length 1 for every token / position id, made once: a step then does no list->array work
        self._one_tok = self.xp.arange(self.wte.shape[0]).reshape(-1, 1)  # (V, 1)
        self._one_pos = self.xp.arange(self.wpe.shape[0]).reshape(-1, 1)  # (max_len + 1, 1)

    @staticmethod
    def supports(model) -> bool:
        """True when every block holds the plain nn.Linear / nn.LayerNorm layers this decoder reads."""
        from minglm.nn import LayerNorm, Linear

        try:
            for blk in model.layers:
                mods = (blk.attention.query_key_value, blk.attention.dense, blk.mlp.dense_h_to_4h,
                        blk.mlp.dense_4h_to_h)
                if any(type(m) is not Linear or m.bias is None for m in mods):
                    return False
                if type(blk.input_layernorm) is not LayerNorm or type(blk.post_attention_layernorm) is not LayerNorm:
                    return False
            return type(model.final_layernorm) is LayerNorm
        except AttributeError:
            return False

    # The step is written as a few named parts so that ``python -m minglm bench generate --profile`` can time each
    # one by wrapping it; the calls cost about a microsecond each.

    def _embed(self, tokens, pos, block):
        return self.wte[tokens] + self.wpe[pos] + self.wbe[block]  # (T, C)

    def _ln(self, x, w, b):
        xp = self.xp
        inv_c = 1.0 / self.C  # sum * (1/C): ndarray.mean goes through Python code, sum does not
        xc = x - x.sum(axis=-1, keepdims=True) * inv_c
        var = (xc * xc).sum(axis=-1, keepdims=True) * inv_c
        xc *= 1.0 / xp.sqrt(var + self.eps)
        xc *= w
        xc += b
        return xc

    @staticmethod
    def _linear(x, w, b):
        y = x @ w.T
        y += b
        return y

    def _attention(self, li: int, qkv, L0: int, end: int, mask):
        """Append the new keys and values to layer li's cache and attend over everything cached: (T, C)."""
        xp, nh, hs = self.xp, self.nh, self.hs
        T = qkv.shape[0]
        qkv = qkv.reshape(T, 3, nh, hs)
        self.k[li, :, L0:end] = qkv[:, 1].transpose(1, 0, 2)  # (nh, T, hs)
        self.v[li, :, L0:end] = qkv[:, 2].transpose(1, 0, 2)
        q = qkv[:, 0].transpose(1, 0, 2) * self.scale  # (nh, T, hs)
        s = q @ self.k[li, :, :end].transpose(0, 2, 1)  # (nh, T, end)
        if mask is not None:
            s = xp.where(mask, s, -np.inf)
        s -= s.max(axis=-1, keepdims=True)
        xp.exp(s, out=s)
        s *= 1.0 / s.sum(axis=-1, keepdims=True)
        return (s @ self.v[li, :, :end]).transpose(1, 0, 2).reshape(T, self.C)  # (T, C): heads side by side

    def _gelu(self, u):
        """tanh GeLU: 0.5 u (1 + tanh(c (u + 0.044715 u^3)))."""
        g = self.xp.tanh((u + 0.044715 * (u * u * u)) * 0.7978845608028654)
        g += 1.0
        g *= u
        g *= 0.5
        return g

    def _logits(self, h):
        return to_numpy(h @ self.wte.T)  # (T, V): the tied head

    def _run(self, tokens, pos, block, sep: int):
        """Feed T new tokens after the ``length`` cached ones; key j is visible to new token i (absolute index
        length + i) when j < sep or j <= length + i. Returns logits (T, V)."""
        xp = self.xp
        T, L0 = len(tokens), self.length
        end = L0 + T
        if end > self.capacity:
            raise ValueError(f"FastDecoder: the cache holds {L0} of {self.capacity} positions, cannot take {T} more")
        x = self._embed(tokens, pos, block)  # (T, C)
        mask = None
        if T > 1 and sep < end:  # some new tokens must not see later ones (causal part)
            j = xp.arange(end)[None, :]
            i = xp.arange(T)[:, None] + L0
            mask = (j < sep) | (j <= i)  # (T, end)
        for li, (w1, b1, wqkv, bqkv, wo, bo, w2, b2, wup, bup, wdn, bdn) in enumerate(self.layers):
            qkv = self._linear(self._ln(x, w1, b1), wqkv, bqkv)  # (T, 3C)
            x += self._linear(self._attention(li, qkv, L0, end, mask), wo, bo)
            u = self._linear(self._ln(x, w2, b2), wup, bup)  # (T, 4C)
            x += self._linear(self._gelu(u), wdn, bdn)
        self.length = end
        return self._logits(self._ln(x, *self.lnf))  # (T, V)

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        n = len(ids)
        xp = self.xp
        return self._run(xp.asarray(ids), xp.arange(n), xp.zeros(n, dtype=np.int64), sep=self.length + n)

    def step(self, token: int, pos: int, block: int) -> np.ndarray:
        return self._run(self._one_tok[token], self._one_pos[pos], self._one_pos[block], sep=0)[0]


def make_decoder(model, capacity: int, kind: str = "auto"):
    """``"fast"`` (plain arrays, ``FastDecoder``), ``"cached"`` (model.forward with ``KVCache``), or ``"auto"``:
    fast when the model is a plain GLM (no adapters in its layers), else cached."""
    if kind not in ("auto", "fast", "cached"):
        raise ValueError(f"make_decoder: kind must be 'auto', 'fast' or 'cached', got {kind!r}")
    if kind == "cached" or (kind == "auto" and not FastDecoder.supports(model)):
        return CachedDecoder(model, capacity)
    return FastDecoder(model, capacity)


def recompute_logits(model, tokens, position_ids, block_position_ids, sep: int) -> np.ndarray:
    """Logits (T, V) of one full forward over a whole sequence, no cache: the reference a cached decoder must
    equal. The sequence is ``context + <sop> fill ...`` with GLM's 2D positions and ``sep`` = the context length."""
    xp = _model_xp(model)
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
    """

    text: str
    filled_text: str
    marked_text: str
    fills: list[str]
    fill_ids: list[list[int]]
    stop_reasons: list[str]  # "eop", "eos" or "max_len" per blank
    mask_positions: list[int]
    context_len: int
    tokens: list[int] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)
    block_position_ids: list[int] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)


def _splice(text: str, fills: list[str], appended: bool, left: str = "", right: str = "") -> str:
    """Put each fill into its blank of the original text (an appended [gMASK] means: after the text)."""
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
    """Fill every blank of ``text`` (GLM-REFERENCE §6). ``rng`` is required unless ``sampling.greedy``.

    ``decoder``: "auto", "fast" or "cached" (see ``make_decoder``), or a callable ``(model, capacity) -> decoder``
    with ``prefill(ids)`` and ``step(token, position_id, block_id) -> logits (V,)`` (tests use one to record).
    ``n_top``: how many candidates each ``Step`` of the trace keeps (0 = no trace).
    """
    s = sampling or Sampling(greedy=True)
    if not s.greedy and rng is None:
        raise ValueError("fill: sampling needs an explicit numpy Generator `rng` (or Sampling(greedy=True))")
    context, masks, appended = build_context(tokenizer, text)
    n = len(context)
    check_lengths(model.config, n, len(masks), s.max_len)
    capacity = n + len(masks) * (s.max_len + 1)
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
            reason = "max_len"
            for c in range(s.max_len):
                logits = dec.step(token, m, c + 1)  # (V,)
                tokens.append(token)
                pos_ids.append(m)
                block_ids.append(c + 1)
                nxt = choose_token(logits, s, rng)
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
