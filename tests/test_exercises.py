"""The exercise checkers (minglm/exercises/): the worked solutions pass, typical wrong answers fail, an unfinished
exercise reports NOT DONE and a raising one ERROR instead of crashing the notebook it sits in, and the grader
(``python -m minglm.exercises``) reports every exercise in a table and exits non-zero on any failure."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from minglm import exercises as ex
from minglm.exercises.__main__ import main as grade_main

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
    result = ex.FUNCTION_CHECKERS[name](getattr(sol, name))
    assert bool(result) is True and result.status == "PASS"
    out = capsys.readouterr().out
    assert out.rstrip().endswith("PASS"), out
    assert "approx: False" not in out


def test_span_count_solution_passes(sol, capsys):
    assert ex.check_span_count(sol.MEAN_SPAN_LENGTH, sol.SPANS_FOR_512)
    assert "PASS" in capsys.readouterr().out


@pytest.mark.parametrize("spans", [24, 24.07, 24.6, 23.5])
def test_span_count_accepts_fair_estimates(sol, spans, capsys):
    """24 rounded, and a simulation's 24.6 (the last span overshoots), are fair answers."""
    assert ex.check_span_count(sol.MEAN_SPAN_LENGTH, spans)


def test_teacher_entry_point(capsys):
    assert grade_main([str(SOLUTIONS)]) == 0
    out = capsys.readouterr().out
    n = len(ex.FUNCTION_CHECKERS) + len(ex.VALUE_CHECKERS)
    assert f"{n} pass, 0 fail, 0 not done, 0 error of {n}" in out
    table = out[out.index("lesson  exercise"):]
    assert table.count("PASS") == n


def test_grader_goes_on_after_an_error_and_fails(tmp_path, capsys):
    answers = tmp_path / "answers.py"
    answers.write_text(
        "import numpy as np\n"
        "def glm_mask(T, sep):\n    return np.zeros((T, T))[T + 5]\n"  # raises IndexError
        "def mask_budget(n):\n    return round(0.15 * n)\n"  # wrong
        "def gelu(x):\n    return None\n"  # not done
        "def chain_rule(a, b, c, G):\n    raise ZeroDivisionError('oops')\n"
        "MEAN_SPAN_LENGTH = 'three'\nSPANS_FOR_512 = 24\n",  # not a number: the checker cannot run
        encoding="utf-8")
    assert grade_main([str(answers)]) == 1
    out = capsys.readouterr().out
    table = out[out.index("lesson  exercise"):]
    rows = {line.split()[1]: line.split()[2] for line in table.splitlines()[2:-2]}
    assert rows == {"chain_rule": "ERROR", "glm_mask": "ERROR", "mask_budget": "FAIL", "gelu": "NOT",
                    "MEAN_SPAN_LENGTH+SPANS_FOR_512": "ERROR"}, rows
    assert "ZeroDivisionError: oops" in table and "IndexError" in table
    assert "0 pass, 1 fail, 1 not done, 3 error of 5" in out
    assert "Traceback" not in out


def test_grader_usage_errors(tmp_path, capsys):
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n", encoding="utf-8")
    assert grade_main([str(empty)]) == 1
    broken = tmp_path / "broken.py"
    broken.write_text("def f(:\n", encoding="utf-8")
    assert grade_main([str(broken)]) == 2
    assert grade_main([str(tmp_path / "missing.py")]) == 2
    assert "does not import" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no such file"):
        ex.load_answers(tmp_path / "missing.py")


def test_grader_runs_as_a_module(tmp_path):
    """python -m minglm.exercises is the command a teacher types."""
    import subprocess
    import sys

    wrong = tmp_path / "answers.py"
    wrong.write_text("def mask_budget(n):\n    return round(0.15 * n)\n", encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "minglm.exercises", str(wrong)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "FAIL" in done.stdout and "mask_budget" in done.stdout


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


def _pair_last_seen(ids):
    from collections import Counter

    counts = Counter(zip(ids[:-1], ids[1:]))
    return max(reversed(list(counts)), key=counts.get)  # ties go to the pair seen last


def _merge_overlapping(ids, pair, new_id):
    out = list(ids)
    for i in range(len(ids) - 1):
        if (ids[i], ids[i + 1]) == tuple(pair):
            out[i] = new_id  # merges every occurrence, overlaps included, and keeps the right id too
    return out


def _attention_no_scale(q, k, v, visible):
    s = np.where(visible, q @ np.swapaxes(k, -1, -2), -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True) @ v


def _attention_mask_after_softmax(q, k, v, visible):
    s = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True) * visible  # zeroes hidden keys but never renormalises
    return p @ v


def _gelu_erf(x):
    from math import erf

    return np.array([0.5 * t * (1 + erf(t / np.sqrt(2))) for t in x])  # the exact GeLU, not GLM's tanh form


def _params_untied_head(config):
    return _solution("parameter_count")(config) + config.vocab_size * config.d_model


def _params_one_position_table(config):
    return _solution("parameter_count")(config) - (config.max_len + 1) * config.d_model


def _lr_warmup_from_zero(step, peak, warmup, total, min_ratio):
    if step < warmup:
        return peak * step / warmup
    return _solution("lr_schedule")(step, peak, warmup, total, min_ratio)


def _adam_coupled_decay(p, g, m, v, t, lr, b1, b2, eps, wd):
    return _solution("adamw_step")(p, g + wd * p, m, v, t, lr, b1, b2, eps, 0.0)  # L2 in the gradient: Adam, not AdamW


def _adam_no_bias_correction(p, g, m, v, t, lr, b1, b2, eps, wd):
    p = p * (1 - lr * wd)
    m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
    return p - lr * m / (np.sqrt(v) + eps), m, v


def _sampling_topk_after_softmax(logits, temperature, top_k):
    p = np.exp(logits / temperature - (logits / temperature).max())
    p /= p.sum()
    if top_k:
        p[np.argsort(p)[:-top_k]] = 0.0  # cut, but never renormalised
    return p


def _sampling_temperature_times(logits, temperature, top_k):
    return _solution("sampling_probs")(logits * temperature, 1.0, top_k)


def _bert_mask_everything(tokens, chosen, u, random_ids):
    out = np.array(tokens, copy=True)
    out[np.asarray(chosen)] = 2
    return out


def _gmask_forgets_the_frame(lengths, min_ratio):
    return max(1, int(min_ratio * min(lengths))), max(lengths)


def _cloze_mean_without_eop(logp, length_penalty):
    return float(np.sum(logp[:-1]) / (len(logp) - 1) ** length_penalty)


def _rope_adjacent_pairs(x, positions, base):
    T, d = x.shape
    angle = np.asarray(positions, dtype=np.float64)[:, None] * base ** (-np.arange(0, d, 2) / d)
    a, b = x[:, 0::2], x[:, 1::2]  # GPT-J's interleaved pairs, not the rotate-half layout
    out = np.empty_like(x)
    out[:, 0::2], out[:, 1::2] = a * np.cos(angle) - b * np.sin(angle), b * np.cos(angle) + a * np.sin(angle)
    return out


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
    ("most_frequent_pair", _pair_last_seen),
    ("bpe_merge", _merge_overlapping),
    ("attention", _attention_no_scale),
    ("attention", _attention_mask_after_softmax),
    ("gelu", _gelu_erf),
    ("parameter_count", _params_untied_head),
    ("parameter_count", _params_one_position_table),
    ("lr_schedule", _lr_warmup_from_zero),
    ("adamw_step", _adam_coupled_decay),
    ("adamw_step", _adam_no_bias_correction),
    ("sampling_probs", _sampling_topk_after_softmax),
    ("sampling_probs", _sampling_temperature_times),
    ("bert_corrupt", _bert_mask_everything),
    ("gmask_range", _gmask_forgets_the_frame),
    ("cloze_score", _cloze_mean_without_eop),
    ("rope", _rope_adjacent_pairs),
]


@pytest.mark.parametrize("name, wrong", WRONG, ids=[f"{n}-{getattr(w, '__name__', 'lambda')}" for n, w in WRONG])
def test_wrong_answer_fails(name, wrong, capsys):
    result = ex.FUNCTION_CHECKERS[name](wrong)
    assert not result and result.status == "FAIL", result
    out = capsys.readouterr().out
    assert out.rstrip().splitlines()[-1].startswith("FAIL"), out


def test_wrong_span_count_fails(capsys):
    assert not ex.check_span_count(3.0, 76 / 3.0)  # the untruncated Poisson mean
    assert not ex.check_span_count(3.157, 0.15 * 512)  # counts tokens, not spans
    assert not ex.check_span_count(3.157, 76 / 3.0)  # a right mean, then divided by the wrong one
    assert capsys.readouterr().out.count("FAIL") == 3


# --- unfinished exercises ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ex.FUNCTION_CHECKERS))
def test_unfinished_exercise_reports_and_does_not_raise(name, capsys):
    def returns_none(*args):
        return None

    def not_implemented(*args):
        raise NotImplementedError("derive it first")

    assert ex.FUNCTION_CHECKERS[name](returns_none).status == "NOT DONE"
    assert ex.FUNCTION_CHECKERS[name](not_implemented).status == "NOT DONE"
    out = capsys.readouterr().out
    assert out.count("NOT DONE (no answer yet") == 2 and "derive it first" in out
    assert ex.check_span_count(None, None).status == "NOT DONE"


def test_a_real_bug_in_a_student_function_is_an_error_not_a_crash(capsys):
    def buggy(T, sep):
        return np.zeros((T, T))[T + 5]  # an IndexError: reported with where it happened, and the notebook goes on

    result = ex.check_glm_mask(buggy)
    assert result.status == "ERROR" and "IndexError" in result.detail
    out = capsys.readouterr().out
    assert "ERROR (IndexError" in out and "in buggy" in out and "Traceback" not in out


def test_a_result_displays_as_nothing_in_a_notebook(capsys):
    """A checker cell shows its verdict lines only: the returned Result and Verdict add no repr under them."""
    result = ex.check_mask_budget(lambda n: int(0.15 * n))
    capsys.readouterr()
    result._ipython_display_()
    ex.compare("x", np.ones(2), np.ones(2))._ipython_display_()
    assert capsys.readouterr().out.count("\n") == 1  # the compare line itself, printed once
    quiet = ex.compare("y", np.ones(2), np.ones(2), quiet=True)
    quiet._ipython_display_()  # not printed yet, so displaying it prints it
    assert "y " in capsys.readouterr().out


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
