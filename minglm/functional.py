"""Neural-network ops for minglm: ``import minglm.functional as F``.

Each op is one ``Function`` with a hand-derived backward. Where the fused backward is the lesson (layer norm,
softmax, cross-entropy, attention) the derivation is in the docstring, in the spirit of llm.c's ``doc/layernorm``.
Shapes use the glossary B = batch, T = time (sequence), C = channels, V = vocabulary, H = heads, D = head size.

Everything keeps the input's dtype: a float32 graph never meets a float64 array (Python floats are used for
constants, which NumPy 2 does not let upcast an array).

The op behind a layer of ``minglm.nn`` is named ``<Layer>Op`` (``LinearOp``, ``LayerNormOp``, ``EmbeddingOp``,
``DropoutOp``), so a traceback or a graph never confuses the op with the layer. The arithmetic of the ops a model
runs at inference (``gelu_tanh_into``, ``layer_norm_rows``, ``softmax_array``, ``rope_array``, ``geglu_array``) is
also callable on plain arrays: each layer's ``infer`` uses the same function as its op's ``forward``.

Reference: docs/mask.md (the mask of ``scaled_dot_product_attention``), docs/official-code.md §3 (tanh GeLU) and
§4 (the loss).
"""

from __future__ import annotations

import math

import numpy as np

from minglm import kernels, parallel
from minglm.backend import get_xp, is_cupy, scatter_add_rows, to_device
from minglm.masks import glm_mask
from minglm.tensor import Function, Tensor

# --- activations ----------------------------------------------------------------------------------------------


class ReLU(Function):
    @staticmethod
    def forward(ctx, x):
        ctx.pos = x > 0
        return x * ctx.pos

    @staticmethod
    def backward(ctx, grad):
        return (grad * ctx.pos,)


def relu(x: Tensor) -> Tensor:
    return ReLU.apply(x)


_GELU_C = math.sqrt(2.0 / math.pi)  # 0.79788456...


# erf: NumPy has none. float64 uses the rational approximations of fdlibm's s_erf.c (Sun Microsystems, 1993; the
# one most C libraries and Go's math.Erf descend from), accurate to about 1 ulp; float32 (the training path) uses
# the branch-free erfc of Numerical Recipes §6.2 (one exp, |error| < 1.2e-7 in exact arithmetic, under 4e-7 in
# float32), about 6x faster than the masked float64 regions. Both are tested against math.erf.
_ERX = 8.45062911510467529297e-01  # erf(1) rounded to float precision: [0.84375, 1.25) approximates erf(x) − erx
_ERF_PP = (1.28379167095512558561e-01, -3.25042107247001499370e-01, -2.84817495755985104766e-02,
           -5.77027029648944159157e-03, -2.37630166566501626084e-05)  # |x| < 0.84375: erf = x + x·P(x²)/Q(x²)
_ERF_QQ = (1.0, 3.97917223959155352819e-01, 6.50222499887672944485e-02, 5.08130628187576562776e-03,
           1.32494738004321644526e-04, -3.96022827877536812320e-06)
_ERF_PA = (-2.36211856075265944077e-03, 4.14856118683748331666e-01, -3.72207876035701323847e-01,
           3.18346619901161753674e-01, -1.10894694282396677476e-01, 3.54783043256182359371e-02,
           -2.16637559486879084300e-03)  # 0.84375 <= |x| < 1.25: erf = erx + P(s)/Q(s), s = |x| − 1
_ERF_QA = (1.0, 1.06420880400844228286e-01, 5.40397917702171048937e-01, 7.18286544141962662868e-02,
           1.26171219808761642112e-01, 1.36370839120290507362e-02, 1.19844998467991074170e-02)
_ERF_RA = (-9.86494403484714822705e-03, -6.93858572707181764372e-01, -1.05586262253232909814e+01,
           -6.23753324503260060396e+01, -1.62396669462573470355e+02, -1.84605092906711035994e+02,
           -8.12874355063065934246e+01, -9.81432934416914548592e+00)  # 1.25 <= |x| < 1/0.35: erfc, s = 1/x²
_ERF_SA = (1.0, 1.96512716674392571292e+01, 1.37657754143519042600e+02, 4.34565877475229228821e+02,
           6.45387271733267880336e+02, 4.29008140027567833386e+02, 1.08635005541779435134e+02,
           6.57024977031928170135e+00, -6.04244152148580987438e-02)
_ERF_RB = (-9.86494292470009928597e-03, -7.99283237680523006574e-01, -1.77579549177547519889e+01,
           -1.60636384855821916062e+02, -6.37566443368389627722e+02, -1.02509513161107724954e+03,
           -4.83519191608651397019e+02)  # |x| >= 1/0.35: erfc, s = 1/x² (erf is 1 from |x| = 6 on)
_ERF_SB = (1.0, 3.03380607434824582924e+01, 3.25792512996573918826e+02, 1.53672958608443695994e+03,
           3.19985821950859553908e+03, 2.55305040643316442583e+03, 4.74528541206955367215e+02,
           -2.24409524465858183362e+01)
_ERFC_NR = (-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806, 0.27886807, -1.13520398, 1.48851587,
            -0.82215223, 0.17087277)  # erfc(a) = t·exp(−a² + Σ c_i tⁱ), t = 1/(1 + a/2)


def _horner(coeffs, s):
    """c0 + c1·s + c2·s² + ... by Horner's rule, in s's dtype."""
    xp = get_xp(s)
    out = xp.full_like(s, coeffs[-1])
    for c in coeffs[-2::-1]:
        out *= s
        out += c
    return out


def _erf(x):
    """erf(x) elementwise, in x's dtype for float32 and float64 (see the coefficient tables above)."""
    xp = get_xp(x)
    if x.dtype != np.float64:  # float32 (and float16): the branch-free form, computed in float32
        a = xp.abs(x).astype(np.float32)
        t = 1.0 / (1.0 + 0.5 * a)
        p = _horner(_ERFC_NR, t)
        p -= a * a
        xp.exp(p, out=p)
        p *= t  # erfc(|x|)
        return xp.copysign(1.0 - p, x.astype(np.float32)).astype(x.dtype, copy=False)
    a = xp.abs(x)
    out = xp.empty_like(a)
    flat, af = out.reshape(-1), a.reshape(-1)
    near_one = (a >= 0.84375) & (a < 1.25)
    for region, mask in enumerate((a < 0.84375, near_one, (a >= 1.25) & (a < 1 / 0.35), ~(a < 1 / 0.35))):
        idx = xp.flatnonzero(mask)  # the last mask is "not below": NaN lands there and stays NaN
        if idx.size == 0:
            continue
        t = af[idx]
        if region == 0:
            z = t * t
            flat[idx] = t + t * (_horner(_ERF_PP, z) / _horner(_ERF_QQ, z))
        elif region == 1:
            s = t - 1.0
            flat[idx] = _ERX + _horner(_ERF_PA, s) / _horner(_ERF_QA, s)
        else:
            t = xp.minimum(t, 6.0)
            s = 1.0 / (t * t)
            r = _horner(_ERF_RA, s) / _horner(_ERF_SA, s) if region == 2 else _horner(_ERF_RB, s) / _horner(_ERF_SB, s)
            # exp(−t²) split as exp(−z² − 0.5625)·exp((z − t)(z + t) + r/s) with z = t cut to its top 32 bits, so
            # that z² is exact (fdlibm's trick against the rounding error of t² for large t)
            z = (t.view(np.uint64) & np.uint64(0xFFFFFFFF00000000)).view(np.float64)
            flat[idx] = 1.0 - xp.exp(-z * z - 0.5625) * xp.exp((z - t) * (z + t) + r) / t
    return xp.copysign(out, x)


def gelu_tanh_plain(x):
    """GLM's GeLU as the formula reads (docs/official-code.md §3): 0.5·x·(1 + tanh(c·(x + 0.044715·x³))), c = √(2/π).

    The plain path: ``GeLUTanh`` computes the same numbers in place and on every core, and is tested against this."""
    xp = get_xp(x)
    return 0.5 * x * (1.0 + xp.tanh(_GELU_C * (x + 0.044715 * x * x * x)))


def gelu_tanh_into(x, x2, t, out) -> None:
    """``gelu_tanh_plain`` of the array x written into out, with no temporaries: x2 = x² and t = tanh(u) are left in
    their buffers for the backward. ``GeLUTanh`` runs it on pieces of a large array (``parallel.map_rows``),
    ``gelu_tanh_array`` (inference) on a whole small one."""
    xp = get_xp(x)
    xp.multiply(x, x, out=x2)
    xp.multiply(x2, 0.044715, out=t)  # u = c·(x + 0.044715·x³), built in t's buffer
    t *= x
    t += x
    t *= _GELU_C
    xp.tanh(t, out=t)
    xp.add(t, 1.0, out=out)
    out *= x
    out *= 0.5


def gelu_tanh_backward_into(x, x2, t, grad, out) -> None:
    """out = grad ⊙ GeLU'(x), in place, from the x² and t = tanh(u) the forward left behind:
    GeLU'(x) = 0.5·(1 + t) + 0.5·x·(1 − t²)·c·(1 + 3·0.044715·x²)."""
    xp = get_xp(x)
    xp.multiply(x2, 3 * 0.044715, out=out)
    out += 1.0
    out *= x
    out *= 0.5 * _GELU_C
    out *= 1.0 - t * t
    out += 0.5 * (1.0 + t)
    out *= grad


def gelu_tanh_array(x):
    """GeLU of a plain array, no graph (decoding: ``nn`` layers' ``infer``). Nothing is kept for a backward, so x²
    is built in the output's buffer."""
    xp = get_xp(x)
    out = xp.empty_like(x)
    gelu_tanh_into(x, out, xp.empty_like(x), out)
    return out


class GeLUTanh(Function):
    """GLM's GeLU, ``gelu_tanh_plain``, in place (``gelu_tanh_into`` / ``gelu_tanh_backward_into``) on the flat array,
    in cache-sized pieces spread over the CPU cores (``parallel.map_rows``)."""

    @staticmethod
    def forward(ctx, x):
        xp = get_xp(x)
        xf = x.reshape(-1)  # flat: a view of a contiguous x
        x2, t, out = xp.empty_like(xf), xp.empty_like(xf), xp.empty_like(xf)
        parallel.map_rows(gelu_tanh_into, xf, x2, t, out)
        ctx.x, ctx.x2, ctx.t = xf, x2, t
        return out.reshape(x.shape)

    @staticmethod
    def backward(ctx, grad):
        xp = get_xp(grad)
        d = xp.empty_like(ctx.x)
        parallel.map_rows(gelu_tanh_backward_into, ctx.x, ctx.x2, ctx.t, grad.reshape(-1), d)
        return (d.reshape(grad.shape),)


class GeLUExact(Function):
    """The exact GeLU x·Φ(x), Φ the standard normal CDF; d/dx = Φ(x) + x·φ(x)."""

    @staticmethod
    def forward(ctx, x):
        cdf = (0.5 * (1.0 + _erf(x * (1.0 / math.sqrt(2.0))))).astype(x.dtype)
        ctx.x, ctx.cdf = x, cdf
        return x * cdf

    @staticmethod
    def backward(ctx, grad):
        xp = get_xp(grad)
        x = ctx.x
        pdf = xp.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
        return (grad * (ctx.cdf + x * pdf),)


def gelu(x: Tensor, approximate: str = "tanh") -> Tensor:
    """GeLU; ``approximate="tanh"`` is GLM's (and GPT-2's) form, ``"none"`` the exact erf one."""
    if approximate == "tanh":
        return GeLUTanh.apply(x)
    if approximate == "none":
        return GeLUExact.apply(x)
    raise ValueError(f"gelu: approximate must be 'tanh' or 'none', got {approximate!r}")


class Sigmoid(Function):
    @staticmethod
    def forward(ctx, x):
        xp = get_xp(x)
        # 1/(1+e^-x) for x >= 0 and e^x/(1+e^x) for x < 0: neither form overflows on its side.
        e = xp.exp(-xp.abs(x))
        ctx.out = xp.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(x.dtype, copy=False)
        return ctx.out

    @staticmethod
    def backward(ctx, grad):
        s = ctx.out
        return (grad * s * (1.0 - s),)


def sigmoid(x: Tensor) -> Tensor:
    return Sigmoid.apply(x)


# --- softmax family -------------------------------------------------------------------------------------------


def softmax_array(x, axis: int = -1):
    """A stable softmax of a plain array (a new array): subtract the max so exp never overflows (extreme logits such
    as ±1000 stay finite). The ``Softmax`` op and the attention of decoding (``SelfAttention.infer``) use it."""
    xp = get_xp(x)
    s = x - x.max(axis=axis, keepdims=True)
    xp.exp(s, out=s)
    s *= 1.0 / s.sum(axis=axis, keepdims=True)
    return s


def rowdot(a, b, axis: int = -1):
    """Σ_j a_j b_j along ``axis`` (dropped), without an (a*b) temporary: ``vecdot`` (a NumPy 2 ufunc: 1.4-1.6x faster
    than ``einsum`` on LayerNorm's and attention's rows here, and a tenth of its call overhead in decoding), or
    ``einsum`` where the array module has no ``vecdot``."""
    xp = get_xp(a)
    if hasattr(xp, "vecdot"):
        return xp.vecdot(a, b, axis=axis)
    return xp.einsum("...i,...i->...", xp.moveaxis(a, axis, -1), xp.moveaxis(b, axis, -1))


def _rowdot(a, b, axis):
    """``rowdot`` with the summed axis kept (size 1)."""
    return get_xp(a).expand_dims(rowdot(a, b, axis), axis)


class Softmax(Function):
    """y = softmax(x). Backward: dx = y ⊙ (dy − Σ_j dy_j y_j), the Jacobian-vector product without the Jacobian."""

    @staticmethod
    def forward(ctx, x, axis=-1):
        ctx.axis = axis
        ctx.out = softmax_array(x, axis)
        return ctx.out

    @staticmethod
    def backward(ctx, grad):
        y = ctx.out
        dx = grad - _rowdot(grad, y, ctx.axis)
        dx *= y
        return (dx,)


def softmax(x: Tensor, axis: int = -1) -> Tensor:
    return Softmax.apply(x, axis=axis)


class LogSoftmax(Function):
    """y = x − logsumexp(x). Backward: dx = dy − softmax(x)·Σ_j dy_j."""

    @staticmethod
    def forward(ctx, x, axis=-1):
        xp = get_xp(x)
        m = x.max(axis=axis, keepdims=True)
        lse = m + xp.log(xp.exp(x - m).sum(axis=axis, keepdims=True))
        out = x - lse
        ctx.axis, ctx.out = axis, out
        return out

    @staticmethod
    def backward(ctx, grad):
        xp = get_xp(grad)
        return (grad - xp.exp(ctx.out) * grad.sum(axis=ctx.axis, keepdims=True),)


def log_softmax(x: Tensor, axis: int = -1) -> Tensor:
    return LogSoftmax.apply(x, axis=axis)


def cross_entropy_plain(logits, targets, mask=None):
    """The mean of −log softmax(z_n)[t_n] over the rows n (weighted by ``mask`` and divided by its sum, when given),
    as the formula reads: the plain path that the fused ``CrossEntropy`` is tested against."""
    xp = get_xp(logits)
    V = logits.shape[-1]
    z, t = logits.reshape(-1, V), targets.reshape(-1)
    m = z.max(axis=-1, keepdims=True)
    lse = (m + xp.log(xp.exp(z - m).sum(axis=-1, keepdims=True)))[:, 0]  # log Σ_v exp(z_v), stably
    nll = lse - z[xp.arange(t.size), t]
    if mask is None:
        return nll.mean()
    w = mask.reshape(-1)
    return (nll * w).sum() / max(float(w.sum()), 1.0)


def cross_entropy_rows(z, t, probs, nll) -> None:
    """For rows of logits z (n, V) and targets t (n,): probs = softmax(z) and nll = lse(z) − z[t], written into the
    given buffers. The max is subtracted first, so ±1000 logits give no NaN, and nll is exact even where p_t
    underflows to 0. ``CrossEntropy`` runs it on cache-sized pieces of rows on every core (``parallel.map_rows``):
    the five passes over a piece stay in cache instead of going to memory and back over the whole (N, V) array."""
    xp = get_xp(z)
    xp.subtract(z, z.max(axis=1, keepdims=True), out=probs)  # shifted logits: max 0 per row
    z_t = probs[xp.arange(t.size), t]  # the target's shifted logit
    xp.exp(probs, out=probs)
    sum_exp = probs.sum(axis=1)
    xp.subtract(xp.log(sum_exp), z_t, out=nll)
    probs *= (1.0 / sum_exp)[:, None]


class CrossEntropy(Function):
    """Mean cross-entropy of ``logits`` (..., V) against integer ``targets`` (...), fused with the softmax
    (``cross_entropy_plain`` is the formula it is tested against).

    loss = Σ_n m_n (lse_n − z_n[t_n]) / Σ_n m_n, with m the optional mask (docs/official-code.md §4: the sum over
    every Part-B target in the batch divided by their count, not a per-sample mean).
    Backward: dz_n = (softmax(z_n) − onehot(t_n))·m_n/Σm.
    The softmax is computed once (``cross_entropy_rows``, on pieces of rows on every core) and reused.
    """

    @staticmethod
    def forward(ctx, logits, targets, mask=None):
        xp = get_xp(logits)
        V = logits.shape[-1]
        if targets.shape != logits.shape[:-1]:
            raise ValueError(f"cross_entropy: targets shape {targets.shape} != logits shape {logits.shape} minus V")
        if mask is not None and mask.shape != targets.shape:
            raise ValueError(f"cross_entropy: mask shape {mask.shape} != targets shape {targets.shape}")
        z = logits.reshape(-1, V)  # (N, V)
        t = targets.reshape(-1).astype(np.int64, copy=False)
        if t.size and (int(t.min()) < 0 or int(t.max()) >= V):
            raise ValueError(f"cross_entropy: targets must lie in [0, {V}), got [{int(t.min())}, {int(t.max())}]")
        probs = xp.empty(z.shape, dtype=z.dtype)  # becomes the softmax, kept for the backward
        nll = xp.empty(t.shape, dtype=z.dtype)
        parallel.map_rows(cross_entropy_rows, z, t, probs, nll)
        if mask is None:
            weights = None
            count = float(t.size)
            total = nll.sum()
        else:
            weights = mask.reshape(-1).astype(logits.dtype, copy=False)
            count = float(weights.sum())
            total = (nll * weights).sum()
        ctx.probs, ctx.t, ctx.weights, ctx.count, ctx.shape = probs, t, weights, max(count, 1.0), logits.shape
        return (total / max(count, 1.0)).astype(logits.dtype)

    @staticmethod
    def backward(ctx, grad):
        xp = get_xp(ctx.probs)
        # The saved probabilities become the gradient in place, unless the graph is kept for another backward.
        d = ctx.probs.copy() if ctx.retain_graph else ctx.probs
        d[xp.arange(ctx.t.size), ctx.t] -= 1.0
        scale = grad * (1.0 / ctx.count)
        if ctx.weights is not None:
            d *= (ctx.weights * scale)[:, None]
        else:
            d *= scale
        return d.reshape(ctx.shape), None, None


def cross_entropy(logits: Tensor, targets, mask=None) -> Tensor:
    """Mean token cross-entropy; with ``mask`` (same shape as targets) the mean is over the mask's count."""
    targets = targets.data if isinstance(targets, Tensor) else targets
    mask = mask.data if isinstance(mask, Tensor) else mask
    return CrossEntropy.apply(logits, targets, mask)


# --- normalisation, embedding, linear -------------------------------------------------------------------------


def layer_norm_plain(x, weight, bias=None, eps: float = 1e-5):
    """LayerNorm as the formula reads: (x − mean)/sqrt(var + eps)·w + b over the last dim.

    The plain path: ``LayerNormOp`` computes the same numbers with ``layer_norm_rows`` in pieces of rows on every core,
    and is tested against this."""
    xp = get_xp(x)
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    y = (x - mean) / xp.sqrt(var + eps) * weight
    return y if bias is None else y + bias


def layer_norm_rows(x, out, xhat, rstd, weight, bias, eps: float) -> None:
    """``layer_norm_plain`` of the rows of x (n, C) into out (n, C), without temporaries of x's size; x̂ = (x − μ)/σ
    goes into xhat and 1/σ into rstd (n, 1), which the backward needs. ``xhat`` may be ``out`` when nothing is kept.
    ``LayerNormOp`` runs it on pieces of rows (``parallel.map_rows``), ``layer_norm_array`` (inference) on all."""
    xp = get_xp(x)
    inv_c = 1.0 / x.shape[-1]  # sum·(1/C) rather than mean(): ndarray.mean runs Python code, which shows in decoding
    xc = xp.subtract(x, x.sum(axis=-1, keepdims=True) * inv_c, out=xhat)
    var = rowdot(xc, xc)[:, None] * inv_c
    xp.divide(1.0, xp.sqrt(var + eps), out=rstd)
    xc *= rstd  # x̂
    y = xp.multiply(xc, weight, out=out)
    if bias is not None:
        y += bias


def layer_norm_backward_rows(grad, xhat, rstd, dx, weight):
    """dx = r·(g − mean(g) − x̂·mean(g ⊙ x̂)) with g = grad ⊙ w, written into dx (n, C); returns these rows' shares of
    dw = Σ grad ⊙ x̂ and db = Σ grad (the caller adds the shares of all pieces)."""
    xp = get_xp(grad)
    C = grad.shape[-1]
    g = xp.multiply(grad, weight, out=dx)
    mean_gx = rowdot(g, xhat)[:, None] * (1.0 / C)
    g -= g.sum(axis=-1, keepdims=True) * (1.0 / C)
    g -= xhat * mean_gx
    g *= rstd
    return xp.einsum("nc,nc->c", grad, xhat), grad.sum(axis=0)


def layer_norm_array(x, weight, bias, eps: float = 1e-5):
    """LayerNorm of a plain (n, C) array, no graph (decoding: ``nn.LayerNorm.infer``)."""
    xp = get_xp(x)
    out = xp.empty_like(x)
    layer_norm_rows(x, out, out, xp.empty((x.shape[0], 1), dtype=x.dtype), weight, bias, eps)
    return out


class LayerNormOp(Function):
    """y = (x − μ)/σ · w + b over the last dim (C), σ = sqrt(var + eps): ``layer_norm_plain``, computed in place by
    ``layer_norm_rows``.

    With x̂ = (x − μ)·r, r = 1/σ, and g = dy ⊙ w, the fused backward (``layer_norm_backward_rows``) is
        dx = r · (g − mean(g) − x̂ · mean(g ⊙ x̂)),   dw = Σ dy ⊙ x̂,   db = Σ dy,
    the means over C and the sums over every leading dim. (Derive it by writing dx̂/dx and noting that mean(x̂) = 0
    and mean(x̂²) = 1.) Rows are independent, so both directions run over pieces of rows spread over the CPU cores.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps=1e-5):
        xp = get_xp(x)
        C = x.shape[-1]
        if weight.shape != (C,) or (bias is not None and bias.shape != (C,)):
            bshape = getattr(bias, "shape", None)
            raise ValueError(
                f"layer_norm: input of shape {x.shape} needs weight and bias of shape ({C},), "
                f"got {weight.shape} and {bshape}"
            )
        x2 = x.reshape(-1, C)  # (N, C)
        xhat, out = xp.empty_like(x2), xp.empty_like(x2)
        rstd = xp.empty((x2.shape[0], 1), dtype=x.dtype)
        parallel.map_rows(layer_norm_rows, x2, out, xhat, rstd, args=(weight, bias, eps))
        ctx.xhat, ctx.rstd, ctx.weight = xhat, rstd, weight
        return out.reshape(x.shape)

    @staticmethod
    def backward(ctx, grad):
        xp = get_xp(grad)
        xhat = ctx.xhat
        dx = xp.empty_like(xhat)
        shares = parallel.map_rows(layer_norm_backward_rows, grad.reshape(xhat.shape), xhat, ctx.rstd, dx,
                                   args=(ctx.weight,))
        dw, db = (sum(part[i] for part in shares) for i in (0, 1))  # in row order: the same sums on any thread count
        return dx.reshape(grad.shape), dw, db


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    return LayerNormOp.apply(x, weight, bias, eps=eps)


class EmbeddingOp(Function):
    """out = weight[ids]: rows of the (V, C) table. Backward scatters rows back, summing repeated ids."""

    @staticmethod
    def forward(ctx, ids, weight):
        if ids.dtype.kind not in "iu":
            raise ValueError(f"embedding: ids must be integers, got dtype {ids.dtype}")
        V = weight.shape[0]
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= V):
            raise ValueError(f"embedding: ids must lie in [0, {V}), got [{int(ids.min())}, {int(ids.max())}]")
        ctx.ids, ctx.wshape, ctx.dtype = ids, weight.shape, weight.dtype
        return weight[ids]

    @staticmethod
    def backward(ctx, grad):
        xp = get_xp(grad)
        dw = xp.zeros(ctx.wshape, dtype=ctx.dtype)
        C = ctx.wshape[1]
        scatter_add_rows(dw, ctx.ids.reshape(-1), grad.reshape(-1, C))
        return None, dw


def embedding(ids, weight: Tensor) -> Tensor:
    """Look up rows of ``weight`` (V, C) for integer ``ids`` of any shape: out shape ids.shape + (C,)."""
    ids = ids.data if isinstance(ids, Tensor) else ids
    return EmbeddingOp.apply(ids, weight)


class LinearOp(Function):
    """y = x @ Wᵀ + b, with W stored (out, in) as in PyTorch and the official GLM checkpoints.

    x (..., in) is viewed as one (N, in) matrix so every call is one large GEMM. Backward: dx = dy @ W,
    dW = dyᵀ @ x, db = Σ dy; the transposes are views, which BLAS takes as flags without copying.
    """

    @staticmethod
    def forward(ctx, x, weight, bias=None):
        if x.shape[-1] != weight.shape[1]:
            raise ValueError(f"linear: input shape {x.shape} does not match weight shape {weight.shape} (out, in)")
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        y = x2 @ weight.T  # (N, out)
        if bias is not None:
            y += bias
        ctx.x2, ctx.weight, ctx.xshape, ctx.has_bias = x2, weight, x.shape, bias is not None
        return y.reshape(x.shape[:-1] + (weight.shape[0],))

    @staticmethod
    def backward(ctx, grad):
        g2 = grad.reshape(-1, grad.shape[-1])  # (N, out)
        dx = (g2 @ ctx.weight).reshape(ctx.xshape) if ctx.needs_input_grad[0] else None
        dw = g2.T @ ctx.x2 if ctx.needs_input_grad[1] else None  # frozen weights (LoRA) skip a whole GEMM
        db = g2.sum(axis=0) if ctx.has_bias else None
        return dx, dw, db


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    return LinearOp.apply(x, weight, bias)


class DropoutOp(Function):
    """Zero each element with probability p and scale the rest by 1/(1−p) (inverted dropout)."""

    @staticmethod
    def forward(ctx, x, keep):
        ctx.keep = keep
        return x * keep

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.keep, None


def dropout(x: Tensor, p: float, training: bool, rng: np.random.Generator | None) -> Tensor:
    """Inverted dropout. The mask is drawn from the given NumPy ``rng`` (also for CuPy tensors, then copied to the
    GPU), so a seeded run gives the same masks on every device."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout: p must be in [0, 1), got {p}")
    if not training or p == 0.0:
        return x
    if rng is None:
        raise ValueError("dropout: training with p > 0 needs an explicit numpy Generator `rng`")
    keep = (rng.random(x.shape, dtype=np.float32) >= p).astype(x.dtype) * np.asarray(1.0 / (1.0 - p), x.dtype)
    if is_cupy(x.data):
        keep = to_device(keep, get_xp(x.data))
    return DropoutOp.apply(x, keep)


# --- selection and joining ------------------------------------------------------------------------------------


class Where(Function):
    @staticmethod
    def forward(ctx, cond, a, b):
        xp = get_xp(a, b)
        ctx.cond = cond
        return xp.where(cond, a, b)

    @staticmethod
    def backward(ctx, grad):
        return None, grad * ctx.cond, grad * ~ctx.cond


def where(cond, a, b) -> Tensor:
    """Elementwise ``cond ? a : b`` with broadcasting; ``a``/``b`` may be tensors or scalars."""
    cond = cond.data if isinstance(cond, Tensor) else cond
    ref = a if isinstance(a, Tensor) else b
    if not isinstance(ref, Tensor):
        raise ValueError("where: at least one of a, b must be a Tensor")
    a = a if isinstance(a, Tensor) else ref._const(a)
    b = b if isinstance(b, Tensor) else ref._const(b)
    return Where.apply(get_xp(ref.data).asarray(cond, dtype=bool), a, b)


def masked_fill(x: Tensor, mask, value: float) -> Tensor:
    """``x`` with ``value`` wherever ``mask`` is True (the gradient there is zero)."""
    return where(mask, value, x)


class Concat(Function):
    @staticmethod
    def forward(ctx, *arrays, axis=0):
        xp = get_xp(*arrays)
        ctx.axis = axis
        ctx.sizes = [a.shape[axis] for a in arrays]
        try:
            return xp.concatenate(arrays, axis=axis)
        except ValueError:
            raise ValueError(f"concat: shapes {[a.shape for a in arrays]} do not match off axis {axis}") from None

    @staticmethod
    def backward(ctx, grad):
        xp = get_xp(grad)
        cuts = np.cumsum(ctx.sizes)[:-1].tolist()
        return tuple(xp.split(grad, cuts, axis=ctx.axis))


def concat(tensors, axis: int = 0) -> Tensor:
    return Concat.apply(*tensors, axis=axis)


class Stack(Function):
    @staticmethod
    def forward(ctx, *arrays, axis=0):
        xp = get_xp(*arrays)
        if len({a.shape for a in arrays}) != 1:
            raise ValueError(f"stack: all shapes must match, got {[a.shape for a in arrays]}")
        ctx.axis = axis
        return xp.stack(arrays, axis=axis)

    @staticmethod
    def backward(ctx, grad):
        xp = get_xp(grad)
        n = grad.shape[ctx.axis]
        return tuple(xp.take(grad, i, axis=ctx.axis) for i in range(n))


def stack(tensors, axis: int = 0) -> Tensor:
    return Stack.apply(*tensors, axis=axis)


def split(x: Tensor, sections, axis: int = -1) -> list[Tensor]:
    """Split into pieces of the given sizes (a list) or into ``sections`` equal pieces (an int), as views."""
    n = x.shape[axis]
    if isinstance(sections, int):
        if n % sections:
            raise ValueError(f"split: axis of length {n} does not split into {sections} equal parts")
        sizes = [n // sections] * sections
    else:
        sizes = list(sections)
        if sum(sizes) != n:
            raise ValueError(f"split: sizes {sizes} do not add up to the axis length {n}")
    axis = axis % x.ndim
    out, start = [], 0
    for size in sizes:
        index = (slice(None),) * axis + (slice(start, start + size),)
        out.append(x[index])
        start += size
    return out


# --- attention ------------------------------------------------------------------------------------------------


def attention_plain(q, k, v, allowed=None, scale: float | None = None, keep=None):
    """softmax(q kᵀ·scale) v with the keys a query may not see left out, as the textbook writes it: the plain path
    that the ``Attention`` op (in place, pieces of the batch on every core) is tested against.

    q (B, H, Tq, D), k and v (B, H, Tk, D); ``allowed`` broadcastable to (B, H, Tq, Tk), True = may attend (for GLM,
    ``minglm.masks.glm_mask``); ``scale`` defaults to 1/√D; ``keep`` the dropout multiplier of the probabilities
    (0 or 1/(1 − p)), or None. Every query must see at least one key."""
    xp = get_xp(q)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ xp.swapaxes(k, -1, -2)) * scale  # (B, H, Tq, Tk)
    if allowed is not None:
        s = xp.where(allowed, s, -xp.inf)
    p = softmax_array(s, -1)
    if keep is not None:
        p = p * keep
    return p @ v  # (B, H, Tq, D)


def attention_rows(qs, k, v, allowed, keep, p, o) -> None:
    """``attention_plain`` of some batch elements, in place: the probabilities into p (b, H, Tq, Tk), the output into
    o (b, H, Tq, D). ``qs`` already holds the scale; ``allowed`` (b, 1 or H, Tq, Tk) and the dropout multiplier
    ``keep`` (b, H, Tq, Tk) may be None. A masked score becomes the dtype's lowest number, whose exp() is exactly 0."""
    xp = get_xp(qs)
    xp.matmul(qs, xp.swapaxes(k, -1, -2), out=p)  # scores (b, H, Tq, Tk)
    if allowed is not None:
        xp.copyto(p, np.finfo(p.dtype).min, where=~allowed)
    p -= p.max(axis=-1, keepdims=True)  # softmax in place, in p's own buffer
    xp.exp(p, out=p)
    p *= 1.0 / p.sum(axis=-1, keepdims=True)
    xp.matmul(p * keep if keep is not None else p, v, out=o)  # (b, H, Tq, D)


def attention_backward_rows(qs, k, v, p, keep, grad, dq, dk, dv) -> None:
    """The backward of ``attention_rows`` for the same batch elements, into dq, dk, dv (dq still lacks the scale):
    dv = Pᵀ do, dP = do vᵀ, dp = dP ⊙ keep, ds = p ⊙ (dp − Σ_j dp_j p_j), dq = ds k, dk = dsᵀ qs."""
    xp = get_xp(qs)
    pd = p * keep if keep is not None else p
    xp.matmul(xp.swapaxes(pd, -1, -2), grad, out=dv)
    ds = grad @ xp.swapaxes(v, -1, -2)  # dP, then turned into dS in place   # (b, H, Tq, Tk)
    if keep is not None:
        ds *= keep
    ds -= rowdot(ds, p)[..., None]
    ds *= p
    xp.matmul(ds, k, out=dq)
    xp.matmul(xp.swapaxes(ds, -1, -2), qs, out=dk)  # qs already holds the scale


class Attention(Function):
    """Plain (reference) attention, ``attention_plain``, as one op with its own backward.

    With s = q kᵀ·scale, p = softmax(s) (masked keys get probability exactly 0) and P the dropped-out p:
        dv = Pᵀ do,  dP = do vᵀ,  dp = dP ⊙ keep,  ds = p ⊙ (dp − Σ_j dp_j p_j),  dq = ds k·scale,  dk = dsᵀ q·scale.
    This path stores the (B, H, Tq, Tk) probabilities; the fused kernel (minglm/kernels) never does.

    Both directions run ``attention_rows`` / ``attention_backward_rows`` on pieces of the batch spread over the CPU
    cores (``parallel.map_rows``): a piece's scores stay in cache between its passes. Nothing in the arithmetic
    changes.
    """

    @staticmethod
    def forward(ctx, q, k, v, allowed, scale, keep=None):
        xp = get_xp(q)
        B, H, Tq, D = q.shape
        Tk = k.shape[2]
        if allowed is not None:  # as (B, 1 or H, Tq, Tk), so a piece of it is indexed like a piece of the scores
            per_head = allowed.ndim >= 3 and allowed.shape[-3] != 1
            allowed = xp.broadcast_to(allowed, (B, H if per_head else 1, Tq, Tk))
        p = xp.empty((B, H, Tq, Tk), dtype=q.dtype)
        if is_cupy(q):
            o = xp.empty((B, H, Tq, D), dtype=q.dtype)
        else:  # (B, H, Tq, D) with the heads side by side in memory: the caller's permute back to (B, Tq, H·D) is
            o = xp.empty((B, Tq, H, D), dtype=q.dtype).transpose(0, 2, 1, 3)  # a view, not a copy
        qs = q * scale  # scale the (T, D) queries, not the (T, T) scores
        parallel.map_rows(attention_rows, qs, k, v, allowed, keep, p, o)
        ctx.q, ctx.k, ctx.v, ctx.p, ctx.scale, ctx.keep = qs, k, v, p, scale, keep
        return o

    @staticmethod
    def backward(ctx, grad):
        xp = get_xp(grad)
        qs, k, v = ctx.q, ctx.k, ctx.v
        dq, dk, dv = (xp.empty(a.shape, a.dtype) for a in (qs, k, v))
        parallel.map_rows(attention_backward_rows, qs, k, v, ctx.p, ctx.keep, grad, dq, dk, dv)
        dq *= ctx.scale
        return dq, dk, dv, None, None, None


class FlashAttention(Function):
    """Tiled attention with the GLM mask computed from ``sep`` (minglm/kernels): the fused CUDA kernel on CuPy,
    its NumPy twin on the CPU. Neither stores a T×T matrix; the backward recomputes the tiles."""

    @staticmethod
    def forward(ctx, q, k, v, sep, scale):
        o, lse = kernels.flash_attention_forward(q, k, v, sep, scale)
        ctx.saved = (q, k, v, o, lse, sep, scale)
        return o

    @staticmethod
    def backward(ctx, grad):
        q, k, v, o, lse, sep, scale = ctx.saved
        dq, dk, dv = kernels.flash_attention_backward(q, k, v, o, lse, grad, sep, scale)
        return dq, dk, dv, None, None


ATTENTION_IMPLS = ("auto", "plain", "flash")


def uses_flash(q, Tq: int, Tk: int, has_mask: bool, dropout_p: float, impl: str) -> bool:
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"scaled_dot_product_attention: impl must be one of {', '.join(ATTENTION_IMPLS)}, "
                         f"got {impl!r}")
    if impl == "plain" or has_mask or dropout_p > 0.0 or Tq != Tk:
        return False
    if impl == "flash":
        return True
    return is_cupy(q) or Tq >= kernels.TWIN_MIN_T  # auto: the kernel on a GPU, the twin for long CPU sequences


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, sep=None, mask=None, scale: float | None = None,
                                 dropout_p: float = 0.0, rng: np.random.Generator | None = None,
                                 impl: str = "auto", softmax_coeff: float | None = None) -> Tensor:
    """softmax(q kᵀ · scale) v over (B, H, T, D) tensors, with GLM's mask when ``sep`` (B,) is given.

    - ``sep``: key j is visible to query i when j < sep[b] or j <= i (docs/mask.md). When q is shorter than k,
      the queries are the last positions (decoding with a cache).
    - ``mask``: an explicit boolean mask broadcastable to (B, H, Tq, Tk), True = may attend (combined with sep).
    - ``scale`` defaults to 1/sqrt(D). ``dropout_p`` drops attention probabilities (needs ``rng``).
    - ``impl``: "plain" forces the reference path; "flash" the tiled kernel/twin; "auto" the kernel on CuPy and the
      twin on the CPU for long sequences (``kernels.TWIN_MIN_T``). A model passes its ``GLMConfig.attention``.
    - ``softmax_coeff``: GLM-130B's FP32 softmax with this per-layer coefficient c (``FP32SoftmaxAttention``; the
      plain path only).
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"scaled_dot_product_attention: q, k, v must be (B, H, T, D), got {q.shape}, {k.shape}, {v.shape}"
        )
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    if k.shape[:2] != (B, H) or v.shape[:3] != k.shape[:3] or k.shape[3] != D:
        raise ValueError(f"scaled_dot_product_attention: mismatched q {q.shape}, k {k.shape}, v {v.shape}")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    xp = get_xp(q.data)
    mask = mask.data if isinstance(mask, Tensor) else mask
    if sep is not None:
        sep = xp.asarray(sep.data if isinstance(sep, Tensor) else sep).astype(np.int64).reshape(-1)
        if sep.shape[0] not in (1, B):
            raise ValueError(f"scaled_dot_product_attention: sep has {sep.shape[0]} entries for a batch of {B}")
        if sep.shape[0] == 1 and B > 1:
            sep = xp.broadcast_to(sep, (B,))
    flash = uses_flash(q.data, Tq, Tk, mask is not None, dropout_p, impl)
    if flash and sep is not None and softmax_coeff is None:
        return FlashAttention.apply(q, k, v, sep, scale)
    allowed = None
    if sep is not None:
        allowed = glm_mask(xp, sep, Tq, Tk)
    if mask is not None:
        mask = xp.asarray(mask, dtype=bool)
        allowed = mask if allowed is None else (allowed & mask)
    keep = None
    if dropout_p > 0.0:
        if rng is None:
            raise ValueError("scaled_dot_product_attention: dropout_p > 0 needs an explicit numpy Generator `rng`")
        keep = (rng.random((B, H, Tq, Tk), dtype=np.float32) >= dropout_p).astype(q.dtype)
        keep *= np.asarray(1.0 / (1.0 - dropout_p), q.dtype)
        keep = to_device(keep, xp)
    if softmax_coeff is not None:
        return FP32SoftmaxAttention.apply(q, k, v, allowed, scale, float(softmax_coeff), keep)
    return Attention.apply(q, k, v, allowed, scale, keep)


# --- GLM-130B's ops (Zeng et al. 2022, "GLM-130B", §2.1-§3 and App. B) -------------------------------------------


def _geglu_parts(u):
    """The halves a, b of u = [a | b], Φ(b) and GeLU(b) = b·Φ(b): the forward of GeGLU, shared with inference."""
    half = u.shape[-1] // 2
    a, b = u[..., :half], u[..., half:]
    cdf = (0.5 * (1.0 + _erf(b * (1.0 / math.sqrt(2.0))))).astype(u.dtype, copy=False)
    return a, b, cdf, b * cdf


def geglu_array(u):
    """a ⊙ GeLU_erf(b) of a plain array u = [a | b], no graph (decoding: ``MLP.infer``)."""
    a, _, _, gelu_b = _geglu_parts(u)
    return a * gelu_b


class GeGLU(Function):
    """GLM-130B's gated FFN activation (GLM-130B §2.1): split u (..., 2F) into halves [a | b] and return a ⊙ GeLU(b).

    The *second* half is the gate and the GeLU is the exact erf one, as in SAT's ``glm130B_model.py`` (``GEGLU``:
    ``x1, x2 = x.chunk(2); x1 * F.gelu(x2)``). With Φ the normal CDF and φ its density:
        da = g ⊙ b·Φ(b),   db = g ⊙ a ⊙ (Φ(b) + b·φ(b)).
    """

    @staticmethod
    def forward(ctx, u):
        xp = get_xp(u)
        if u.shape[-1] % 2:
            raise ValueError(f"geglu: the last dim holds two halves and must be even, got shape {u.shape}")
        a, b, cdf, gelu_b = _geglu_parts(u)
        ctx.a, ctx.b, ctx.cdf, ctx.gelu_b = a, b, cdf, gelu_b
        return xp.multiply(a, gelu_b)

    @staticmethod
    def backward(ctx, grad):
        xp = get_xp(grad)
        a, b = ctx.a, ctx.b
        pdf = xp.exp(-0.5 * b * b) * (1.0 / math.sqrt(2.0 * math.pi))
        da = grad * ctx.gelu_b
        db = grad * a * (ctx.cdf + b * pdf)
        return (xp.concatenate([da, db], axis=-1),)


def geglu(u: Tensor) -> Tensor:
    """a ⊙ GeLU_erf(b) for u = [a | b] on the last dim: (..., 2F) -> (..., F)."""
    return GeGLU.apply(u)


def _rotate_half(x, groups: int):
    """In each of ``groups`` equal chunks of the last dim, [x1 | x2] -> [−x2 | x1] (GPT-NeoX's ``rotate_half``)."""
    xp = get_xp(x)
    shape = x.shape
    xg = x.reshape(shape[:-1] + (groups, 2, shape[-1] // (2 * groups)))  # (..., groups, 2, d/2)
    out = xp.empty_like(xg)
    xp.negative(xg[..., 1, :], out=out[..., 0, :])
    out[..., 1, :] = xg[..., 0, :]
    return out.reshape(shape)


def rope_array(x, cos, sin, groups: int = 1):
    """x ⊙ cos + rot(x) ⊙ sin on plain arrays (the forward of ``RoPE``, and decoding's ``SelfAttention.infer``)."""
    out = x * cos
    out += _rotate_half(x, groups) * sin
    return out


class RoPE(Function):
    """Rotary position embedding (Su et al. 2021) in the rotate-half layout of GPT-NeoX and SAT.

    out = x ⊙ cos + rot(x) ⊙ sin, with rot([x1 | x2]) = [−x2 | x1] inside each of ``groups`` chunks of the last dim:
    dims i and i + d/2 of a chunk form a pair, rotated by the angle in cos/sin (see ``rotary_tables``). It is the
    paper's complex rotation (x_i + i·x_{i+d/2})·e^{iθ} with the dims permuted. rot is a 90° rotation, so rotᵀ = −rot:
        dx = g ⊙ cos − rot(g ⊙ sin).
    x (B, nh, T, hs); cos, sin (B, 1, T, hs) are constants.
    """

    @staticmethod
    def forward(ctx, x, cos, sin, groups=1):
        if x.shape[-1] % (2 * groups):
            raise ValueError(f"rope: the head size {x.shape[-1]} must split into {groups} chunk(s) of even size")
        ctx.cos, ctx.sin, ctx.groups = cos, sin, groups
        return rope_array(x, cos, sin, groups)

    @staticmethod
    def backward(ctx, grad):
        dx = grad * ctx.cos
        dx -= _rotate_half(grad * ctx.sin, ctx.groups)
        return dx, None, None


def rotary_tables(ids: list, head_size: int, dtype=np.float32, base: float = 10000.0):
    """cos and sin (B, 1, T, hs) that rotate each head by the ids: one (B, T) id array per chunk of the head.

    ``[position_ids]`` is GLM-130B's 1-D RoPE (App. B.3); ``[position_ids, block_position_ids]`` the 2-D RoPE of SAT's
    ``glm130B_model.py`` (``--position-encoding-2d``): the first half of every head turns with the position, the
    second with the block id, each with a RoPE of dim hs/2. A chunk of dim d uses θ_i = base^(−2i/d), i < d/2, laid
    out [θ | θ] (rotate-half). Angles are computed in float64 and cast to ``dtype``.
    """
    xp = get_xp(ids[0])
    groups = len(ids)
    if head_size % (2 * groups):
        raise ValueError(f"rotary_tables: head size {head_size} must split into {groups} chunk(s) of even size")
    d = head_size // groups
    inv_freq = 1.0 / base ** (xp.arange(0, d, 2, dtype=np.float64) / d)  # (d/2,)
    ids = [xp.asarray(chunk_ids) for chunk_ids in ids]
    # The ids are positions, a few distinct small integers in a batch of B·T: take the cos and sin of each id from a
    # table of 0..max instead of B·T·hs times (the same float64 values, so the same float32 tables).
    integer = ids[0].size and all(chunk_ids.dtype.kind in "iu" for chunk_ids in ids)
    if integer and min(int(chunk_ids.min()) for chunk_ids in ids) >= 0 \
            and (top := max(int(chunk_ids.max()) for chunk_ids in ids)) < ids[0].size:
        angles = xp.arange(top + 1, dtype=np.float64)[:, None] * inv_freq  # (top + 1, d/2)
        angles = xp.concatenate([angles, angles], axis=-1)  # (top + 1, d)
        cos_t, sin_t = xp.cos(angles).astype(dtype), xp.sin(angles).astype(dtype)
        cos = xp.concatenate([cos_t[chunk_ids] for chunk_ids in ids], axis=-1)[:, None]  # (B, 1, T, hs)
        sin = xp.concatenate([sin_t[chunk_ids] for chunk_ids in ids], axis=-1)[:, None]
        return cos, sin
    chunks = []
    for chunk_ids in ids:
        angles = chunk_ids.astype(np.float64)[..., None] * inv_freq  # (B, T, d/2)
        chunks += [angles, angles]
    emb = xp.concatenate(chunks, axis=-1)[:, None]  # (B, 1, T, hs)
    return xp.cos(emb).astype(dtype), xp.sin(emb).astype(dtype)


def rope(x: Tensor, cos, sin, groups: int = 1) -> Tensor:
    """Rotate (B, nh, T, hs) queries or keys by the tables of ``rotary_tables``."""
    return RoPE.apply(x, cos, sin, groups=groups)


class GradScale(Function):
    """Identity forward, gradient times ``alpha`` backward: GLM-130B's embedding gradient shrink (EGS, GLM-130B §3).

    The paper writes it ``word_embedding = word_embedding * alpha + word_embedding.detach() * (1 - alpha)``; the
    value is unchanged and only alpha of the gradient flows back. On purpose this is *not* the derivative of the
    forward, so its gradient check expects alpha times central differences (``gradcheck(..., factor=alpha)``).
    """

    @staticmethod
    def forward(ctx, x, alpha=1.0):
        ctx.alpha = alpha
        return x.copy()

    @staticmethod
    def backward(ctx, grad):
        return (grad * ctx.alpha,)


def grad_scale(x: Tensor, alpha: float) -> Tensor:
    return GradScale.apply(x, alpha=float(alpha))


def fp32_softmax_attention_rows(qs, k, v, allowed, keep, p, o, coeff: float) -> None:
    """GLM-130B's attention of some batch elements, into p (b, H, Tq, Tk) and o (b, H, Tq, D): the scores q̃ kᵀ in the
    activation dtype (q̃ = ``qs`` = q·scale/c), then cast to at least float32, times c, masked and softmaxed there."""
    xp = get_xp(qs)
    acc = np.promote_types(qs.dtype, np.float32)  # the softmax dtype: float32, or float64 for gradient checks
    s = (qs @ xp.swapaxes(k, -1, -2)).astype(acc)  # computed in the activation dtype, softmaxed in acc
    s *= coeff
    if allowed is not None:
        xp.copyto(s, np.finfo(acc).min, where=~allowed)
    p[...] = softmax_array(s, -1)  # cast back to the activation dtype
    xp.matmul(p * keep if keep is not None else p, v, out=o)


def fp32_softmax_attention_backward_rows(qs, k, v, p, keep, grad, dq, dk, dv, coeff: float) -> None:
    """The backward of ``fp32_softmax_attention_rows`` (dq still lacks the scale), the softmax part in float32:
    ds = p ⊙ (dp − Σ_j dp_j p_j), dq = ds k, dk = dsᵀ q̃·c."""
    xp = get_xp(qs)
    acc = np.promote_types(qs.dtype, np.float32)
    xp.matmul(xp.swapaxes(p * keep if keep is not None else p, -1, -2), grad, out=dv)
    dp = (grad @ xp.swapaxes(v, -1, -2)).astype(acc)  # (b, H, Tq, Tk)
    if keep is not None:
        dp *= keep
    pa = p.astype(acc, copy=False)
    ds = (pa * (dp - _rowdot(dp, pa, -1))).astype(qs.dtype, copy=False)
    xp.matmul(ds, k, out=dq)
    xp.matmul(xp.swapaxes(ds, -1, -2), qs, out=dk)
    dk *= coeff


class FP32SoftmaxAttention(Function):
    """GLM-130B's attention scores (GLM-130B §3, "FP32 softmax with QKV scaling"; SAT ``glm130B_model.py``,
    ``SelfAttentionWithFP32SoftmaxMixin.attention_fn``).

    q is divided by √D·c with c = layer + 1 *before* q kᵀ, so the scores are computed c times smaller in the
    activation dtype (float16 there, where plain scores of a deep layer overflow 65504); they are then cast to at
    least float32, multiplied back by c, masked and softmaxed there, and the probabilities cast back. In exact
    arithmetic softmax(c·(q/(√D·c)) kᵀ) = softmax(q kᵀ/√D): the op equals ``attention_plain``, only the rounding
    moves. Backward as ``Attention``, with s = c·(q̃ kᵀ), q̃ = q·scale/c: dq = ds k·scale, dk = dsᵀ q̃·c.
    Like ``Attention``, both directions run on pieces of the batch on every core (``parallel.map_rows``).
    """

    @staticmethod
    def forward(ctx, q, k, v, allowed, scale, coeff, keep=None):
        xp = get_xp(q)
        B, H, Tq, D = q.shape
        Tk = k.shape[2]
        if allowed is not None:  # as (B, 1 or H, Tq, Tk), so a piece of it is indexed like a piece of the scores
            allowed = xp.asarray(allowed, dtype=bool)
            per_head = allowed.ndim >= 3 and allowed.shape[-3] != 1
            allowed = xp.broadcast_to(allowed, (B, H if per_head else 1, Tq, Tk))
        qs = q * (scale / coeff)  # (B, H, Tq, D) in the activation dtype
        p = xp.empty((B, H, Tq, Tk), dtype=q.dtype)
        o = xp.empty((B, H, Tq, D), dtype=q.dtype)
        parallel.map_rows(fp32_softmax_attention_rows, qs, k, v, allowed, keep, p, o, args=(coeff,))
        ctx.qs, ctx.k, ctx.v, ctx.p, ctx.keep, ctx.scale, ctx.coeff = qs, k, v, p, keep, scale, coeff
        return o

    @staticmethod
    def backward(ctx, grad):
        xp = get_xp(grad)
        dq, dk, dv = (xp.empty(a.shape, a.dtype) for a in (ctx.qs, ctx.k, ctx.v))
        parallel.map_rows(fp32_softmax_attention_backward_rows, ctx.qs, ctx.k, ctx.v, ctx.p, ctx.keep, grad,
                          dq, dk, dv, args=(ctx.coeff,))
        dq *= ctx.scale
        return dq, dk, dv, None, None, None, None
