"""The core ops of the Tensor class, one small ``Function`` per op.

Each ``forward`` computes with the array module that owns its inputs (NumPy or CuPy) and keeps only what its
``backward`` needs. Each ``backward`` returns one gradient per input, shaped like the op's *output* broadcast:
the engine (``minglm/tensor.py``) sums it back to the input's shape. Gradients of constants are ignored there too,
so an op may return a value for every input without checking which ones need it.

The neural-network ops (softmax, layer norm, attention, ...) live in ``minglm/functional.py``.
"""

from __future__ import annotations

from minglm.backend import get_xp, scatter_add
from minglm.tensor import Function


def _shape_error(op: str, a, b, detail: str = "") -> ValueError:
    return ValueError(f"{op}: incompatible shapes {tuple(a.shape)} and {tuple(b.shape)}{detail}")


def _broadcast_check(op: str, a, b) -> None:
    """Raise a ValueError that names the op and both shapes when a and b do not broadcast."""
    sa, sb = tuple(getattr(a, "shape", ())), tuple(getattr(b, "shape", ()))
    for x, y in zip(reversed(sa), reversed(sb)):
        if x != y and x != 1 and y != 1:
            raise ValueError(f"{op}: shapes {sa} and {sb} do not broadcast")


# --- elementwise binary ---------------------------------------------------------------------------------------
class Add(Function):
    @staticmethod
    def forward(ctx, a, b):
        _broadcast_check("add", a, b)
        return a + b

    @staticmethod
    def backward(ctx, grad):
        return grad, grad


class Sub(Function):
    @staticmethod
    def forward(ctx, a, b):
        _broadcast_check("sub", a, b)
        return a - b

    @staticmethod
    def backward(ctx, grad):
        return grad, -grad


class Mul(Function):
    @staticmethod
    def forward(ctx, a, b):
        _broadcast_check("mul", a, b)
        ctx.a, ctx.b = a, b
        return a * b

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.b, grad * ctx.a


class Div(Function):
    @staticmethod
    def forward(ctx, a, b):
        _broadcast_check("div", a, b)
        ctx.a, ctx.b = a, b
        return a / b

    @staticmethod
    def backward(ctx, grad):
        ga = grad / ctx.b
        return ga, -ga * ctx.a / ctx.b


class Pow(Function):
    """a ** b. d/da = b·a^(b-1); d/db = a^b·log(a) (only defined for a > 0)."""

    @staticmethod
    def forward(ctx, a, b):
        _broadcast_check("pow", a, b)
        out = a**b
        ctx.a, ctx.b, ctx.out = a, b, out
        return out

    @staticmethod
    def backward(ctx, grad):
        xp = get_xp(ctx.a, ctx.b)
        a, b = ctx.a, ctx.b
        ga = grad * b * a ** (b - 1) if ctx.needs_input_grad[0] else None
        gb = None
        if ctx.needs_input_grad[1]:
            log_a = xp.log(xp.where(a > 0, a, 1))  # the exponent's gradient is only meaningful where a > 0
            gb = grad * ctx.out * log_a
        return ga, gb


class MatMul(Function):
    """a @ b with NumPy's rules: batched over leading dims, broadcasting them; 1-D operands are promoted."""

    @staticmethod
    def forward(ctx, a, b):
        if a.ndim == 0 or b.ndim == 0:
            raise ValueError(f"matmul: scalar operands are not allowed, got shapes {a.shape} and {b.shape}")
        if a.shape[-1] != b.shape[-2 if b.ndim > 1 else 0]:
            raise _shape_error("matmul", a, b, " (inner dimensions differ)")
        try:
            out = a @ b
        except ValueError:
            raise _shape_error("matmul", a, b, " (batch dimensions do not broadcast)") from None
        ctx.a, ctx.b = a, b
        return out

    @staticmethod
    def backward(ctx, grad):
        xp = get_xp(grad)
        a, b = ctx.a, ctx.b
        a2 = a[None, :] if a.ndim == 1 else a  # promote 1-D operands as matmul does
        b2 = b[:, None] if b.ndim == 1 else b
        g2 = grad
        if b.ndim == 1:  # first the column of b, then the row of a: a 0-d grad (vector @ vector) becomes (1, 1)
            g2 = xp.expand_dims(g2, -1)
        if a.ndim == 1:
            g2 = xp.expand_dims(g2, -2)
        ga = gb = None
        if ctx.needs_input_grad[0]:
            ga = g2 @ xp.swapaxes(b2, -1, -2)
            if a.ndim == 1:
                ga = ga.reshape(ga.shape[:-2] + ga.shape[-1:])
                ga = ga.sum(axis=tuple(range(ga.ndim - 1))) if ga.ndim > 1 else ga
        if ctx.needs_input_grad[1]:
            gb = xp.swapaxes(a2, -1, -2) @ g2
            if b.ndim == 1:
                gb = gb[..., 0]
                gb = gb.sum(axis=tuple(range(gb.ndim - 1))) if gb.ndim > 1 else gb
        return ga, gb


# --- elementwise unary ----------------------------------------------------------------------------------------
class Neg(Function):
    @staticmethod
    def forward(ctx, a):
        return -a

    @staticmethod
    def backward(ctx, grad):
        return (-grad,)


class Exp(Function):
    @staticmethod
    def forward(ctx, a):
        ctx.out = get_xp(a).exp(a)
        return ctx.out

    @staticmethod
    def backward(ctx, grad):
        return (grad * ctx.out,)


class Log(Function):
    @staticmethod
    def forward(ctx, a):
        ctx.a = a
        return get_xp(a).log(a)

    @staticmethod
    def backward(ctx, grad):
        return (grad / ctx.a,)


class Sqrt(Function):
    @staticmethod
    def forward(ctx, a):
        ctx.out = get_xp(a).sqrt(a)
        return ctx.out

    @staticmethod
    def backward(ctx, grad):
        return (grad / (2 * ctx.out),)


class Tanh(Function):
    @staticmethod
    def forward(ctx, a):
        ctx.out = get_xp(a).tanh(a)
        return ctx.out

    @staticmethod
    def backward(ctx, grad):
        return (grad * (1 - ctx.out * ctx.out),)


class Cast(Function):
    """Change the dtype; the gradient is cast back to the input's dtype."""

    @staticmethod
    def forward(ctx, a, dtype):
        ctx.dtype = a.dtype
        return a.astype(dtype)

    @staticmethod
    def backward(ctx, grad):
        return (grad.astype(ctx.dtype),)


# --- reductions -----------------------------------------------------------------------------------------------
def _norm_axis(axis, ndim: int) -> tuple:
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    for ax in axes:
        if not -ndim <= ax < max(ndim, 1):
            raise ValueError(f"axis {ax} is out of range for a tensor with {ndim} dims")
    return tuple(ax % ndim for ax in axes) if ndim else ()


def _expand_reduced(grad, shape: tuple, axes: tuple, keepdims: bool):
    """Reshape a reduction's gradient so it broadcasts against the input again."""
    if not keepdims:
        grad = grad.reshape(tuple(1 if i in axes else n for i, n in enumerate(shape)))
    return grad


class Sum(Function):
    @staticmethod
    def forward(ctx, a, axis=None, keepdims=False):
        ctx.shape, ctx.axes, ctx.keepdims = a.shape, _norm_axis(axis, a.ndim), keepdims
        return a.sum(axis=ctx.axes, keepdims=keepdims)

    @staticmethod
    def backward(ctx, grad):
        xp = get_xp(grad)
        return (xp.broadcast_to(_expand_reduced(grad, ctx.shape, ctx.axes, ctx.keepdims), ctx.shape),)


class Mean(Function):
    @staticmethod
    def forward(ctx, a, axis=None, keepdims=False):
        ctx.shape, ctx.axes, ctx.keepdims = a.shape, _norm_axis(axis, a.ndim), keepdims
        count = 1
        for ax in ctx.axes:
            count *= a.shape[ax]
        ctx.count = count
        return a.mean(axis=ctx.axes, keepdims=keepdims)

    @staticmethod
    def backward(ctx, grad):
        xp = get_xp(grad)
        g = _expand_reduced(grad, ctx.shape, ctx.axes, ctx.keepdims) * (1.0 / ctx.count)
        return (xp.broadcast_to(g.astype(grad.dtype, copy=False), ctx.shape),)


class Max(Function):
    """Maximum over axes. Ties share the gradient equally, so the result does not depend on element order."""

    @staticmethod
    def forward(ctx, a, axis=None, keepdims=False):
        ctx.axes, ctx.keepdims = _norm_axis(axis, a.ndim), keepdims
        out = a.max(axis=ctx.axes, keepdims=True)
        ctx.hit = a == out
        return out if keepdims else out.reshape(tuple(n for i, n in enumerate(a.shape) if i not in ctx.axes))

    @staticmethod
    def backward(ctx, grad):
        hit = ctx.hit
        g = _expand_reduced(grad, hit.shape, ctx.axes, ctx.keepdims)
        share = hit / hit.sum(axis=ctx.axes, keepdims=True)
        return ((share * g).astype(grad.dtype, copy=False),)


# --- shape ops ------------------------------------------------------------------------------------------------
class Reshape(Function):
    @staticmethod
    def forward(ctx, a, shape):
        ctx.shape = a.shape
        try:
            return a.reshape(shape)
        except ValueError:
            raise ValueError(f"reshape: cannot reshape a tensor of shape {a.shape} into {tuple(shape)}") from None

    @staticmethod
    def backward(ctx, grad):
        return (grad.reshape(ctx.shape),)


class Transpose(Function):
    """Permute axes (all reversed when ``axes`` is None); the backward applies the inverse permutation."""

    @staticmethod
    def forward(ctx, a, axes=None):
        axes = tuple(reversed(range(a.ndim))) if axes is None else tuple(ax % a.ndim for ax in axes)
        if sorted(axes) != list(range(a.ndim)):
            raise ValueError(f"transpose: axes {axes} are not a permutation of the {a.ndim} dims of {a.shape}")
        ctx.inverse = tuple(sorted(range(a.ndim), key=lambda i: axes[i]))
        return a.transpose(axes)

    @staticmethod
    def backward(ctx, grad):
        return (grad.transpose(ctx.inverse),)


def _is_basic_index(index) -> bool:
    """True when indexing makes a view (ints, slices, None, Ellipsis): the backward may assign, not add."""
    items = index if isinstance(index, tuple) else (index,)
    return all(i is None or i is Ellipsis or isinstance(i, int | slice) for i in items)


def _is_increasing(index) -> bool:
    """True for one 1-D integer array of strictly increasing indices (the model's Part-B rows, from flatnonzero):
    no element repeats, so the backward may assign instead of the much slower scatter-add."""
    if isinstance(index, tuple) or getattr(index, "ndim", None) != 1 or index.dtype.kind not in "iu":
        return False
    if len(index) and index[0] < 0:  # -1 and n - 1 are the same element
        return False
    return len(index) < 2 or bool((index[1:] > index[:-1]).all())


class GetItem(Function):
    """``a[index]`` for slices, None, Ellipsis, ints and integer/boolean arrays.

    Backward scatters the gradient into zeros of the input's shape; integer arrays may repeat an element, so that
    case adds with ``scatter_add`` instead of assigning.
    """

    @staticmethod
    def forward(ctx, a, index):
        ctx.a, ctx.index = a, index
        try:
            return a[index]
        except IndexError as e:
            raise IndexError(f"getitem: index {index!r} does not fit a tensor of shape {a.shape}: {e}") from None

    @staticmethod
    def backward(ctx, grad):
        xp = get_xp(grad)
        # zeros laid out in memory like the input (order "K"): when the input is a permuted view, as q, k and v of
        # the attention are, the gradient flows back through the permute and reshape as views, without a copy
        out = xp.zeros_like(ctx.a, order="K")
        if _is_basic_index(ctx.index) or _is_increasing(ctx.index):
            out[ctx.index] = grad
        else:
            scatter_add(out, ctx.index, grad)
        return (out,)
