"""The exercise checkers (minglm/exercises.py): the worked solutions pass, typical wrong answers fail, and an
unfinished exercise reports "no answer yet" instead of crashing the notebook it sits in."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from minglm import exercises as ex

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = ROOT / "lessons" / "solutions" / "solutions.py"


@pytest.fixture(scope="module")
def sol():
    return ex.load_answers(SOLUTIONS)


# --- the solutions pass --------------------------------------------------------------------------------------


def test_every_checker_has_a_solution(sol):
    for name in ex.FUNCTION_CHECKERS:
        assert callable(getattr(sol, name, None)), f"lessons/solutions/solutions.py has no {name}()"
    for names in ex.VALUE_CHECKERS:
        for n in names:
            assert getattr(sol, n, None) is not None, f"lessons/solutions/solutions.py has no {n}"


@pytest.mark.parametrize("name", sorted(ex.FUNCTION_CHECKERS))
def test_solution_passes(sol, name, capsys):
    assert ex.FUNCTION_CHECKERS[name](getattr(sol, name)) is True
    out = capsys.readouterr().out
    assert out.rstrip().endswith("PASS"), out
    assert "approx: False" not in out


def test_span_count_solution_passes(sol, capsys):
    assert ex.check_span_count(sol.MEAN_SPAN_LENGTH, sol.SPANS_FOR_512) is True
    assert "PASS" in capsys.readouterr().out


def test_teacher_entry_point(capsys):
    assert ex.main([str(SOLUTIONS)]) == 0
    out = capsys.readouterr().out
    assert out.count("PASS  ") == len(ex.FUNCTION_CHECKERS) + len(ex.VALUE_CHECKERS)


def test_teacher_entry_point_fails_on_a_wrong_file(tmp_path, capsys):
    wrong = tmp_path / "answers.py"
    wrong.write_text("def mask_budget(n):\n    return round(0.15 * n)\n", encoding="utf-8")
    assert ex.main([str(wrong)]) == 1
    assert "FAIL  mask_budget" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no such file"):
        ex.load_answers(tmp_path / "missing.py")


# --- wrong answers fail ------------------------------------------------------------------------------------


def _softmax_forgot_the_sum(y, dy):
    return y * dy  # the diagonal of the Jacobian only


def _softmax_sum_over_wrong_axis(y, dy):
    return y * (dy - (dy * y).sum(axis=0, keepdims=True))


def _layernorm_without_var_path(dout, x, w, eps):
    mu = x.mean(axis=-1, keepdims=True)
    r = 1.0 / np.sqrt(((x - mu) ** 2).mean(axis=-1, keepdims=True) + eps)
    xhat = (x - mu) * r
    g = dout * w
    dx = r * (g - g.mean(axis=-1, keepdims=True))  # misses the x̂·mean(g·x̂) term
    return dx, (dout * xhat).sum(axis=(0, 1)), dout.sum(axis=(0, 1))


def _layernorm_dw_not_summed(dout, x, w, eps):
    dx, _, db = _solution("layernorm_backward")(dout, x, w, eps)
    mu = x.mean(axis=-1, keepdims=True)
    xhat = (x - mu) / np.sqrt(((x - mu) ** 2).mean(axis=-1, keepdims=True) + eps)
    return dx, dout * xhat, db  # shape (B, T, C) instead of (C,)


def _chain_rule_one_path_for_a(a, b, c, G):
    t = np.tanh(a * b + c)
    du = G * a * (1.0 - t * t)
    return du * b, du * a, du  # forgets that a is also the outer factor


def _ce_mean_over_all_tokens(logits, targets, loss_mask):
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    p = z / z.sum(axis=-1, keepdims=True)
    np.put_along_axis(p, targets[..., None], np.take_along_axis(p, targets[..., None], -1) - 1.0, axis=-1)
    return p * loss_mask[..., None] / loss_mask.size  # divides by every token, not the counted ones


def _mask_pure_causal(T, sep):
    return np.tril(np.ones((T, T), dtype=bool))


def _mask_part_a_sees_everything(T, sep):
    m = np.tril(np.ones((T, T), dtype=bool))
    m[:sep, :] = True  # Part A rows may peek at Part B, which holds the answers
    return m


def _mask_part_b_cut_off(T, sep):
    m = np.tril(np.ones((T, T), dtype=bool))
    m[:sep, :sep] = True
    m[sep:, :sep] = False  # Part B cannot see the context it must fill in
    return m


def _mask_off_by_one(T, sep):
    rows, cols = np.arange(T)[:, None], np.arange(T)[None, :]
    return (cols <= sep) | (cols <= rows)


def _positions_paper_one_based(length, spans, order):
    pos, block = _solution("positions")(length, spans, order)
    return pos + 1, block


def _positions_uncollapsed(length, spans, order):
    """Numbers Part A in the original text instead of the corrupted one (the blank keeps the span's start)."""
    lens = [e - s for s, e in spans]
    sep = length - sum(lens) + len(spans)
    pos, block = list(range(sep)), [0] * sep
    for k in order:
        pos += [spans[k][0]] * (lens[k] + 1)
        block += list(range(1, lens[k] + 2))
    return np.array(pos), np.array(block)


def _positions_block_from_zero(length, spans, order):
    pos, block = _solution("positions")(length, spans, order)
    return pos, np.where(block > 0, block - 1, 0)


def _decode_feeds_the_end_token(context_len, mask_positions, fill_lengths):
    pos, block = list(range(context_len)), [0] * context_len
    for m, k in zip(mask_positions, fill_lengths):
        pos += [m] * (k + 2)  # <sop>, the fill and the <eop>: the end token is never fed
        block += list(range(1, k + 3))
    return np.array(pos), np.array(block)


def _decode_positions_keep_counting(context_len, mask_positions, fill_lengths):
    pos, block = list(range(context_len)), [0] * context_len
    nxt = context_len
    for k in fill_lengths:
        pos += list(range(nxt, nxt + k + 1))  # GPT-style positions instead of the blank's own position
        block += list(range(1, k + 2))
        nxt += k + 1
    return np.array(pos), np.array(block)


def _decode_block_ids_never_restart(context_len, mask_positions, fill_lengths):
    pos, block = list(range(context_len)), [0] * context_len
    b = 1
    for m, k in zip(mask_positions, fill_lengths):
        pos += [m] * (k + 1)
        block += list(range(b, b + k + 1))
        b += k + 1
    return np.array(pos), np.array(block)


def _solution(name):
    return getattr(ex.load_answers(SOLUTIONS), name)


def _online_no_rescale(m, l, acc, s, v):
    """Adds the tile relative to the new max but never moves the old sums to it."""
    m_new = np.maximum(m, s.max(axis=1))
    p = np.exp(s - m_new[:, None])
    return m_new, l + p.sum(axis=1), acc + p @ v


def _online_rescales_only_l(m, l, acc, s, v):
    m_new = np.maximum(m, s.max(axis=1))
    alpha, p = np.exp(m - m_new), np.exp(s - m_new[:, None])
    return m_new, alpha * l + p.sum(axis=1), acc + p @ v  # the numerator keeps the old reference point


def _online_tile_max_only(m, l, acc, s, v):
    """Uses the tile's own max as the reference point and forgets the running one."""
    m_new = s.max(axis=1)
    alpha, p = np.exp(m - m_new), np.exp(s - m_new[:, None])
    return m_new, alpha * l + p.sum(axis=1), alpha[:, None] * acc + p @ v


WRONG = [
    ("chain_rule", _chain_rule_one_path_for_a),
    ("softmax_backward", _softmax_forgot_the_sum),
    ("softmax_backward", _softmax_sum_over_wrong_axis),
    ("layernorm_backward", _layernorm_without_var_path),
    ("layernorm_backward", _layernorm_dw_not_summed),
    ("cross_entropy_backward", _ce_mean_over_all_tokens),
    ("glm_mask", _mask_pure_causal),
    ("glm_mask", _mask_part_a_sees_everything),
    ("glm_mask", _mask_part_b_cut_off),
    ("glm_mask", _mask_off_by_one),
    ("positions", _positions_paper_one_based),
    ("positions", _positions_uncollapsed),
    ("positions", _positions_block_from_zero),
    ("decode_positions", _decode_feeds_the_end_token),
    ("decode_positions", _decode_positions_keep_counting),
    ("decode_positions", _decode_block_ids_never_restart),
    ("online_softmax_step", _online_no_rescale),
    ("online_softmax_step", _online_rescales_only_l),
    ("online_softmax_step", _online_tile_max_only),
    ("mask_budget", lambda n: math.ceil(0.15 * n)),
    ("mask_budget", lambda n: int(0.15 * (n - 2))),  # forgets that [CLS] and <eos> count
]


@pytest.mark.parametrize("name, wrong", WRONG, ids=[f"{n}-{getattr(w, '__name__', 'lambda')}" for n, w in WRONG])
def test_wrong_answer_fails(name, wrong, capsys):
    assert ex.FUNCTION_CHECKERS[name](wrong) is False
    out = capsys.readouterr().out
    assert out.rstrip().endswith("FAIL"), out


def test_wrong_span_count_fails(capsys):
    assert ex.check_span_count(3.0, 76 / 3.0) is False  # the untruncated Poisson mean
    assert ex.check_span_count(3.157, 0.15 * 512) is False  # counts tokens, not spans
    assert capsys.readouterr().out.count("FAIL") == 2


# --- unfinished exercises ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ex.FUNCTION_CHECKERS))
def test_unfinished_exercise_reports_and_does_not_raise(name, capsys):
    def returns_none(*args):
        return None

    def not_implemented(*args):
        raise NotImplementedError("derive it first")

    assert ex.FUNCTION_CHECKERS[name](returns_none) is False
    assert ex.FUNCTION_CHECKERS[name](not_implemented) is False
    out = capsys.readouterr().out
    assert out.count("no answer yet") == 2 and "derive it first" in out
    assert ex.check_span_count(None, None) is False


def test_a_real_bug_in_a_student_function_still_raises():
    def buggy(T, sep):
        return np.zeros((T, T))[T + 5]  # an IndexError is the student's to see, not to hide

    with pytest.raises(IndexError):
        ex.check_glm_mask(buggy)


# --- compare / check_grad ----------------------------------------------------------------------------------


def test_compare_verdicts(capsys):
    ref = np.array([1.0, 2.0, 3.0])
    v = ex.compare("same", ref.copy(), ref)
    assert v.exact and v.approx and v.maxdiff == 0.0
    v = ex.compare("close", ref + 1e-9, ref)
    assert not v.exact and v.approx and 0 < v.maxdiff < 1e-8
    v = ex.compare("far", ref + [0, 0.5, 0], ref)
    assert not v and v.maxdiff == pytest.approx(0.5) and "(1,)" in v.note
    v = ex.compare("shape", ref[:2], ref)
    assert not v and "wrong shape" in v.note
    v = ex.compare("nan", np.array([1.0, np.nan, 3.0]), ref)
    assert not v and "NaN" in v.note
    v = ex.compare("none", None, ref)
    assert not v and "no answer" in v.note
    out = capsys.readouterr().out
    assert "same           | exact: True  | approx: True  | maxdiff: 0" in out
    assert out.count("approx: False") == 4


def test_check_grad_reads_the_tensor_grad(capsys):
    from minglm import Tensor

    x = Tensor(np.array([1.0, -2.0, 0.5]), requires_grad=True)
    (x * x).sum().backward()
    assert ex.check_grad("dx", 2 * np.array([1.0, -2.0, 0.5]), x)
    assert not ex.check_grad("dx", np.array([1.0, -2.0, 0.5]), x)
    y = Tensor(np.array([1.0]), requires_grad=True)
    with pytest.raises(ValueError, match="no .grad"):
        ex.check_grad("dy", np.array([1.0]), y)
