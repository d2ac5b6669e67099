"""Worked solutions to the exercises of the minglm lessons (teachers: keep this folder away from students).

Every function here is a plain NumPy answer to one ``minglm.exercises.check_*`` checker; CI runs
``python -m minglm.exercises lessons/solutions/solutions.py`` (through tests/test_exercises.py) so a solution can
never silently go wrong. Each answer is written the way a student would derive it on paper, with the derivation in
the docstring, rather than by calling the library.
"""

from __future__ import annotations

import math
from collections import Counter

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


def most_frequent_pair(ids):
    """Count every adjacent pair (zip the list with itself shifted by one) and take the largest count; Counter
    keeps the pairs in the order they were first seen, and max keeps the first of equal counts."""
    counts = Counter(zip(ids[:-1], ids[1:]))
    return max(counts, key=counts.get)


def bpe_merge(ids, pair, new_id):
    """Walk left to right; where the pair starts, emit new_id and jump over both ids, so that 9 9 9 merges to
    (9 9) 9 and never reuses the middle 9."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == tuple(pair):
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


# --- lesson 3 -----------------------------------------------------------------------------------------------


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

# --- lesson 4 -----------------------------------------------------------------------------------------------


def attention(q, k, v, visible):
    """Scores q kᵀ/√D, -inf where the key is hidden, a softmax over the keys (after subtracting the row max, so
    nothing overflows), then the weighted sum of the values. Every row sees at least key 0 here, so no row is
    all -inf."""
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])  # (B, H, T, T)
    scores = np.where(visible, scores, -np.inf)
    p = np.exp(scores - scores.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return p @ v


def gelu(x):
    """GeLU(x) = x·Φ(x); the tanh form approximates Φ(x) by (1 + tanh(√(2/π)(x + 0.044715 x³)))/2."""
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


# --- lesson 5 -----------------------------------------------------------------------------------------------


def cross_entropy_backward(logits, targets, loss_mask):
    """loss = Σ_n m_n (logsumexp(z_n) − z_n[t_n]) / Σ m, so dz_n = (softmax(z_n) − onehot(t_n))·m_n / Σ m."""
    z = logits - logits.max(axis=-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=-1, keepdims=True)
    onehot = np.zeros_like(p)
    np.put_along_axis(onehot, targets[..., None], 1.0, axis=-1)
    return (p - onehot) * (loss_mask / loss_mask.sum())[..., None]


def parameter_count(config):
    """Word table V·C and two position tables (max_len + 1)·C; per layer two LayerNorms (2·2C), QKV (C·3C + 3C),
    the output projection (C·C + C) and the MLP (C·4C + 4C and 4C·C + C); the final LayerNorm 2C. The output head
    reuses the word table, so it adds nothing."""
    C, V, L = config.d_model, config.vocab_size, config.n_layer
    embeddings = V * C + 2 * (config.max_len + 1) * C
    layer = 2 * 2 * C + (3 * C * C + 3 * C) + (C * C + C) + (4 * C * C + 4 * C) + (4 * C * C + C)
    return embeddings + L * layer + 2 * C


# --- lesson 6 -----------------------------------------------------------------------------------------------


def lr_schedule(step, peak, warmup, total, min_ratio):
    """Warmup: peak·(step+1)/warmup, so step 0 already moves a little. Then a half cosine from the peak at
    step = warmup to min_ratio·peak at step = total, and flat after it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    low = peak * min_ratio
    return low + (peak - low) * 0.5 * (1.0 + math.cos(math.pi * progress))


def adamw_step(p, g, m, v, t, lr, beta1, beta2, eps, weight_decay):
    """Decay first (decoupled: the weights shrink by lr·wd, whatever the gradient), then the two running moments,
    then the step lr·m̂/(√v̂ + eps) with the bias corrections m̂ = m/(1−β1^t), v̂ = v/(1−β2^t)."""
    p = p * (1.0 - lr * weight_decay)
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    p = p - lr * (m / (1.0 - beta1**t)) / (np.sqrt(v / (1.0 - beta2**t)) + eps)
    return p, m, v


# --- lesson 7 -----------------------------------------------------------------------------------------------


def decode_positions(context_len, mask_positions, fill_lengths):
    """The context is read as Part A: positions 0..n−1, block 0. Each blank then feeds <sop> and its generated
    tokens (the end token is never fed), all at the blank's own position, with block ids 1, 2, ... restarting for
    every blank."""
    pos, block = list(range(context_len)), [0] * context_len
    for m, k in zip(mask_positions, fill_lengths):
        pos += [m] * (k + 1)
        block += list(range(1, k + 2))
    return np.array(pos), np.array(block)


def sampling_probs(logits, temperature, top_k):
    """Divide by the temperature, set every logit below the k-th largest to -inf (k = 0 keeps them all), softmax."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    if 0 < top_k < len(z):
        kth = np.sort(z)[-top_k]
        z = np.where(z < kth, -np.inf, z)
    e = np.exp(z - z.max())
    return e / e.sum()


# --- lesson 8 -----------------------------------------------------------------------------------------------


def bert_corrupt(tokens, chosen, u, random_ids):
    """u < 0.8: [MASK] (id 2); 0.8 <= u < 0.9: the next random id; otherwise the token stays (but is still a
    target). The random ids go to the chosen positions in their given order."""
    out = np.array(tokens, copy=True)
    chosen, u = np.asarray(chosen), np.asarray(u)
    out[chosen[u < 0.8]] = 2
    out[chosen[(u >= 0.8) & (u < 0.9)]] = random_ids
    return out


# --- lesson 9 -----------------------------------------------------------------------------------------------


def gmask_range(lengths, min_ratio):
    """The bound is drawn uniformly from int(min_ratio·shortest) (at least 1) to longest − 2: [CLS] and the
    closing token are never part of the span."""
    return max(1, int(min_ratio * min(lengths))), max(lengths) - 2


# --- lesson 10 ----------------------------------------------------------------------------------------------


def cloze_score(logp, length_penalty):
    """Σ log p over the k answer tokens and <eop>, divided by (k+1)^p: p = 0 is the plain sum (long answers pay
    for every token), p = 1 the mean."""
    return float(np.sum(logp) / len(logp) ** length_penalty)


# --- lesson 11 -----------------------------------------------------------------------------------------------


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


# --- lesson 12 ----------------------------------------------------------------------------------------------


def rope(x, positions, base):
    """Dims i and i + d/2 form a pair; the pair at position n turns by the angle n·θ_i, θ_i = base^(−2i/d):
    (a, b) -> (a cos − b sin, b cos + a sin)."""
    T, d = x.shape
    theta = base ** (-np.arange(0, d, 2) / d)  # (d/2,)
    angle = np.asarray(positions, dtype=np.float64)[:, None] * theta  # (T, d/2)
    a, b = x[:, : d // 2], x[:, d // 2 :]
    return np.concatenate([a * np.cos(angle) - b * np.sin(angle), b * np.cos(angle) + a * np.sin(angle)], axis=1)
