"""Worked solutions to the exercises of the minglm lessons (teachers: keep this folder away from students).

Every function here is a plain NumPy answer to one ``minglm.exercises.check_*`` checker; CI runs
``python -m minglm.exercises lessons/solutions/solutions.py`` (through tests/test_exercises.py) so a solution can
never silently go wrong. Each answer is written the way a student would derive it on paper, with the derivation in
the docstring, rather than by calling the library.
"""

from __future__ import annotations

import math

import numpy as np

# --- lesson 1 -----------------------------------------------------------------------------------------------


def chain_rule(a, b, c, G):
    """f = tanh(u)·a with u = a·b + c, L = Σ G·f.

    dL/df = G; df/du = a·(1 − tanh²u); du/da = b, du/db = a, du/dc = 1. a is used twice (in u and as the factor),
    so its two contributions add: dL/da = G·tanh(u) + G·a·(1 − tanh²u)·b.
    """
    t = np.tanh(a * b + c)
    du = G * a * (1.0 - t * t)
    da = G * t + du * b
    db = du * a
    dc = du
    return da, db, dc


def softmax_backward(y, dy):
    """dy_i/dx_j = y_i(δ_ij − y_j), so dx_j = Σ_i dy_i y_i (δ_ij − y_j) = y_j (dy_j − Σ_i dy_i y_i)."""
    return y * (dy - (dy * y).sum(axis=-1, keepdims=True))


def layernorm_backward(dout, x, w, eps):
    """x̂ = (x − μ)·r with r = 1/sqrt(var + eps); out = x̂·w + b. With g = dout·w (the gradient at x̂):

    dx = r·(g − mean(g) − x̂·mean(g·x̂)), because dx̂/dx removes the mean (the μ path) and the component
    along x̂ (the var path). dw and db sum over every position (B and T).
    """
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    r = 1.0 / np.sqrt(var + eps)
    xhat = (x - mu) * r
    g = dout * w
    dx = r * (g - g.mean(axis=-1, keepdims=True) - xhat * (g * xhat).mean(axis=-1, keepdims=True))
    dw = (dout * xhat).reshape(-1, x.shape[-1]).sum(axis=0)
    db = dout.reshape(-1, x.shape[-1]).sum(axis=0)
    return dx, dw, db


# --- lesson 2 -----------------------------------------------------------------------------------------------


def glm_mask(T, sep):
    """Part A (columns < sep) is visible to every row; everything else is causal (column <= row)."""
    rows = np.arange(T)[:, None]
    cols = np.arange(T)[None, :]
    return (cols < sep) | (cols <= rows)


def positions(length, spans, order):
    """Part A: each span collapses to one [MASK], and Part A is numbered 0..sep−1, so a span's blank sits at
    its start minus the tokens removed by the spans before it. Part B: each span in ``order`` is <sop> + its
    tokens, all at its blank's position, with block ids 1..len+1."""
    lens = [end - start for start, end in spans]
    removed_before = np.cumsum([0] + [n - 1 for n in lens[:-1]])
    blank_pos = [start - int(removed) for (start, _), removed in zip(spans, removed_before)]
    sep = length - sum(lens) + len(spans)
    pos, block = list(range(sep)), [0] * sep
    for k in order:
        pos += [blank_pos[k]] * (lens[k] + 1)
        block += list(range(1, lens[k] + 2))
    return np.array(pos), np.array(block)


def mask_budget(length):
    """At least 15 % of the sample, rounded down, counting [CLS] and <eos> (the official int(0.15 * len))."""
    return int(0.15 * length)


# E[k] for Poisson(3) without k = 0 is 3 / (1 − e^−3); cutting the tail at 39 changes nothing visible.
MEAN_SPAN_LENGTH = 3.0 / (1.0 - math.exp(-3.0))  # 3.157
SPANS_FOR_512 = int(0.15 * 512) / MEAN_SPAN_LENGTH  # 76 / 3.157 = about 24 spans

# --- lesson 3 -----------------------------------------------------------------------------------------------


def cross_entropy_backward(logits, targets, loss_mask):
    """loss = Σ_n m_n (logsumexp(z_n) − z_n[t_n]) / Σ m, so dz_n = (softmax(z_n) − onehot(t_n))·m_n / Σ m."""
    z = logits - logits.max(axis=-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=-1, keepdims=True)
    onehot = np.zeros_like(p)
    np.put_along_axis(onehot, targets[..., None], 1.0, axis=-1)
    return (p - onehot) * (loss_mask / loss_mask.sum())[..., None]


# --- lesson 4 -----------------------------------------------------------------------------------------------


def decode_positions(context_len, mask_positions, fill_lengths):
    """The context is read as Part A: positions 0..n−1, block 0. Each blank then feeds <sop> and its generated
    tokens (the end token is never fed), all at the blank's own position, with block ids 1, 2, ... restarting for
    every blank."""
    pos, block = list(range(context_len)), [0] * context_len
    for m, k in zip(mask_positions, fill_lengths):
        pos += [m] * (k + 1)
        block += list(range(1, k + 2))
    return np.array(pos), np.array(block)


# --- lesson 5 -----------------------------------------------------------------------------------------------


def online_softmax_step(m, l, acc, s, v):
    """Fold one key tile into the running (max, denominator, numerator) of each row.

    The new max is m' = max(m, max_j s_j). The old sums were taken relative to m, so they move to m' by the factor
    alpha = exp(m − m') (<= 1; exp(−inf) = 0 at the start, when l and acc are still 0). The tile adds its own
    terms relative to m': l' = alpha·l + Σ_j exp(s_j − m'), acc' = alpha·acc + exp(s − m') @ v.
    """
    m_new = np.maximum(m, s.max(axis=1))
    alpha = np.exp(m - m_new)
    p = np.exp(s - m_new[:, None])
    return m_new, alpha * l + p.sum(axis=1), alpha[:, None] * acc + p @ v
