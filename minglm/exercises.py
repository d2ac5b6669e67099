"""Classroom exercises for the minglm lessons, each with an automatic checker that prints a clear verdict.

A student writes a function (a hand-derived backward, the GLM mask, the 2D positions of a span layout, ...) and
passes it to the matching ``check_*`` function. The checker draws fixed inputs from a seeded generator, runs the
student's function and the library's own answer on them, and prints one line per quantity in the style of
nn-zero-to-hero's backprop exercise:

    dx             | exact: False | approx: True  | maxdiff: 2.2e-16

followed by ``PASS`` or ``FAIL``. It returns True only when every quantity is close (``approx``). An unfinished
exercise (the function returns None or raises NotImplementedError) prints "no answer yet" instead of a traceback,
so a notebook with empty exercises still runs from top to bottom.

The reference answers come from the library itself (autograd through ``minglm.functional``, the mask of
``minglm.masks.glm_mask``, the sample builder ``minglm.data.blank.blank_infill``), so an exercise can never drift
from the code it teaches. Worked solutions live in ``lessons/solutions/``, out of the learner's path; CI checks that
they pass and that typical wrong answers fail.

Teachers: ``python -m minglm.exercises path/to/answers.py`` runs every checker whose function the file defines.

What this leaves out: grading, hints beyond the first mismatch, and exercises on parts of the library that the
lessons do not teach. References: docs/official-code.md §2.2 (the 15 % budget, the span lengths), §2.5 (positions)
and §4 (the loss), docs/mask.md, docs/decoding.md (positions while decoding); the online softmax of lesson 5 is
the recurrence in minglm/kernels/twin.py.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import minglm.functional as F
from minglm.data.blank import blank_infill
from minglm.data.samplers import truncated_poisson_pmf
from minglm.generate import Sampling, fill
from minglm.masks import glm_mask
from minglm.tensor import Tensor
from minglm.tokenizer import CharTokenizer

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


def _run(title: str, body) -> bool:
    """Run one exercise's comparisons and print the overall verdict; unfinished answers are reported, not raised."""
    print(f"== {title}")
    try:
        verdicts = body()
    except (_NoAnswer, NotImplementedError) as e:
        print(f"no answer yet: {e}" if str(e) else "no answer yet")
        print("FAIL")
        return False
    ok = all(bool(v) for v in verdicts)
    print("PASS" if ok else "FAIL")
    return ok


def _call(fn, *args):
    out = fn(*args)
    if out is None:
        raise _NoAnswer(f"{getattr(fn, '__name__', 'your function')} returned None")
    return out


def _unpack(out, n: int, what: str):
    if not isinstance(out, tuple | list) or len(out) != n:
        raise _NoAnswer(f"expected {n} results ({what}), got {type(out).__name__}")
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


def check_chain_rule(student_fn, seed: int = 0) -> bool:
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


def check_softmax_backward(student_fn, seed: int = 0) -> bool:
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


def check_layernorm_backward(student_fn, seed: int = 0, eps: float = 1e-5) -> bool:
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


def check_cross_entropy_backward(student_fn, seed: int = 0) -> bool:
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


def check_glm_mask(student_fn) -> bool:
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


def check_positions(student_fn) -> bool:
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


def check_mask_budget(student_fn) -> bool:
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


def check_span_count(mean_span_length: float | None, spans_for_512: float | None) -> bool:
    """Exercise: the mean span length of the truncated Poisson(3), and about how many spans a 512-token sample
    gets (its masking budget divided by the mean length)."""

    def body():
        if mean_span_length is None or spans_for_512 is None:
            raise _NoAnswer("fill in both numbers")
        mean = reference_mean_span_length()
        return [compare("mean length", mean_span_length, mean, atol=1e-3, rtol=0),
                compare("spans at 512", spans_for_512, reference_mask_budget(512) / mean, atol=0.05, rtol=0)]

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


def check_decode_positions(student_fn) -> bool:
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


def check_online_softmax_step(student_fn, seed: int = 0) -> bool:
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


# --- the teacher's entry point ----------------------------------------------------------------------------

# name a solutions/answers file defines -> the checker it goes to
FUNCTION_CHECKERS = {
    "chain_rule": check_chain_rule,
    "softmax_backward": check_softmax_backward,
    "layernorm_backward": check_layernorm_backward,
    "cross_entropy_backward": check_cross_entropy_backward,
    "glm_mask": check_glm_mask,
    "positions": check_positions,
    "mask_budget": check_mask_budget,
    "decode_positions": check_decode_positions,
    "online_softmax_step": check_online_softmax_step,
}
VALUE_CHECKERS = {("MEAN_SPAN_LENGTH", "SPANS_FOR_512"): check_span_count}


def check_all(namespace) -> dict[str, bool]:
    """Run every checker whose answer ``namespace`` (a module or dict) defines; returns name -> passed."""
    get = namespace.get if isinstance(namespace, dict) else (lambda k, d=None: getattr(namespace, k, d))
    results = {}
    for name, checker in FUNCTION_CHECKERS.items():
        fn = get(name)
        if fn is not None:
            results[name] = checker(fn)
    for names, checker in VALUE_CHECKERS.items():
        values = [get(n) for n in names]
        if any(v is not None for v in values):
            results["+".join(names)] = checker(*values)
    return results


def load_answers(path) -> object:
    """Import a Python file of answers as a module, without putting its folder on sys.path."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"load_answers: no such file {str(path)!r}")
    spec = importlib.util.spec_from_file_location(f"_minglm_answers_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m minglm.exercises ANSWERS.py", file=sys.stderr)
        return 2
    results = check_all(load_answers(argv[0]))
    if not results:
        print(f"{argv[0]} defines none of: {', '.join(FUNCTION_CHECKERS)}, MEAN_SPAN_LENGTH/SPANS_FOR_512")
        return 1
    print()
    for name, ok in results.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
