"""Pretraining objectives: GLM's mixture (one objective per batch) and the baselines GLM is compared with.

Every objective turns a list of framed windows (`[CLS] doc <eos> ...`, docs/official-code.md §1) into the same
`Batch`, so one model trains on any of them (the GLM mixtures are docs/official-code.md §2.1):

| name       | what it is                                                                                 |
|------------|--------------------------------------------------------------------------------------------|
| glm-base   | token-level blank infilling only, blank [MASK] (GLM-Base/Large)                              |
| glm-10b    | token 0.5 / sentence 0.3 / document 0.2, task masks [MASK] [sMASK] [gMASK], gpt min ratio 0.25 |
| glm-doc    | token 0.5 / document 0.5, blank [MASK] for both, document span 50-100 % of the length        |
| glm-130b   | 30 % token-level [MASK], 70 % [gMASK] prefix (suffix generation, length uniform)             |
| bert       | BERT MLM: 15 % of tokens, 80/10/10 [MASK]/random/same, fully bidirectional (sep = length)    |
| gpt        | causal LM: sep = 0, targets shifted by one, loss on every real token                         |
| prefix     | prefix LM (UniLM-style): a random prefix is bidirectional (sep = its length), loss on the rest |
| t5         | T5 span corruption, see `T5Objective` for how sentinels map onto this small vocabulary       |

The mixture draws its mode once per batch: rand < bert_prob -> "token"; < bert_prob + sentence_prob -> "sentence";
else "document". `Batch.objective` is the mode name, so a trainer can log the loss per mode.
Left out: GLM-10B's `--block-mask-prob` ([dBLOCK]) and `--short-seq-prob`, and GLM-130B's 1-D RoPE positions
(docs/glm130b.md; the 130B preset only reproduces its data mixture).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import numpy as np

from minglm.data.batch import Batch, collate
from minglm.data.blank import (
    Sample,
    blank_infill,
    check_spans,
    gmask_prefix,
    infill_rows,
    part_b_order,
    part_b_orders,
)
from minglm.data.samplers import (
    TokenSpanSampler,
    WordSpanSampler,
    choose_sentences,
    draw_gmask_bound,
    is_multi_document,
    place_spans,
    sentence_end_table,
    word_edge_tables,
)
from minglm.tokenizer import CLS_ID, EOP_ID, EOS_ID, GMASK_ID, MASK_ID, N_SPECIAL, SMASK_ID, SOP_ID

GLM_PRESETS = {
    "glm-base": dict(bert_prob=1.0, sentence_prob=0.0, gpt_min_ratio=0.5, task_mask=False),
    "glm-10b": dict(bert_prob=0.5, sentence_prob=0.3, gpt_min_ratio=0.25, task_mask=True),
    "glm-doc": dict(bert_prob=0.5, sentence_prob=0.0, gpt_min_ratio=0.5, task_mask=False),
    "glm-130b": dict(bert_prob=0.3, sentence_prob=0.0, gpt_min_ratio=0.0, gpt_infill_prob=1.0, task_mask=True),
}
BASELINES = ("bert", "gpt", "prefix", "t5")
OBJECTIVE_NAMES = tuple(GLM_PRESETS) + BASELINES


@dataclass
class GLMObjective:
    """GLM's blank-infilling mixture. Defaults are the official argument defaults (docs/official-code.md §2.1)."""

    name: str = "glm-base"
    bert_prob: float = 1.0  # P(token-level batch)
    sentence_prob: float = 0.0  # P(sentence-level batch); document level gets the rest
    gpt_min_ratio: float = 0.5  # the [gMASK] span is at least this fraction of the shortest sample
    gpt_infill_prob: float = 0.5  # official `infill_prob`: P(prefix branch) for a single-document sample (sic)
    task_mask: bool = False  # True: [sMASK] / [gMASK] as blanks for sentence / document; False: [MASK] everywhere
    mask_ratio: float = 0.15  # token and sentence level mask at least int(mask_ratio * len) tokens
    shuffle: bool = True  # False = the `--no-shuffle-block` ablation (Part B in text order)
    block_position: bool = True  # False = the `--no-block-position` ablation (block ids all 1 in Part B)
    vocab_size: int = 0  # unused by GLM itself; kept so every objective has the same constructor
    sentence_end: np.ndarray | None = field(default=None, repr=False)  # (V,) bool, from the tokenizer
    span_lambda: float = 3.0  # Poisson mean of the token-level span lengths (GLM: 3)
    span_unit: str = "token"  # "word": token-level spans count whole words (WordSpanSampler), a named deviation
    word_edges: tuple | None = field(default=None, repr=False)  # from the tokenizer, for span_unit="word"
    sampler: TokenSpanSampler = field(default_factory=TokenSpanSampler, repr=False)
    # A named deviation from GLM (README, "What was tried", round 11): the share of token-level batches in which every
    # word of a window the vocabulary holds as one token is a blank at once and Part A keeps those words (its
    # [MASK]s put back). Only a model that hides each Part-B token's own slot (GLMConfig.hide_own_token) and has one
    # layer, or keeps Part A raw (GLMConfig.raw_part_a), can train on it without reading the answers; the train
    # command checks. Needs span_unit="known_word"
    all_words: float = 0.0

    def __post_init__(self):
        if self.span_unit not in ("token", "word", "known_word"):
            raise ValueError(f"GLMObjective.span_unit must be 'token', 'word' or 'known_word', got {self.span_unit!r}")
        if not self.span_lambda > 0:
            raise ValueError(f"GLMObjective.span_lambda must be > 0, got {self.span_lambda!r}")
        if self.span_unit in ("word", "known_word"):
            if self.word_edges is None:
                raise ValueError(f"GLMObjective: span_unit={self.span_unit!r} needs the tokenizer "
                                 "(make_objective(name, tokenizer))")
            self.sampler = WordSpanSampler(*self.word_edges, known_only=self.span_unit == "known_word",
                                           lam=self.span_lambda)
        elif self.span_lambda != 3.0:
            self.sampler = TokenSpanSampler(lam=self.span_lambda)
        if not (0 <= self.bert_prob and 0 <= self.sentence_prob and self.bert_prob + self.sentence_prob <= 1 + 1e-9):
            raise ValueError(f"GLMObjective: need 0 <= bert_prob, sentence_prob and their sum <= 1, got "
                             f"{self.bert_prob}, {self.sentence_prob}")
        self.sampler.ratio = self.mask_ratio
        if not 0.0 <= self.all_words <= 1.0:
            raise ValueError(f"GLMObjective.all_words must be in [0, 1], got {self.all_words!r}")
        if self.all_words > 0 and self.span_unit != "known_word":
            raise ValueError(f"GLMObjective.all_words={self.all_words} blanks the words the vocabulary holds: it needs "
                             f"span_unit='known_word', got {self.span_unit!r}")

    @property
    def stats(self) -> dict:
        return self.sampler.stats

    def choose_mode(self, rng: np.random.Generator) -> str:
        r = rng.random()
        if r < self.bert_prob:
            return "token"
        if r < self.bert_prob + self.sentence_prob:
            return "sentence"
        return "document"

    def _spans(self, window: np.ndarray, mode: str, rng: np.random.Generator) -> np.ndarray:
        """The spans of a token-level or sentence-level sample."""
        if mode == "token":
            return self.sampler(window, rng)
        if self.sentence_end is None:
            raise ValueError("GLMObjective: sentence mode needs the tokenizer (make_objective(name, tokenizer))")
        return choose_sentences(window, self.sentence_end, rng, self.mask_ratio)

    def _blank_id(self, mode: str) -> int:
        """The blank of a mode: [sMASK] / [gMASK] for sentences / documents with task masks, else [MASK]."""
        if self.task_mask and mode in ("sentence", "document"):
            return SMASK_ID if mode == "sentence" else GMASK_ID
        return MASK_ID

    def make_sample(self, window: np.ndarray, mode: str, rng: np.random.Generator, g: int | None = None) -> Sample:
        if mode in ("token", "sentence"):
            s = blank_infill(window, self._spans(window, mode, rng), mask_id=self._blank_id(mode),
                             shuffle=self.shuffle, block_position=self.block_position, rng=rng)
            s.objective = mode
            return s
        if mode == "document":
            prefix, spans = self._document(window, rng, g)
            if prefix is not None:
                return prefix
            s = blank_infill(window, spans, mask_id=self._blank_id(mode), shuffle=False,
                             block_position=self.block_position)
            s.objective = "document"
            return s
        raise ValueError(f"GLMObjective.make_sample: unknown mode {mode!r} (token, sentence, document)")

    def _document(self, window: np.ndarray, rng: np.random.Generator, g: int | None) -> tuple[Sample | None, object]:
        """A document-level sample: (the prefix branch's Sample, None), or (None, the infill branch's one span as an
        (1, 2) array)."""
        L = len(window)
        g = min(g if g is not None else L - 2, L - 2)
        if is_multi_document(window) or rng.random() < self.gpt_infill_prob:
            return gmask_prefix(window, g, mask_id=self._blank_id("document"), block_position=self.block_position), None
        return None, place_spans(window, np.array([g]), rng, pack=True)

    def make_batch(self, windows: list[np.ndarray], rng: np.random.Generator, mode: str | None = None,
                   pad_to: int | None = None) -> Batch:
        """One objective for the whole batch (drawn unless `mode` is given), then right-padding."""
        mode = self.choose_mode(rng) if mode is None else mode
        if mode == "document":
            g = draw_gmask_bound([len(w) for w in windows], rng, self.gpt_min_ratio)
            windows = [np.asarray(w, dtype=np.int64) for w in windows]
            drawn = [self._document(w, rng, g) for w in windows]  # per window: the draws are sequential
            infill = [i for i, (prefix, _) in enumerate(drawn) if prefix is None]  # built together, below
            samples = [prefix for prefix, _ in drawn]
            if infill:
                out = infill_rows([windows[i] for i in infill], [drawn[i][1] for i in infill],
                                  [np.arange(1)] * len(infill), self._blank_id(mode), SOP_ID, EOP_ID,
                                  self.block_position)
                for r, i in enumerate(infill):  # per infill window: views of its row
                    n = int(out["lengths"][r])
                    samples[i] = Sample(**{k: out[k][r, :n] for k in Batch.ROW_FIELDS}, sep=int(out["sep"][r]),
                                        objective="document")
            return collate(samples, objective=mode, pad_to=pad_to)
        if mode not in ("token", "sentence"):
            raise ValueError(f"GLMObjective.make_batch: unknown mode {mode!r} (token, sentence, document)")
        if mode == "token" and self.all_words > 0 and rng.random() < self.all_words:
            return self._every_word_batch(windows, rng, pad_to)
        if mode == "token":  # the spans and Part-B orders of every window drawn together, then the tensors in one
            # pass (blank.infill_rows); the same distribution as make_sample's, other numbers from the rng
            rows = [np.asarray(w, dtype=np.int64) for w in windows]
            spans = self.sampler.sample_batch(rows, rng)
            orders = part_b_orders([len(s) for s in spans], self.shuffle, rng)
            out = infill_rows(rows, spans, orders, self._blank_id(mode), SOP_ID, EOP_ID, self.block_position, pad_to)
            return Batch(objective=mode, **out)
        # sentence level: the spans and Part-B order of each window, drawn from rng in the order that make_sample
        # draws them, then every window's tensors in one pass (blank.infill_rows)
        rows, spans, orders = [], [], []
        for w in windows:  # per window: the draws are sequential
            w = np.asarray(w, dtype=np.int64)
            s = check_spans(self._spans(w, mode, rng), len(w))
            rows.append(w)
            spans.append(s)
            orders.append(part_b_order(len(s), self.shuffle, rng))
        out = infill_rows(rows, spans, orders, self._blank_id(mode), SOP_ID, EOP_ID, self.block_position, pad_to)
        return Batch(objective=mode, **out)


    def _every_word_batch(self, windows: list[np.ndarray], rng: np.random.Generator, pad_to: int | None) -> Batch:
        """A token-level batch with every word of each window that the vocabulary holds a one-token blank
        (``WordSpanSampler.every_word``), Part B shuffled as GLM's, and Part A left whole: a blank of one token
        keeps Part A as long as its window, so each [MASK] goes back to its word. What a Part-B token must not read,
        its own word, is hidden from it by the model (``GLMConfig.hide_own_token``)."""
        rows = [np.asarray(w, dtype=np.int64) for w in windows]
        spans = self.sampler.every_word(rows)
        orders = part_b_orders([len(s) for s in spans], self.shuffle, rng)
        out = infill_rows(rows, spans, orders, self._blank_id("token"), SOP_ID, EOP_ID, self.block_position, pad_to)
        sizes = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
        if not np.array_equal(out["sep"], sizes):
            raise RuntimeError("GLMObjective: a one-token blank changed the length of Part A")
        part_a = np.arange(out["tokens"].shape[1]) < sizes[:, None]  # (B, T)
        out["tokens"][part_a] = np.concatenate(rows)  # row by row, in order: each window's own tokens
        return Batch(objective="token", **out)


def _plain_sample(tokens, targets, loss_mask, sep, objective, position_ids=None, block_position_ids=None) -> Sample:
    n = len(tokens)
    return Sample(
        tokens=np.asarray(tokens, dtype=np.int64),
        targets=np.asarray(targets, dtype=np.int64),
        loss_mask=np.asarray(loss_mask, dtype=np.float32),
        position_ids=np.arange(n, dtype=np.int64) if position_ids is None else position_ids,
        block_position_ids=np.zeros(n, dtype=np.int64) if block_position_ids is None else block_position_ids,
        sep=int(sep),
        objective=objective,
    )


@dataclass
class BertObjective:
    """BERT masked LM: choose 15 % of the ordinary tokens; 80 % -> [MASK], 10 % -> a random token, 10 % unchanged.

    Everything is bidirectional (sep = length), positions are 0..L-1, block ids 0, targets = the original tokens,
    and the loss counts only the chosen positions (no shift: the output at i predicts token i).
    """

    name: str = "bert"
    vocab_size: int = 0
    mask_ratio: float = 0.15
    stats: dict = field(default_factory=dict)

    def make_sample(self, w: np.ndarray, rng: np.random.Generator) -> Sample:
        w = np.asarray(w, dtype=np.int64)
        cand = np.flatnonzero(w >= N_SPECIAL)  # never [CLS] / <eos>
        k = max(1, int(round(self.mask_ratio * len(cand)))) if len(cand) else 0
        chosen = rng.choice(cand, size=k, replace=False) if k else np.zeros(0, dtype=np.int64)
        u = rng.random(k)
        tokens = w.copy()
        tokens[chosen[u < 0.8]] = MASK_ID
        rand_pos = chosen[(u >= 0.8) & (u < 0.9)]
        hi = max(self.vocab_size, N_SPECIAL + 1)
        tokens[rand_pos] = rng.integers(N_SPECIAL, hi, size=len(rand_pos))
        loss = np.zeros(len(w), dtype=np.float32)
        loss[chosen] = 1.0
        return _plain_sample(tokens, w, loss, len(w), "bert")

    def make_batch(self, windows, rng, mode=None, pad_to=None) -> Batch:
        return collate([self.make_sample(w, rng) for w in windows], objective="bert", pad_to=pad_to)


@dataclass
class GPTObjective:
    """Causal LM: input w[:-1], target w[1:], sep = 0 (pure causal mask), loss on every real token."""

    name: str = "gpt"
    vocab_size: int = 0
    stats: dict = field(default_factory=dict)

    def make_batch(self, windows, rng, mode=None, pad_to=None) -> Batch:
        samples = []
        for w in windows:
            w = np.asarray(w, dtype=np.int64)
            samples.append(_plain_sample(w[:-1], w[1:], np.ones(len(w) - 1), 0, "gpt"))
        return collate(samples, objective="gpt", pad_to=pad_to)


@dataclass
class PrefixLMObjective:
    """Prefix LM: a prefix of p tokens (p uniform in 1..L-2) is bidirectional (sep = p); the rest is predicted.

    Input w[:-1], target w[1:] as for GPT; the loss starts at index p-1, the last prefix token, whose output
    predicts w[p] (it sees only the prefix, so nothing leaks).
    """

    name: str = "prefix"
    vocab_size: int = 0
    stats: dict = field(default_factory=dict)

    def make_batch(self, windows, rng, mode=None, pad_to=None) -> Batch:
        samples = []
        for w in windows:
            w = np.asarray(w, dtype=np.int64)
            L = len(w)
            if L < 3:
                raise ValueError(f"PrefixLMObjective: windows need at least 3 tokens, got {L}")
            p = int(rng.integers(1, L - 1))
            loss = (np.arange(L - 1) >= p - 1).astype(np.float32)
            samples.append(_plain_sample(w[:-1], w[1:], loss, p, "prefix"))
        return collate(samples, objective="prefix", pad_to=pad_to)


@dataclass
class T5Objective:
    """T5 span corruption on GLM's Batch. Spans are chosen as GLM's token level (Poisson 3, 15 %).

    Our choice for a small vocabulary: one shared sentinel, [MASK], instead of T5's numbered <extra_id_k>; the k-th
    [MASK] of Part A is the k-th span of Part B, so order identifies it as the number does in T5.
    - Part A: each span collapsed to [MASK], positions 0..sep-1 (the encoder).
    - Part B: ONE decoder stream in text order, no shuffle: input  <sop> s1 [MASK] s2 ... [MASK] sn,
      target s1 [MASK] s2 ... [MASK] sn <eop> (T5's leading sentinel is dropped: it is always predictable).
    - T5 has separate encoder/decoder position encodings: Part B gets position 0 everywhere and its decoder
      positions 1..|B| in the block-position table, so it never reuses the encoder's positions.
    The loss counts sum(len + 1) tokens, as GLM's does on the same spans.
    """

    name: str = "t5"
    vocab_size: int = 0
    sampler: TokenSpanSampler = field(default_factory=TokenSpanSampler, repr=False)

    @property
    def stats(self) -> dict:
        return self.sampler.stats

    def make_batch(self, windows, rng, mode=None, pad_to=None) -> Batch:
        rows = [np.asarray(w, dtype=np.int64) for w in windows]
        spans = self.sampler.sample_batch(rows, rng)  # the whole batch's draws together
        out = infill_rows(rows, spans, [np.arange(len(s)) for s in spans], MASK_ID, pad_to=pad_to)  # GLM, text order
        col = np.arange(out["tokens"].shape[1])  # (T,)
        sep, end = out["sep"][:, None], out["lengths"][:, None]  # (B, 1)
        part_b = (col >= sep) & (col < end)  # (B, T)
        # GLM's Part B in text order is <sop> s1 <sop> s2 ... with targets s1 <eop> s2 <eop> ...: turn the inner
        # <sop> inputs and <eop> targets into the sentinel; the very first <sop> and the last <eop> stay.
        out["tokens"][part_b & (col > sep) & (out["tokens"] == SOP_ID)] = MASK_ID
        out["targets"][part_b & (col < end - 1) & (out["targets"] == EOP_ID)] = MASK_ID
        out["position_ids"][part_b] = 0  # the decoder's positions are its own: 1..|B| in the block row
        out["block_position_ids"] = np.where(part_b, col - sep + 1, 0)
        return Batch(objective="t5", **out)


Objective = GLMObjective | BertObjective | GPTObjective | PrefixLMObjective | T5Objective


def make_objective(name: str = "glm-base", tokenizer=None, **overrides) -> Objective:
    """Build an objective by name (see OBJECTIVE_NAMES); `overrides` set GLMObjective fields (e.g. shuffle=False).

    The tokenizer supplies the vocabulary size (BERT's random replacement) and the sentence-end table.
    """
    vocab_size = tokenizer.vocab_size if tokenizer is not None else 0
    if name in GLM_PRESETS:
        params = {**GLM_PRESETS[name], **overrides}
        allowed = {f.name for f in fields(GLMObjective)}
        unknown = set(params) - allowed
        if unknown:
            raise ValueError(f"make_objective: unknown GLMObjective fields {sorted(unknown)}; "
                             f"allowed {sorted(allowed)}")
        table = sentence_end_table(tokenizer) if tokenizer is not None else None
        if params.get("span_unit") in ("word", "known_word") and tokenizer is not None:
            params["word_edges"] = word_edge_tables(tokenizer)
        return GLMObjective(name=name, vocab_size=vocab_size, sentence_end=table, **params)
    cls = {"bert": BertObjective, "gpt": GPTObjective, "prefix": PrefixLMObjective, "t5": T5Objective}.get(name)
    if cls is None:
        raise ValueError(f"make_objective: unknown objective {name!r}; choose one of {OBJECTIVE_NAMES}")
    obj = cls(vocab_size=vocab_size)
    allowed = {f.name for f in fields(cls)} - {"name", "stats", "sampler"}
    if set(overrides) - allowed:
        raise ValueError(f"make_objective: {name!r} takes no fields {sorted(set(overrides) - allowed)}; "
                         f"allowed {sorted(allowed)}")
    return replace(obj, **overrides) if overrides else obj


__all__ = ["GLMObjective", "BertObjective", "GPTObjective", "PrefixLMObjective", "T5Objective", "make_objective",
           "GLM_PRESETS", "OBJECTIVE_NAMES", "CLS_ID", "EOS_ID"]
