"""Classroom exercises for the minglm lessons, each with an automatic checker that prints a clear verdict.

A student writes a function (a hand-derived backward, the GLM mask, one BPE merge, an AdamW step, ...) and passes it
to the matching ``check_*`` function. The checker draws fixed inputs from a seeded generator, runs the student's
function and the library's own answer on them, and prints one line per quantity in the style of nn-zero-to-hero's
backprop exercise:

    dx             | exact: False | approx: True  | maxdiff: 2.2e-16

followed by one verdict: ``PASS``, ``FAIL``, ``NOT DONE`` (the function returns None or raises
NotImplementedError, so a notebook with open exercises still runs from top to bottom) or ``ERROR`` (the student's
function raised: the exception's last line and where it was raised, never a traceback that stops the notebook). It
returns a ``Result`` that is true only for PASS and displays as nothing, so a checker cell shows only the verdict.

The reference answers come from the library itself wherever one exists (autograd through ``minglm.functional``, the
mask of ``minglm.masks.glm_mask``, ``blank_infill``, ``BPETokenizer``, ``AdamW``, ``sampling_probs``,
``BertObjective``, ``draw_gmask_bound``), so an exercise can never drift from the code it teaches. Worked solutions
live in ``lessons/solutions/``, out of the learner's path; CI checks that they pass and that typical wrong answers
fail. Teachers grade a file of answers with ``python -m minglm.exercises answers.py`` (minglm/exercises/__main__.py).

What this leaves out: hints beyond the first mismatch, and exercises on parts of the library that the lessons do not
teach. References: docs/official-code.md §2.2 (the 15 % budget, the span lengths), §2.4 (the [gMASK] length), §2.5
(positions), §4 (the loss and the optimiser) and §5 (cloze scoring), docs/mask.md, docs/decoding.md (positions while
decoding); the online softmax is the recurrence in minglm/kernels/twin.py.
"""

from __future__ import annotations

import importlib.util
import math
import traceback
import types
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import minglm.functional as F
from minglm.data.blank import blank_infill
from minglm.data.objectives import BertObjective
from minglm.data.samplers import draw_gmask_bound, truncated_poisson_pmf
from minglm.generate import Sampling, fill, sampling_probs
from minglm.masks import glm_mask
from minglm.model import GLM, GLMConfig
from minglm.optim import AdamW, lr_at
from minglm.tensor import Tensor
from minglm.tokenizer import N_SPECIAL, BPETokenizer, CharTokenizer

# --- comparing one answer with its reference -------------------------------------------------------------------


@dataclass
class Verdict:
    """The result of comparing one student array with its reference. ``bool(verdict)`` is ``approx``."""

    name: str
    exact: bool
    approx: bool
    maxdiff: float
    note: str = ""

    def __bool__(self) -> bool:
        return self.approx

    printed: bool = field(default=False, repr=False)  # compare() printed it already

    def _ipython_display_(self) -> None:  # a notebook shows the printed line once, not a repr under it
        if not self.printed:
            print(self)

    def __str__(self) -> str:
        line = f"{self.name:<14} | exact: {self.exact!s:<5} | approx: {self.approx!s:<5} | maxdiff: {self.maxdiff:.3g}"
        return f"{line}   {self.note}" if self.note else line


class _NoAnswer(Exception):
    """Raised inside a checker when the student's function has nothing to check yet."""


def _as_numpy(x):
    if isinstance(x, Tensor):
        return x.numpy()
    return np.asarray(x)


def compare(name: str, student, reference, atol: float = 1e-6, rtol: float = 1e-5, quiet: bool = False) -> Verdict:
    """Compare ``student`` with ``reference`` (arrays, Tensors or numbers) and print one verdict line.

    exact: every element equal; approx: |student - reference| <= atol + rtol·|reference| everywhere;
    maxdiff: the largest absolute difference. A shape mismatch or a missing answer is never approx.
    """
    ref = _as_numpy(reference)
    if student is None:
        v = Verdict(name, False, False, math.inf, "no answer yet (the function returned None)")
    else:
        stu = _as_numpy(student)
        if stu.shape != ref.shape:
            v = Verdict(name, False, False, math.inf, f"wrong shape {stu.shape}, expected {ref.shape}")
        elif ref.dtype == bool or stu.dtype == bool:
            same = stu.astype(bool) == ref.astype(bool)
            v = Verdict(name, bool(same.all()), bool(same.all()), 0.0 if same.all() else 1.0, "")
            if not same.all():
                where = tuple(int(i) for i in np.argwhere(~same)[0])
                v.note = f"{int((~same).sum())} of {same.size} entries differ, first at {where}"
        else:
            stu64, ref64 = stu.astype(np.float64), ref.astype(np.float64)
            diff = np.abs(stu64 - ref64)
            maxdiff = float(diff.max()) if diff.size else 0.0
            finite = bool(np.isfinite(stu64).all())
            approx = finite and bool(np.all(diff <= atol + rtol * np.abs(ref64)))
            note = "" if finite else "contains NaN or inf"
            if finite and not approx:
                where = tuple(int(i) for i in np.unravel_index(int(np.argmax(diff)), diff.shape))
                note = f"largest error at {where}: yours {stu64[where]:.6g}, expected {ref64[where]:.6g}"
            v = Verdict(name, bool(np.array_equal(stu64, ref64)), approx, maxdiff if finite else math.inf, note)
    if not quiet:
        print(v)
        v.printed = True
    return v


def check_grad(name: str, student_grad, reference, atol: float = 1e-6, rtol: float = 1e-5) -> Verdict:
    """nn-zero-to-hero's ``cmp``: compare a gradient you derived with the reference one.

    ``reference`` is an array, or a Tensor whose ``.grad`` (filled by ``backward()``) is the reference.
    """
    if isinstance(reference, Tensor):
        if reference.grad is None:
            raise ValueError(f"check_grad({name!r}): the reference tensor has no .grad; call backward() first")
        reference = reference.grad
    return compare(name, student_grad, reference, atol=atol, rtol=rtol)


class Result:
    """What a checker returns: its status and a one-line detail. ``bool(result)`` is True only for PASS.

    Statuses: ``PASS``, ``FAIL`` (an answer that disagrees), ``NOT DONE`` (the function returns None or raises
    NotImplementedError: the exercise is still open) and ``ERROR`` (the student's function raised). The checker has
    already printed its verdict, so in a notebook the result displays as nothing: a checker cell shows only the lines
    the checker printed (``_ipython_display_``).
    """

    STATUSES = ("PASS", "FAIL", "NOT DONE", "ERROR")

    def __init__(self, status: str, detail: str = ""):
        if status not in self.STATUSES:
            raise ValueError(f"Result: status must be one of {self.STATUSES}, got {status!r}")
        self.status, self.detail = status, detail

    def __bool__(self) -> bool:
        return self.status == "PASS"

    def __repr__(self) -> str:
        return f"Result({self.status!r}, {self.detail!r})"

    def _ipython_display_(self) -> None:  # the verdict is printed already; show nothing more
        pass


class _BadAnswer(Exception):
    """Raised inside a checker when the student's answer has the wrong form (a FAIL, with this message)."""


def _student_frames(exc: BaseException) -> list[str]:
    """'file:line in function' for the traceback frames outside this module (the student's own code)."""
    here = Path(__file__).resolve()
    frames = traceback.extract_tb(exc.__traceback__)
    return [f"{Path(f.filename).name}:{f.lineno} in {f.name}" for f in frames if Path(f.filename).resolve() != here]


def _run(title: str, body) -> Result:
    """Run one exercise's comparisons and print its verdict. An unfinished answer prints NOT DONE, a student
    function that raises prints ERROR with the exception's last line and where it was raised; neither stops a
    notebook or the grader."""
    print(f"== {title}")
    try:
        verdicts = body()
    except (_NoAnswer, NotImplementedError) as e:
        detail = f"no answer yet: {e}" if str(e) else "no answer yet"
        print(f"NOT DONE ({detail})")
        return Result("NOT DONE", detail)
    except _BadAnswer as e:
        print(f"FAIL ({e})")
        return Result("FAIL", str(e))
    except Exception as e:  # noqa: BLE001 - any error in a student's function is reported, not raised
        last = traceback.format_exception_only(type(e), e)[-1].strip()
        where = _student_frames(e)
        print(f"ERROR ({last})" + (f"\n  raised at {where[-1]}" if where else ""))
        return Result("ERROR", last)
    failed = [v for v in verdicts if not bool(v)]
    if failed:
        print("FAIL")
        return Result("FAIL", f"{len(failed)} of {len(verdicts)} checks differ, first: {failed[0].name.strip()}")
    print("PASS")
    return Result("PASS", f"{len(verdicts)}/{len(verdicts)} checks agree")


def _call(fn, *args):
    out = fn(*args)
    if out is None:
        raise _NoAnswer(f"{getattr(fn, '__name__', 'your function')} returned None")
    return out


def _unpack(out, n: int, what: str):
    if not isinstance(out, tuple | list) or len(out) != n:
        raise _BadAnswer(f"expected {n} results ({what}), got {type(out).__name__}")
    return out


def _compare_positions(student_fn, reference, cases, describe: str) -> list[Verdict]:
    """For each case (the arguments of both functions): print ``describe``, then compare the student's
    (position_ids, block_position_ids) with the reference's, exactly."""
    verdicts = []
    for i, case in enumerate(cases):
        print(describe.format(i, *case))
        got = _unpack(_call(student_fn, *case), 2, "position_ids, block_position_ids")
        pos, block = reference(*case)
        verdicts.append(compare("  position", got[0], pos, atol=0, rtol=0))
        verdicts.append(compare("  block", got[1], block, atol=0, rtol=0))
    return verdicts


# --- lesson 1: the chain rule, softmax and layer norm by hand -------------------------------------------------


def chain_rule_reference(a, b, c, G):
    """The reference for ``check_chain_rule``: autograd gradients of L = Σ G ⊙ tanh(a·b + c)·a, float64."""
    ta, tb, tc = (Tensor(np.array(v, dtype=np.float64), requires_grad=True) for v in (a, b, c))
    out = (ta * tb + tc).tanh() * ta
    (out * Tensor(G)).sum().backward()
    return ta.grad, tb.grad, tc.grad


def check_chain_rule(student_fn, seed: int = 0) -> Result:
    """Exercise: f = tanh(a·b + c)·a elementwise, and L = Σ G ⊙ f for an upstream gradient G.

    ``student_fn(a, b, c, G) -> (da, db, dc)``: the gradients of L, derived by hand with the chain rule.
    """

    def body():
        rng = np.random.default_rng(seed)
        a, b, c, G = (rng.standard_normal((3, 4)) for _ in range(4))
        da, db, dc = chain_rule_reference(a, b, c, G)
        got = _unpack(_call(student_fn, a, b, c, G), 3, "da, db, dc")
        return [check_grad(n, g, r) for n, g, r in zip(("da", "db", "dc"), got, (da, db, dc))]

    return _run("chain rule: f = tanh(a*b + c) * a", body)


def check_softmax_backward(student_fn, seed: int = 0) -> Result:
    """Exercise: y = softmax(x) over the last axis. ``student_fn(y, dy) -> dx``, using only y and dy.

    A random upstream gradient dy is used on purpose: with dy = 1 everywhere, the right answer is exactly 0, and so
    is a whole family of wrong ones.
    """

    def body():
        rng = np.random.default_rng(seed)
        x = Tensor(rng.standard_normal((2, 3, 5)), requires_grad=True)
        dy = rng.standard_normal((2, 3, 5))
        y = F.softmax(x, axis=-1)
        y.backward(dy)
        dx = _call(student_fn, y.numpy().copy(), dy.copy())
        return [check_grad("dx", dx, x)]

    return _run("softmax backward", body)


def check_layernorm_backward(student_fn, seed: int = 0, eps: float = 1e-5) -> Result:
    """Exercise: out = (x − mean)/sqrt(var + eps)·w + b over the last axis (C), for x (B, T, C).

    ``student_fn(dout, x, w, eps) -> (dx, dw, db)`` with the shapes of x, w and b.
    """

    def body():
        rng = np.random.default_rng(seed)
        x = Tensor(rng.standard_normal((2, 3, 6)) * 2.0 + 0.5, requires_grad=True)
        w = Tensor(rng.standard_normal(6), requires_grad=True)
        b = Tensor(rng.standard_normal(6), requires_grad=True)
        dout = rng.standard_normal((2, 3, 6))
        F.layer_norm(x, w, b, eps=eps).backward(dout)
        got = _unpack(_call(student_fn, dout.copy(), x.numpy().copy(), w.numpy().copy(), eps), 3, "dx, dw, db")
        return [check_grad(n, g, r) for n, g, r in zip(("dx", "dw", "db"), got, (x, w, b))]

    return _run("layer norm backward", body)


# --- lesson 3: the loss -------------------------------------------------------------------------------------


def check_cross_entropy_backward(student_fn, seed: int = 0) -> Result:
    """Exercise: GLM's loss = Σ m·(−log softmax(z)[t]) / Σ m over every token of the batch (docs/official-code.md §4).

    ``student_fn(logits (B, T, V), targets (B, T) int, loss_mask (B, T)) -> dlogits (B, T, V)``.
    """

    def body():
        rng = np.random.default_rng(seed)
        B, T, V = 2, 5, 7
        logits = Tensor(rng.standard_normal((B, T, V)) * 2.0, requires_grad=True)
        targets = rng.integers(0, V, size=(B, T))
        mask = (rng.random((B, T)) < 0.6).astype(np.float64)
        mask[0, 0] = 1.0  # at least one token counts
        F.cross_entropy(logits, targets, mask).backward()
        got = _call(student_fn, logits.numpy().copy(), targets.copy(), mask.copy())
        return [check_grad("dlogits", got, logits)]

    return _run("cross-entropy backward (masked mean)", body)


# --- lesson 2: the mask, the positions and the span budget -------------------------------------------------


def reference_glm_mask(T: int, sep: int) -> np.ndarray:
    """(T, T) bool, True = query row i may attend to key column j: j < sep or j <= i (docs/mask.md)."""
    return glm_mask(np, sep, T)[0, 0]


def check_glm_mask(student_fn) -> Result:
    """Exercise: ``student_fn(T, sep) -> (T, T) bool`` (or 0/1) array, True where query i may attend to key j."""
    cases = [(10, 5), (12, 7), (6, 0), (6, 6), (1, 1)]  # Figure 2, the [CLS] framing, pure causal, all Part A

    def body():
        verdicts = []
        for T, sep in cases:
            got = _call(student_fn, T, sep)
            verdicts.append(compare(f"T={T} sep={sep}", np.asarray(got).astype(bool), reference_glm_mask(T, sep)))
        return verdicts

    return _run("the GLM attention mask from sep", body)


def reference_positions(length: int, spans, order) -> tuple[np.ndarray, np.ndarray]:
    """The two position rows of a text of ``length`` tokens with ``spans`` blanked and Part B in ``order``."""
    tokens = np.arange(length, dtype=np.int64) + 8  # any ordinary ids: the positions do not depend on them
    sample = blank_infill(tokens, spans, order=order)
    return sample.position_ids, sample.block_position_ids


POSITION_CASES = [
    (6, [(2, 3), (4, 6)], [1, 0]),  # Figure 2 without [CLS] (docs/figure2.md §2)
    (8, [(3, 4), (5, 7)], [1, 0]),  # the same with [CLS] ... <eos> (docs/figure2.md §3)
    (12, [(1, 3), (4, 5), (7, 11)], [2, 0, 1]),
    (9, [(0, 4)], [0]),
]


def check_positions(student_fn) -> Result:
    """Exercise: the 2D positions of a blank-infilling sample, official 0-based convention (docs/official-code.md §2.5).

    ``student_fn(length, spans, order) -> (position_ids, block_position_ids)``: ``length`` tokens, half-open
    ``spans`` (start, end) in text order, and ``order``, the Part-B order as indices into ``spans``.
    """

    return _run("2D positions of a span layout", lambda: _compare_positions(
        student_fn, reference_positions, POSITION_CASES, "case {}: length {}, spans {}, Part-B order {}"))


def reference_mask_budget(length: int, ratio: float = 0.15) -> int:
    """Tokens the token-level objective blanks at least: int(0.15 · len), len counting [CLS] and <eos>
    (docs/official-code.md §2.2)."""
    return int(ratio * length)


def check_mask_budget(student_fn) -> Result:
    """Exercise: ``student_fn(length) -> int``, the number of tokens to blank in a sample of ``length`` tokens."""
    lengths = [7, 20, 64, 100, 128, 513]

    def body():
        return [compare(f"length={n}", np.asarray(_call(student_fn, n)), np.asarray(reference_mask_budget(n)),
                        atol=0, rtol=0) for n in lengths]

    return _run("the 15 % masking budget", body)


def reference_mean_span_length(lam: float = 3.0, max_span_len: int = 39) -> float:
    """E[length] of Poisson(lam) truncated to 1..max_span_len: about lam / (1 − e^−lam) = 3.157 for lam = 3."""
    pmf = truncated_poisson_pmf(lam, max_span_len)
    return float((np.arange(1, max_span_len + 1) * pmf).sum())


def check_span_count(mean_span_length: float | None, spans_for_512: float | None) -> Result:
    """Exercise: the mean span length of the truncated Poisson(3), and about how many spans a 512-token sample
    gets (its masking budget divided by the mean length, 76 / 3.157 = 24.1).

    The second number is an estimate, so it gets a tolerance of one span: 24 (rounded) and a simulation's 24.6 (the
    last span overshoots the budget, which adds about half a span) both pass; 25.3 (76 / 3, the Poisson mean without
    the cut at 0) and 76.8 (tokens, not spans) do not.
    """

    def body():
        if mean_span_length is None or spans_for_512 is None:
            raise _NoAnswer("fill in both numbers")
        mean = reference_mean_span_length()
        return [compare("mean length", mean_span_length, mean, atol=1e-3, rtol=0),
                compare("spans at 512", spans_for_512, reference_mask_budget(512) / mean, atol=1.0, rtol=0)]

    return _run("how many spans make 15 %", body)


# --- lesson 4: decoding ------------------------------------------------------------------------------------


class _ScriptedDecoder:
    """A stand-in for the model inside ``generate.fill``: blank b emits ``lengths[b]`` ordinary tokens, then <eop>."""

    def __init__(self, lengths_at: dict[int, int], token_id: int, eop_id: int, vocab_size: int):
        self.lengths_at, self.token_id, self.eop_id, self.V = lengths_at, token_id, eop_id, vocab_size

    def prefill(self, ids):
        return np.zeros(self.V)

    def step(self, token: int, pos: int, block: int):
        logits = np.zeros(self.V)
        logits[self.token_id if block - 1 < self.lengths_at[pos] else self.eop_id] = 1.0
        return logits


def reference_decode_positions(context_len: int, mask_positions, fill_lengths) -> tuple[np.ndarray, np.ndarray]:
    """The two position rows of everything the model sees while ``generate.fill`` fills the blanks at
    ``mask_positions`` (context indices, ascending) with ``fill_lengths`` tokens each (docs/decoding.md)."""
    if len(mask_positions) != len(fill_lengths) or not 0 < min(mask_positions) <= max(mask_positions) < context_len - 1:
        raise ValueError(f"reference_decode_positions: bad layout {context_len}, {mask_positions}, {fill_lengths}")
    tok = CharTokenizer.from_texts(["a"])
    text = "".join("[MASK]" if i in set(mask_positions) else "a" for i in range(1, context_len - 1))
    lengths_at = dict(zip(mask_positions, fill_lengths))
    script = _ScriptedDecoder(lengths_at, tok.encode("a")[0], tok.eop_id, tok.vocab_size)
    model = types.SimpleNamespace(config=types.SimpleNamespace(max_len=10_000), training=False, eval=lambda: None)
    result = fill(model, tok, text, Sampling(greedy=True, max_new_tokens=max(fill_lengths) + 1),
                  decoder=lambda _model, _capacity: script, n_top=0)
    return np.asarray(result.position_ids), np.asarray(result.block_position_ids)


DECODE_CASES = [
    (12, [3], [4]),
    (20, [2, 9], [3, 1]),
    (16, [4, 10, 13], [2, 0, 5]),  # the middle blank is closed at once: only its <sop> is fed
]


def check_decode_positions(student_fn) -> Result:
    """Exercise: ``student_fn(context_len, mask_positions, fill_lengths) -> (position_ids, block_position_ids)``
    of every token the model reads while filling the blanks: the context, then for each blank its <sop> and its
    generated tokens (the closing <eop> is never fed back)."""

    return _run("positions while decoding", lambda: _compare_positions(
        student_fn, reference_decode_positions, DECODE_CASES, "case {}: context of {} tokens, blanks at {}, "
        "fills of {} tokens"))


# --- lesson 5: the online softmax ---------------------------------------------------------------------------


def reference_online_state(s_seen, v_seen) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The running statistics after the keys seen so far, computed directly (not by recurrence):
    m = row max of the scores, l = Σ exp(s − m), acc = exp(s − m) @ v. Shapes (n,), (n,), (n, D)."""
    m = s_seen.max(axis=1)
    p = np.exp(s_seen - m[:, None])
    return m, p.sum(axis=1), p @ v_seen


def check_online_softmax_step(student_fn, seed: int = 0) -> Result:
    """Exercise: ``student_fn(m, l, acc, s, v) -> (m, l, acc)`` folds one key tile into the running statistics of
    the online softmax (minglm/kernels/twin.py): ``s`` (n, k) the tile's scores (``-inf`` where masked), ``v`` (k, D)
    its values; ``m`` (n,), ``l`` (n,), ``acc`` (n, D) the state before the tile (``-inf``, 0, 0 at the start).
    The checker feeds the tiles of a few rows one by one, compares the state after every tile with the direct
    computation, and at the end ``acc / l`` with softmax(s) @ v from ``minglm.functional``."""

    def body():
        rng = np.random.default_rng(seed)
        n, D, tiles = 3, 4, (5, 3, 6, 2)
        s = rng.standard_normal((n, sum(tiles))) * 3.0
        s[:, 5:8] += 8.0  # the second tile raises every row's max: the old sums must be rescaled
        s[1, 9:12] = -np.inf  # masked keys inside a tile
        v = rng.standard_normal((sum(tiles), D))
        m, l, acc = np.full(n, -np.inf), np.zeros(n), np.zeros((n, D))
        verdicts, start = [], 0
        for t, size in enumerate(tiles):
            stop = start + size
            out = _unpack(_call(student_fn, m.copy(), l.copy(), acc.copy(), s[:, start:stop], v[start:stop]), 3,
                          "m, l, acc")
            m, l, acc = (np.asarray(x, dtype=np.float64) for x in out)
            ref = reference_online_state(s[:, :stop], v[:stop])
            for name, got, want in zip(("m", "l", "acc"), (m, l, acc), ref):
                verdicts.append(compare(f"tile {t}: {name}", got, want, atol=1e-9, rtol=1e-9))
            start = stop
        probs = F.softmax(Tensor(s), axis=-1).numpy()
        verdicts.append(compare("acc / l", acc / l[:, None], probs @ v, atol=1e-9, rtol=1e-9))
        return verdicts

    return _run("online softmax, one tile at a time", body)


# --- lesson 2: byte-level BPE --------------------------------------------------------------------------------


def reference_most_frequent_pair(ids) -> tuple[int, int]:
    """The adjacent pair that occurs most often in ``ids`` (overlaps counted, ties to the pair seen first)."""
    counts = Counter(zip(list(ids)[:-1], list(ids)[1:]))
    return max(counts, key=lambda pair: counts[pair])  # max keeps the first of equal counts (insertion order)


def check_most_frequent_pair(student_fn) -> Result:
    """Exercise: ``student_fn(ids) -> (a, b)``, the adjacent pair of ids that occurs most often in the list."""
    cases = [[8, 9, 8, 9, 10], [1, 2, 3, 1, 2, 3, 3, 1, 2], list(b"to be or not to be that is the question")]

    def body():
        verdicts = []
        for ids in cases:
            got = _call(student_fn, list(ids))
            if not isinstance(got, tuple | list) or len(got) != 2:
                raise _BadAnswer(f"return a pair (a, b), got {got!r}")
            verdicts.append(compare(f"{len(ids)} ids", np.asarray(got), np.asarray(reference_most_frequent_pair(ids)),
                                    atol=0, rtol=0))
        return verdicts

    return _run("the most frequent pair", body)


BPE_TEXT = "the theatre, the thee, and thou that thinkest thou art there; other others bathe in the sea"


def check_bpe_merge(student_fn) -> Result:
    """Exercise: ``student_fn(ids, pair, new_id) -> list``: every occurrence of ``pair`` in ``ids``, left to right
    and without overlaps, replaced by ``new_id``. The checker trains a small ``BPETokenizer``, applies its merges
    one after another with your function to the bytes of a few words, and compares with the tokenizer's encoding."""

    def body():
        tok = BPETokenizer.train([BPE_TEXT] * 3, vocab_size=N_SPECIAL + 256 + 24)
        verdicts = []
        for word in (" the", " theatre", " thinkest", " others", " bathe"):
            ids = [b + N_SPECIAL for b in word.encode("utf-8")]
            for k, pair in enumerate(tok.merges):
                ids = _call(student_fn, list(ids), tuple(pair), N_SPECIAL + 256 + k)
                ids = [int(i) for i in ids]
            verdicts.append(compare(repr(word), np.asarray(ids), np.asarray(tok.encode(word)), atol=0, rtol=0))
        aaa = _call(student_fn, [9, 9, 9, 9, 9], (9, 9), 300)
        verdicts.append(compare("9 9 9 9 9", np.asarray(aaa), np.asarray([300, 300, 9]), atol=0, rtol=0))
        return verdicts

    return _run("one BPE merge", body)


# --- lesson 4: attention and the transformer block -------------------------------------------------------------


def check_attention(student_fn, seed: int = 0) -> Result:
    """Exercise: ``student_fn(q, k, v, visible) -> out``: softmax(q kᵀ / √D, hidden keys at -inf) v for q, k, v
    of shape (B, H, T, D) and ``visible`` (T, T) bool (True = query row i may attend to key column j)."""

    def body():
        rng = np.random.default_rng(seed)
        verdicts = []
        for T, sep in ((6, 3), (9, 0), (5, 5)):
            q, k, v = (rng.standard_normal((2, 3, T, 4)) for _ in range(3))
            visible = reference_glm_mask(T, sep)
            ref = F.scaled_dot_product_attention(Tensor(q), Tensor(k), Tensor(v), mask=visible[None, None],
                                                 impl="plain")
            got = _call(student_fn, q.copy(), k.copy(), v.copy(), visible.copy())
            verdicts.append(compare(f"T={T} sep={sep}", got, ref, atol=1e-9, rtol=1e-7))
        return verdicts

    return _run("masked scaled dot-product attention", body)


def check_gelu(student_fn) -> Result:
    """Exercise: ``student_fn(x) -> y``, GeLU with the tanh approximation that GPT-2 and GLM use."""

    def body():
        x = np.linspace(-6.0, 6.0, 49)
        return [compare("gelu(x)", _call(student_fn, x.copy()), F.gelu(Tensor(x)), atol=1e-9, rtol=1e-7)]

    return _run("the tanh GeLU", body)


# --- lesson 5: the model -------------------------------------------------------------------------------------


def check_parameter_count(student_fn) -> Result:
    """Exercise: ``student_fn(config) -> int``, the parameters of ``GLM(config)`` counted from the config alone."""

    configs = [GLMConfig(vocab_size=80, n_layer=2, n_head=4, d_model=64, max_len=65),
               GLMConfig(vocab_size=300, n_layer=3, n_head=2, d_model=32, max_len=128)]

    def body():
        return [compare(f"L={c.n_layer} C={c.d_model}", np.asarray(_call(student_fn, c)),
                        np.asarray(GLM(c, np.random.default_rng(0)).num_parameters()), atol=0, rtol=0)
                for c in configs]

    return _run("parameters of a GLM", body)


# --- lesson 6: the optimizer and the schedule ----------------------------------------------------------------


def check_lr_schedule(student_fn) -> Result:
    """Exercise: ``student_fn(step, peak, warmup, total, min_ratio) -> lr``: linear warmup, then cosine to
    ``min_ratio · peak`` (``minglm.optim.lr_at``; steps are 0-based)."""
    cases = [(3e-3, 10, 100, 0.1), (1.0, 0, 50, 0.0), (2e-3, 20, 60, 0.5)]

    def body():
        verdicts = []
        for peak, warmup, total, ratio in cases:
            steps = range(0, total + 10)
            got = [_call(student_fn, s, peak, warmup, total, ratio) for s in steps]
            ref = [lr_at(s, peak, warmup, total, ratio) for s in steps]
            verdicts.append(compare(f"warmup {warmup}", np.asarray(got, dtype=np.float64), np.asarray(ref),
                                    atol=1e-12, rtol=1e-9))
        return verdicts

    return _run("warmup and cosine", body)


def check_adamw_step(student_fn, seed: int = 0) -> Result:
    """Exercise: ``student_fn(p, g, m, v, t, lr, beta1, beta2, eps, weight_decay) -> (p, m, v)``: one AdamW update
    of a weight matrix (decoupled decay, then Adam with bias correction; ``t`` counts updates from 1). The checker
    runs three steps beside ``minglm.optim.AdamW`` on the same gradients."""

    def body():
        rng = np.random.default_rng(seed)
        w = Tensor(rng.standard_normal((3, 4)).astype(np.float32), requires_grad=True)
        lr, b1, b2, eps, wd = 0.05, 0.9, 0.95, 1e-8, 0.1
        opt = AdamW([("w", w)], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
        p, m, v = w.numpy().astype(np.float64), np.zeros((3, 4)), np.zeros((3, 4))
        verdicts = []
        for t in range(1, 4):
            g = rng.standard_normal((3, 4)).astype(np.float32)
            w.grad = g.copy()
            opt.step(lr)
            p, m, v = (np.asarray(a, dtype=np.float64) for a in _unpack(
                _call(student_fn, p.copy(), g.astype(np.float64), m.copy(), v.copy(), t, lr, b1, b2, eps, wd),
                3, "p, m, v"))
            verdicts.append(compare(f"step {t}: p", p, w.numpy(), atol=1e-5, rtol=1e-5))
        return verdicts

    return _run("one AdamW step", body)


# --- lesson 7: sampling --------------------------------------------------------------------------------------


def check_sampling_probs(student_fn, seed: int = 0) -> Result:
    """Exercise: ``student_fn(logits, temperature, top_k) -> probs``: divide by the temperature, keep the top_k
    largest logits (0 = all), softmax (``minglm.generate.sampling_probs``)."""

    def body():
        rng = np.random.default_rng(seed)
        logits = rng.standard_normal(12) * 3.0
        verdicts = []
        for temperature, top_k in ((1.0, 0), (0.5, 3), (2.0, 5), (1.0, 1)):
            ref = sampling_probs(logits, Sampling(temperature=temperature, top_k=top_k))
            got = _call(student_fn, logits.copy(), temperature, top_k)
            verdicts.append(compare(f"T={temperature} k={top_k}", got, ref, atol=1e-9, rtol=1e-7))
        return verdicts

    return _run("temperature and top-k", body)


# --- lesson 8: BERT's corruption -----------------------------------------------------------------------------


def check_bert_corrupt(student_fn, seed: int = 0) -> Result:
    """Exercise: ``student_fn(tokens, chosen, u, random_ids) -> corrupted tokens``: BERT's 80/10/10 rule. ``chosen``
    are the positions picked for the loss, ``u`` one uniform number per chosen position: below 0.8 the token becomes
    [MASK], from 0.8 to 0.9 the next id of ``random_ids`` (in the order of ``chosen``), otherwise it stays.
    The reference is ``minglm.data.BertObjective`` drawing the same numbers from the same seed."""

    def body():
        verdicts = []
        for case in range(3):
            w = np.concatenate([[1], np.random.default_rng(seed + case).integers(N_SPECIAL, 40, size=30), [0]])
            obj = BertObjective(vocab_size=40)
            ref = obj.make_sample(w, np.random.default_rng(100 + case)).tokens
            rng = np.random.default_rng(100 + case)  # the same draws, in BertObjective's order
            cand = np.flatnonzero(w >= N_SPECIAL)
            k = max(1, int(round(obj.mask_ratio * len(cand))))
            chosen = rng.choice(cand, size=k, replace=False)
            u = rng.random(k)
            random_ids = rng.integers(N_SPECIAL, 40, size=int(((u >= 0.8) & (u < 0.9)).sum()))
            got = _call(student_fn, w.copy(), chosen.copy(), u.copy(), random_ids.copy())
            verdicts.append(compare(f"sample {case}", np.asarray(got), ref, atol=0, rtol=0))
        return verdicts

    return _run("BERT's 80/10/10 corruption", body)


# --- lesson 9: the [gMASK] length ----------------------------------------------------------------------------


class _Ends:
    """A stand-in generator whose ``integers(lo, hi)`` returns lo or hi - 1: the two ends of a uniform draw."""

    def __init__(self, top: bool):
        self.top = top

    def integers(self, lo, hi):
        return hi - 1 if self.top else lo


def check_gmask_range(student_fn) -> Result:
    """Exercise: ``student_fn(lengths, min_ratio) -> (lo, hi)``: the smallest and largest [gMASK] span length a
    document-level batch of samples with these ``lengths`` can draw (``minglm.data.draw_gmask_bound``)."""
    cases = [([64, 64, 64], 0.5), ([100, 80, 120], 0.5), ([66, 70], 0.25), ([12, 40], 0.0)]

    def body():
        verdicts = []
        for lengths, ratio in cases:
            ref = [draw_gmask_bound(lengths, _Ends(top), ratio) for top in (False, True)]
            got = _unpack(_call(student_fn, list(lengths), ratio), 2, "lo, hi")
            verdicts.append(compare(f"{lengths} x{ratio}", np.asarray(got), np.asarray(ref), atol=0, rtol=0))
        return verdicts

    return _run("how long a [gMASK] span can be", body)


# --- lesson 10: scoring a cloze answer -----------------------------------------------------------------------


def check_cloze_score(student_fn, seed: int = 0) -> Result:
    """Exercise: ``student_fn(logp, length_penalty) -> score``: a candidate answer a₁…a_k is scored by the
    log-probabilities ``logp`` of its k+1 targets (a₁ … a_k and <eop>) as Σ logp / (k+1)^length_penalty
    (``minglm.finetune.multi_token_scores``)."""

    def body():
        rng = np.random.default_rng(seed)
        verdicts = []
        for n, penalty in ((4, 0.0), (7, 1.0), (2, 0.5)):
            logp = np.log(rng.uniform(0.05, 0.9, size=n))
            ref = logp.sum() / n**penalty
            verdicts.append(compare(f"{n} targets, p={penalty}", np.asarray(_call(student_fn, logp.copy(), penalty),
                                                                              dtype=np.float64), ref, atol=1e-9))
        return verdicts

    return _run("the score of a multi-token answer", body)


# --- lesson 12: rotary positions -----------------------------------------------------------------------------


def check_rope(student_fn, seed: int = 0) -> Result:
    """Exercise: ``student_fn(x, positions, base) -> rotated``: x (T, d), positions (T,) ints. Pair dim i with dim
    i + d/2 and turn each pair by the angle position·base^(−2i/d) (the rotate-half layout of
    ``minglm.functional.rope``)."""

    def body():
        rng = np.random.default_rng(seed)
        verdicts = []
        for T, d, base in ((5, 8, 10000.0), (7, 4, 100.0)):
            x = rng.standard_normal((T, d))
            positions = rng.integers(0, 50, size=T)
            cos, sin = F.rotary_tables([positions[None]], d, dtype=np.float64, base=base)
            ref = F.rope_array(x[None, None], cos, sin)[0, 0]
            got = _call(student_fn, x.copy(), positions.copy(), base)
            verdicts.append(compare(f"T={T} d={d}", got, ref, atol=1e-9, rtol=1e-7))
        return verdicts

    return _run("rotary position embedding", body)


# --- the grader ----------------------------------------------------------------------------------------------

# name an answers file defines -> (lesson, checker)
FUNCTION_CHECKERS = {
    "chain_rule": check_chain_rule,
    "softmax_backward": check_softmax_backward,
    "layernorm_backward": check_layernorm_backward,
    "most_frequent_pair": check_most_frequent_pair,
    "bpe_merge": check_bpe_merge,
    "glm_mask": check_glm_mask,
    "positions": check_positions,
    "mask_budget": check_mask_budget,
    "attention": check_attention,
    "gelu": check_gelu,
    "cross_entropy_backward": check_cross_entropy_backward,
    "parameter_count": check_parameter_count,
    "lr_schedule": check_lr_schedule,
    "adamw_step": check_adamw_step,
    "decode_positions": check_decode_positions,
    "sampling_probs": check_sampling_probs,
    "bert_corrupt": check_bert_corrupt,
    "gmask_range": check_gmask_range,
    "cloze_score": check_cloze_score,
    "online_softmax_step": check_online_softmax_step,
    "rope": check_rope,
}
VALUE_CHECKERS = {("MEAN_SPAN_LENGTH", "SPANS_FOR_512"): check_span_count}
LESSON_OF = {
    "chain_rule": 1, "softmax_backward": 1, "layernorm_backward": 1, "most_frequent_pair": 2, "bpe_merge": 2,
    "glm_mask": 3, "positions": 3, "mask_budget": 3, "MEAN_SPAN_LENGTH+SPANS_FOR_512": 3, "attention": 4, "gelu": 4,
    "cross_entropy_backward": 5, "parameter_count": 5, "lr_schedule": 6, "adamw_step": 6, "decode_positions": 7,
    "sampling_probs": 7, "bert_corrupt": 8, "gmask_range": 9, "cloze_score": 10, "online_softmax_step": 11, "rope": 12,
}


def check_all(namespace) -> dict[str, Result]:
    """Run every checker whose answer ``namespace`` (a module or dict) defines; returns name -> Result, in lesson
    order. A checker never raises here: a function that raises is an ERROR and grading goes on."""
    get = namespace.get if isinstance(namespace, dict) else (lambda k, d=None: getattr(namespace, k, d))
    results = {}
    for name, checker in FUNCTION_CHECKERS.items():
        fn = get(name)
        if fn is not None:
            results[name] = _guarded(checker, fn)
    for names, checker in VALUE_CHECKERS.items():
        values = [get(n) for n in names]
        if any(v is not None for v in values):
            results["+".join(names)] = _guarded(checker, *values)
    return dict(sorted(results.items(), key=lambda item: LESSON_OF.get(item[0], 99)))


def _guarded(checker, *args) -> Result:
    """A checker's result, or ERROR when the checker itself could not run (say, a value that is not a number)."""
    try:
        return checker(*args)
    except Exception as e:  # noqa: BLE001 - the grader reports and goes on
        last = traceback.format_exception_only(type(e), e)[-1].strip()
        print(f"ERROR ({last})")
        return Result("ERROR", last)


def load_answers(path) -> object:
    """Import a Python file of answers as a module, without putting its folder on sys.path."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"load_answers: no such file {str(path)!r}")
    spec = importlib.util.spec_from_file_location(f"_minglm_answers_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def summary_table(results: dict[str, Result]) -> str:
    """One line per graded exercise (lesson, name, status, detail) and a count of each status."""
    width = max([len(n) for n in results] + [8])
    lines = [f"{'lesson':>6}  {'exercise':<{width}}  {'status':<8}  detail", "-" * (width + 40)]
    for name, r in results.items():
        lines.append(f"{LESSON_OF.get(name, '?'):>6}  {name:<{width}}  {r.status:<8}  {r.detail}")
    counts = Counter(r.status for r in results.values())
    lines.append("-" * (width + 40))
    lines.append(", ".join(f"{counts.get(s, 0)} {s.lower()}" for s in Result.STATUSES) + f" of {len(results)}")
    return "\n".join(lines)
