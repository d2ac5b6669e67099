"""Gradient checking: the reason anyone can trust minglm's gradients.

``gradcheck(fn, *inputs)`` compares the analytic gradient from ``backward()`` with float64 central differences,
element by element, for every input that requires a gradient. The output is contracted with a *random* upstream
gradient G, because ``fn(x).sum()`` would hide bugs that add a constant to every row (softmax is the classic case).

For each element x_i:  numeric_i = (⟨G, fn(x + ε e_i)⟩ − ⟨G, fn(x − ε e_i)⟩) / 2ε, compared with analytic_i.

Left out: second derivatives, and complex numbers.
"""

from __future__ import annotations

import numpy as np

from minglm import generate as G
from minglm.backend import get_xp, to_numpy
from minglm.tensor import Tensor, no_grad


class GradcheckError(AssertionError):
    """A gradient check failed; the message names the op, the input, the index and both values."""


def _outputs(result) -> list[Tensor]:
    if isinstance(result, Tensor):
        return [result]
    if isinstance(result, list | tuple):
        return [r for r in result if isinstance(r, Tensor)]
    raise TypeError(f"gradcheck: fn must return a Tensor or a list/tuple of Tensors, got {type(result).__name__}")


def gradcheck(fn, *inputs, eps: float = 1e-6, atol: float = 1e-6, rtol: float = 1e-5, seed: int = 0,
              name: str | None = None, upstream=None, factor: float = 1.0) -> bool:
    """Check ``fn``'s gradients w.r.t. every input with ``requires_grad`` by float64 central differences.

    ``inputs`` are Tensors (those with requires_grad must be float64) or other arguments passed through unchanged.
    ``upstream`` optionally fixes the upstream gradients (a list, one per output); by default they are drawn from a
    standard normal with ``seed``. Returns True, or raises GradcheckError with the first mismatch.
    ``factor``: the analytic gradient must equal factor × the numeric one. Only an op whose backward scales the
    gradient on purpose uses it (``F.grad_scale``, GLM-130B's embedding gradient shrink); everything else keeps 1.
    """
    op = name or getattr(fn, "__name__", "fn")
    checked = [i for i, x in enumerate(inputs) if isinstance(x, Tensor) and x.requires_grad]
    if not checked:
        raise ValueError(f"gradcheck({op}): no input requires a gradient")
    for i in checked:
        if inputs[i].dtype != np.float64:
            raise ValueError(f"gradcheck({op}): input {i} is {inputs[i].dtype}; gradient checks need float64")

    outs = _outputs(fn(*inputs))
    rng = np.random.default_rng(seed)
    if upstream is None:
        upstream = [rng.standard_normal(o.shape) for o in outs]
    xp = get_xp(outs[0].data)
    gs = [xp.asarray(np.asarray(g, dtype=np.float64)) for g in upstream]

    def objective() -> float:
        """⟨G, fn(inputs)⟩ as a Python float, without recording a graph."""
        with no_grad():
            res = _outputs(fn(*inputs))
        return float(sum(float((r.data.astype(np.float64) * g).sum()) for r, g in zip(res, gs)))

    for i in checked:
        inputs[i].grad = None
    total = None
    for o, g in zip(outs, gs):
        if not o.requires_grad:
            continue
        term = (o * Tensor._wrap(g.astype(o.dtype), False)).sum()
        total = term if total is None else total + term
    if total is None:
        raise GradcheckError(f"gradcheck({op}): no output depends on an input that requires a gradient")
    total.backward()

    for i in checked:
        x = inputs[i]
        analytic = to_numpy(x.grad) if x.grad is not None else np.zeros(x.shape)
        if analytic.shape != x.shape:
            raise GradcheckError(f"gradcheck({op}): input {i} gradient shape {analytic.shape} != {x.shape}")
        flat = x.data.reshape(-1)  # a view when contiguous; the tensor's data is restored after each probe
        if not x.data.flags.c_contiguous:
            x.data = x.data.copy()
            flat = x.data.reshape(-1)
        for j in range(flat.size):
            orig = float(flat[j])
            flat[j] = orig + eps
            f_plus = objective()
            flat[j] = orig - eps
            f_minus = objective()
            flat[j] = orig
            numeric = (f_plus - f_minus) / (2 * eps) * factor
            a = float(analytic.reshape(-1)[j])
            if not abs(a - numeric) <= atol + rtol * abs(numeric):
                index = np.unravel_index(j, x.shape)
                raise GradcheckError(
                    f"gradcheck({op}): input {i} (shape {x.shape}) at index {tuple(int(k) for k in index)}: "
                    f"analytic {a:.10g} vs numeric {numeric:.10g} (|diff| {abs(a - numeric):.3g})"
                )
    return True


def cached_and_recomputed(model, tokenizer, text: str, sampling, rng=None, kind: str = "fast"):
    """(FillResult, step logits (n, V), recomputed logits (n, V)) of ``fill`` on ``text``: every logit row the cached
    decoder ``kind`` produced, beside the same rows from one full forward over everything it was fed
    (``generate.recompute_logits``). The two must agree for any model a decoder claims to support."""
    logits = []

    def factory(m, capacity):
        dec = G.make_decoder(m, capacity, kind)
        step = dec.step
        dec.step = lambda *a: logits.append(step(*a)) or logits[-1]
        return dec

    r = G.fill(model, tokenizer, text, sampling, rng, decoder=factory)
    ref = G.recompute_logits(model, r.tokens, r.position_ids, r.block_position_ids, sep=r.context_len)
    return r, np.stack(logits), ref[r.context_len:]
