"""Tensor and reverse-mode autograd: the engine everything in minglm stands on.

A ``Tensor`` wraps an array (``.data``, NumPy or CuPy) and, when it was made by an op on tensors that need
gradients, the ``Function`` node that made it (``.grad_fn``). ``backward()`` walks those nodes in reverse
topological order and applies the chain rule.

The rules this file keeps, each in exactly one place:
- one ``Function`` subclass per op, with ``forward(ctx, *arrays)`` and ``backward(ctx, grad)`` written naively
  for the output's shape;
- broadcasting is undone here (``_unbroadcast``): every gradient is summed back to its input's shape, and the
  shape and dtype are asserted, so an op's backward never has to think about it;
- the topological sort is iterative, so a graph of any depth works (no recursion limit);
- leaf gradients accumulate in ``.grad`` until they are zeroed;
- the graph's saved arrays are freed after ``backward()`` unless ``retain_graph=True``; a second backward through a
  freed node raises an error that names the op, instead of returning wrong numbers.

Left out on purpose: higher-order gradients (backward builds no graph), in-place ops on tensors, and hooks.
"""

from __future__ import annotations

import contextlib
from types import ModuleType

import numpy as np

from minglm.backend import default_xp, device_xp, get_xp, is_cupy, to_device, to_numpy

_grad_enabled = [True]  # a list so the context manager can flip it without `global`


def is_grad_enabled() -> bool:
    return _grad_enabled[0]


class no_grad(contextlib.ContextDecorator):
    """Context manager (and decorator) that stops ops from recording the graph: for evaluation and decoding."""

    def __enter__(self):
        self._prev = _grad_enabled[0]
        _grad_enabled[0] = False
        return self

    def __exit__(self, *exc):
        _grad_enabled[0] = self._prev
        return False


class Function:
    """One differentiable op. Subclasses define two static methods:

    - ``forward(ctx, *args, **kwargs) -> array``: compute with ``xp`` (from ``get_xp``), store on ``ctx`` what the
      backward needs. Tensor arguments arrive as their raw arrays.
    - ``backward(ctx, grad) -> tuple``: one gradient (or None) per positional argument of ``forward``.

    ``apply`` runs the forward and, when gradients are needed, records the node. ``ctx`` *is* the node: it is the
    Function instance, reachable as ``out.grad_fn``, with ``.inputs`` (the Tensor arguments, None for constants).
    """

    inputs: tuple = ()
    needs_input_grad: tuple = ()  # set by apply before forward: which positional arguments need a gradient
    retain_graph: bool = False  # set by backward(): True when this node's saved arrays must stay intact
    freed: bool = False

    @property
    def name(self) -> str:
        return type(self).__name__

    @classmethod
    def apply(cls, *args, **kwargs) -> Tensor:
        ctx = cls()
        arrays = [a.data if isinstance(a, Tensor) else a for a in args]
        ctx.needs_input_grad = tuple(_grad_enabled[0] and isinstance(a, Tensor) and a.requires_grad for a in args)
        out = cls.forward(ctx, *arrays, **kwargs)
        if isinstance(out, np.generic):  # NumPy reductions return scalars; keep every .data a real (0-d) array
            out = np.asarray(out)
        # only floating-point results carry gradients (a cast to int cuts the graph)
        needs_grad = any(ctx.needs_input_grad) and out.dtype.kind == "f"
        result = Tensor._wrap(out, needs_grad)
        if needs_grad:
            ctx.inputs = tuple(a if isinstance(a, Tensor) else None for a in args)
            result.grad_fn = ctx
        return result

    @staticmethod
    def forward(ctx, *args, **kwargs):  # pragma: no cover - the abstract base; every op overrides it
        raise NotImplementedError("a Function subclass must define forward(ctx, *args)")

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - the abstract base; every op overrides it
        raise NotImplementedError("a Function subclass must define backward(ctx, grad)")

    def free(self) -> None:
        """Drop the arrays saved for backward; the node stays in the graph, marked freed."""
        keep = {"inputs": self.inputs}
        self.__dict__.clear()
        self.__dict__.update(keep)
        self.freed = True

    def __repr__(self) -> str:
        return f"<{self.name}>"


def _unbroadcast(grad, shape: tuple, op: str):
    """Sum ``grad`` down to ``shape``, undoing NumPy broadcasting; the one place this happens."""
    if grad.shape == shape:
        return grad
    extra = grad.ndim - len(shape)
    if extra < 0:
        raise RuntimeError(f"{op}: gradient of shape {grad.shape} has fewer dims than its input {shape}")
    if extra:
        grad = grad.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if axes:
        grad = grad.sum(axis=axes, keepdims=True)
    if grad.shape != shape:
        raise RuntimeError(f"{op}: gradient of shape {grad.shape} cannot be summed to its input's shape {shape}")
    return grad


def _as_array(data, dtype, xp: ModuleType | None):
    """Turn user data into an array on the right backend; Python floats become float32 like in PyTorch."""
    if isinstance(data, Tensor):
        data = data.data
    if xp is None:
        xp = get_xp(data) if (is_cupy(data) or isinstance(data, np.ndarray)) else default_xp()
    if dtype is None and not hasattr(data, "dtype"):
        probe = np.asarray(data)
        dtype = np.float32 if probe.dtype.kind == "f" else probe.dtype
    return to_device(data, xp).astype(dtype, copy=False) if dtype is not None else to_device(data, xp)


class Tensor:
    """An array plus what autograd needs: ``grad``, ``requires_grad`` and the node ``grad_fn`` that made it."""

    __array_priority__ = 100  # so `ndarray * Tensor` calls Tensor.__rmul__

    def __init__(self, data, requires_grad: bool = False, dtype=None):
        self.data = _as_array(data, dtype, None)
        if requires_grad and self.data.dtype.kind != "f":
            raise ValueError(f"requires_grad needs a floating-point tensor, got dtype {self.data.dtype}")
        self.requires_grad = bool(requires_grad)
        self.grad = None
        self.grad_fn: Function | None = None

    @classmethod
    def _wrap(cls, array, requires_grad: bool) -> Tensor:
        """Wrap an op's output array without copying or converting it."""
        t = cls.__new__(cls)
        t.data = array
        t.requires_grad = requires_grad
        t.grad = None
        t.grad_fn = None
        return t

    # --- plain properties -------------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple:
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def size(self) -> int:
        return self.data.size

    @property
    def device(self) -> str:
        return "gpu" if is_cupy(self.data) else "cpu"

    @property
    def T(self) -> Tensor:
        return self.transpose()

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        grad = ", requires_grad=True" if self.requires_grad else ""
        if self.grad_fn is not None:
            grad = f", grad_fn={self.grad_fn.name}"
        return f"Tensor({to_numpy(self.data)!r}{grad})"

    def numpy(self) -> np.ndarray:
        """The data as a NumPy array (copied from the GPU when needed)."""
        return to_numpy(self.data)

    def item(self):
        return self.data.item()

    def detach(self) -> Tensor:
        """The same data, cut from the graph."""
        return Tensor._wrap(self.data, False)

    def to(self, device: str) -> Tensor:
        """A leaf copy of this tensor on 'cpu' (NumPy) or 'gpu' (CuPy), keeping requires_grad."""
        xp = device_xp(device)
        if get_xp(self.data) is xp:
            return self
        return Tensor._wrap(to_device(self.data, xp), self.requires_grad)

    def astype(self, dtype) -> Tensor:
        return ops.Cast.apply(self, dtype=np.dtype(dtype))

    # --- autograd -----------------------------------------------------------------------------------------------
    def backward(self, grad=None, retain_graph: bool = False) -> None:
        """Accumulate d(self)/d(leaf) · grad into every leaf's ``.grad``.

        ``grad`` defaults to 1 for a scalar; a non-scalar needs one. The graph is freed afterwards unless
        ``retain_graph`` is set.
        """
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad (no leaf asked for gradients)")
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError(
                    f"backward() on a non-scalar tensor of shape {self.shape} needs an explicit gradient "
                    "of the same shape (or reduce it to a scalar first, e.g. with .sum() or .mean())"
                )
            grad = get_xp(self.data).ones_like(self.data)
        else:
            grad = grad.data if isinstance(grad, Tensor) else grad
            if tuple(grad.shape) != self.shape:
                raise ValueError(f"backward(): gradient shape {tuple(grad.shape)} != tensor shape {self.shape}")
            grad = grad.astype(self.dtype, copy=False)

        order = self._topological_order()
        grads = {id(self): grad}
        for node in order:  # outputs before inputs
            g = grads.pop(id(node), None)
            if g is None:
                continue
            fn = node.grad_fn
            if fn is None:  # a leaf: accumulate
                if node.requires_grad:
                    node.grad = g.copy() if node.grad is None else node.grad + g
                continue
            if fn.freed:
                raise RuntimeError(
                    f"backward through {fn.name} a second time: its saved arrays were freed by the first "
                    "backward(). Pass retain_graph=True to the first call if you need to go through it twice."
                )
            fn.retain_graph = retain_graph  # lets an op reuse its saved buffers when the graph is freed anyway
            in_grads = fn.backward(fn, g)
            if not isinstance(in_grads, tuple):
                in_grads = (in_grads,)
            if len(in_grads) != len(fn.inputs):
                raise RuntimeError(f"{fn.name}.backward returned {len(in_grads)} gradients for {len(fn.inputs)} inputs")
            if not retain_graph:
                fn.free()
            for inp, ig in zip(fn.inputs, in_grads):
                if inp is None or ig is None or not inp.requires_grad:
                    continue
                ig = _unbroadcast(ig, inp.shape, fn.name)
                if ig.dtype != inp.dtype:
                    raise RuntimeError(f"{fn.name}: gradient dtype {ig.dtype} differs from its input's {inp.dtype}")
                prev = grads.get(id(inp))
                grads[id(inp)] = ig if prev is None else prev + ig

    def _topological_order(self) -> list[Tensor]:
        """Tensors reachable from self through grad_fn, each after every tensor that consumes it (iterative DFS)."""
        order, visited = [], set()
        stack = [(self, False)]
        while stack:
            node, expanded = stack.pop()
            if expanded:
                order.append(node)
                continue
            if id(node) in visited:
                continue
            visited.add(id(node))
            stack.append((node, True))
            if node.grad_fn is not None:
                for inp in node.grad_fn.inputs:
                    if inp is not None and inp.requires_grad and id(inp) not in visited:
                        stack.append((inp, False))
        order.reverse()
        return order

    def zero_grad(self) -> None:
        self.grad = None

    # --- operators (the Functions live in minglm/ops.py) ------------------------------------------------
    def _const(self, other):
        """Wrap a Python scalar or array as a constant of this tensor's dtype and backend (no float64 upcast)."""
        if isinstance(other, Tensor):
            return other
        xp = get_xp(self.data)
        arr = xp.asarray(other)
        if arr.dtype.kind in "biuf" and self.dtype.kind == "f":
            arr = arr.astype(self.dtype, copy=False)
        return arr

    def __add__(self, other):
        return ops.Add.apply(self, self._const(other))

    def __radd__(self, other):
        return ops.Add.apply(self._const(other), self)

    def __sub__(self, other):
        return ops.Sub.apply(self, self._const(other))

    def __rsub__(self, other):
        return ops.Sub.apply(self._const(other), self)

    def __mul__(self, other):
        return ops.Mul.apply(self, self._const(other))

    def __rmul__(self, other):
        return ops.Mul.apply(self._const(other), self)

    def __truediv__(self, other):
        return ops.Div.apply(self, self._const(other))

    def __rtruediv__(self, other):
        return ops.Div.apply(self._const(other), self)

    def __pow__(self, other):
        return ops.Pow.apply(self, self._const(other))

    def __rpow__(self, other):
        return ops.Pow.apply(self._const(other), self)

    def __matmul__(self, other):
        return ops.MatMul.apply(self, self._const(other))

    def __rmatmul__(self, other):
        return ops.MatMul.apply(self._const(other), self)

    def __neg__(self):
        return ops.Neg.apply(self)

    def __getitem__(self, index):
        return ops.GetItem.apply(self, index=_index_to_data(index))

    def sum(self, axis=None, keepdims: bool = False):
        return ops.Sum.apply(self, axis=axis, keepdims=keepdims)

    def mean(self, axis=None, keepdims: bool = False):
        return ops.Mean.apply(self, axis=axis, keepdims=keepdims)

    def max(self, axis=None, keepdims: bool = False):
        return ops.Max.apply(self, axis=axis, keepdims=keepdims)

    def reshape(self, *shape):
        if len(shape) == 1 and isinstance(shape[0], tuple | list):
            shape = tuple(shape[0])
        return ops.Reshape.apply(self, shape=shape)

    def transpose(self, *axes):
        if len(axes) == 1 and isinstance(axes[0], tuple | list):
            axes = tuple(axes[0])
        return ops.Transpose.apply(self, axes=axes or None)

    def permute(self, *axes):
        return self.transpose(*axes)

    def exp(self):
        return ops.Exp.apply(self)

    def log(self):
        return ops.Log.apply(self)

    def sqrt(self):
        return ops.Sqrt.apply(self)

    def tanh(self):
        return ops.Tanh.apply(self)

    # comparisons are elementwise, like NumPy's: boolean arrays wrapped as tensors without grad
    def __eq__(self, other):
        return Tensor._wrap(self.data == _raw(other), False)

    def __ne__(self, other):
        return Tensor._wrap(self.data != _raw(other), False)

    def __gt__(self, other):
        return Tensor._wrap(self.data > _raw(other), False)

    def __lt__(self, other):
        return Tensor._wrap(self.data < _raw(other), False)

    def __ge__(self, other):
        return Tensor._wrap(self.data >= _raw(other), False)

    def __le__(self, other):
        return Tensor._wrap(self.data <= _raw(other), False)

    __hash__ = object.__hash__  # a class that defines __eq__ loses its hash; a Tensor hashes by identity

    def __bool__(self) -> bool:
        """The truth of a one-element tensor; any other size raises, as in NumPy (``t == 0`` is elementwise, so
        ``if t == 0`` must not quietly mean "is any element 0")."""
        if self.data.size != 1:
            raise ValueError(f"the truth value of a Tensor of shape {self.shape} is ambiguous: compare its "
                             f".numpy() with .all() or .any()")
        return bool(self.data.reshape(()))


def _raw(x):
    return x.data if isinstance(x, Tensor) else x


def _index_to_data(index):
    """Replace Tensors inside an index by their arrays (integer-array indexing)."""
    if isinstance(index, tuple):
        return tuple(_raw(i) for i in index)
    return _raw(index)


from minglm import ops  # noqa: E402 - a real cycle: the ops subclass Function, defined above
