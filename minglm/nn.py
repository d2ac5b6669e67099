"""Layers with parameters: the ``Module`` container and the handful of layers GLM is built from.

A ``Module`` keeps its parameters and sub-modules in the order they are assigned as attributes, which gives every
parameter a dotted name (``layers.0.attention.query_key_value.weight``). Those names are what ``state_dict`` saves,
what ``load_state_dict`` checks, and what optimisers iterate over. The layers are thin: the maths and the
gradients live in ``minglm.functional``; a layer only owns its parameters and picks the op.

Each layer has two ways in. ``forward`` takes Tensors and records the graph (training, and the readable reference).
``infer`` takes plain arrays and returns one, with the same arithmetic from the same ``functional`` helpers but no
Tensor objects, no graph and no dropout: decoding one token is a chain of tiny products whose time is per-call
overhead, and ``infer`` cuts that overhead about in half. The tests hold the two paths to the same logits.

Initialisation takes one seeded ``numpy.random.Generator`` passed in explicitly, never the global NumPy state, so a
seed fixes every weight. Parameters are created in float32 (``Module.astype`` casts them, e.g. to float64 for
gradient checks).

Left out on purpose: buffers, hooks, ``register_*`` helpers, parameter sharing between modules (GLM ties its output
head by calling ``F.linear`` with the embedding table instead) and lazy shapes.

Reference: docs/official-code.md §3 (Linear weights stored (out, in) like the official checkpoints, LayerNorm eps 1e-5).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

import minglm.functional as F
from minglm.backend import device_xp, get_xp, to_device, to_numpy
from minglm.tensor import Tensor


class Parameter(Tensor):
    """A leaf tensor that a Module owns and an optimiser updates: always ``requires_grad=True``, floating point."""

    def __init__(self, data, dtype=None):
        super().__init__(data, requires_grad=True, dtype=dtype)

    def __repr__(self) -> str:
        return f"Parameter(shape={self.shape}, dtype={self.dtype})"


class Module:
    """Base class: assign Parameters and Modules as attributes and they are registered, in order.

    Subclasses define ``forward``; calling the module calls it. ``training`` switches dropout on and off.
    """

    def __init__(self):
        # object.__setattr__ because our own __setattr__ expects these dicts to exist already
        object.__setattr__(self, "_parameters", {})
        object.__setattr__(self, "_modules", {})
        object.__setattr__(self, "training", True)

    def __setattr__(self, name: str, value) -> None:
        if "_parameters" not in self.__dict__:
            raise RuntimeError(f"{type(self).__name__}: call Module.__init__() before assigning attributes")
        self._parameters.pop(name, None)
        self._modules.pop(name, None)
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):  # pragma: no cover - the abstract base; every layer overrides it
        raise NotImplementedError(f"{type(self).__name__} must define forward()")

    # --- walking the tree ---------------------------------------------------------------------------------------
    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        yield prefix, self
        for name, m in self._modules.items():
            yield from m.named_modules(f"{prefix}.{name}" if prefix else name)

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        """(dotted name, Parameter) for this module's own parameters, then each sub-module's, in assignment order."""
        for mod_name, mod in self.named_modules(prefix):
            for name, p in mod._parameters.items():
                yield (f"{mod_name}.{name}" if mod_name else name), p

    def parameters(self) -> list[Parameter]:
        return [p for _, p in self.named_parameters()]

    def num_parameters(self) -> int:
        return sum(p.size for p in self.parameters())

    # --- modes and gradients -----------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> Module:
        for _, m in self.named_modules():
            object.__setattr__(m, "training", bool(mode))
        return self

    def eval(self) -> Module:
        return self.train(False)

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    # --- saving and loading ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """name -> a NumPy copy of each parameter (copied, so later training does not change a saved state)."""
        return {name: np.array(to_numpy(p.data), copy=True) for name, p in self.named_parameters()}

    def load_state_dict(self, state: dict, strict: bool = True) -> tuple[list[str], list[str]]:
        """Copy arrays into the parameters, in place (optimisers holding views of them stay valid).

        ``strict`` (the default) raises a KeyError listing missing and unexpected names. A shape mismatch always
        raises a ValueError naming the key and both shapes. Values are cast to each parameter's dtype.
        Returns (missing, unexpected) names, which are empty when strict.
        """
        params = dict(self.named_parameters())
        missing = [k for k in params if k not in state]
        unexpected = [k for k in state if k not in params]
        if strict and (missing or unexpected):
            raise KeyError(
                f"load_state_dict({type(self).__name__}): missing keys {missing}, unexpected keys {unexpected}"
            )
        for name, p in params.items():
            if name not in state:
                continue
            value = state[name]
            shape = tuple(value.shape)
            if shape != p.shape:
                raise ValueError(
                    f"load_state_dict({type(self).__name__}): '{name}' has shape {shape} in the state dict "
                    f"but {p.shape} in the model"
                )
        for name, p in params.items():  # only after every shape was checked, so a failed load changes nothing
            if name in state:
                xp = get_xp(p.data)
                p.data[...] = to_device(np.asarray(to_numpy(state[name])), xp).astype(p.dtype, copy=False)
        return missing, unexpected

    # --- devices and dtypes ------------------------------------------------------------------------------------
    def to(self, device: str) -> Module:
        """Move every parameter (and its gradient) to 'cpu' (NumPy) or 'gpu' (CuPy), in place; returns self."""
        xp = device_xp(device)
        for p in self.parameters():
            p.data = to_device(p.data, xp)
            if p.grad is not None:
                p.grad = to_device(p.grad, xp)
        return self

    def astype(self, dtype) -> Module:
        """Cast every parameter to ``dtype`` in place (e.g. float64 for gradient checks); gradients are dropped."""
        for p in self.parameters():
            p.data = p.data.astype(dtype)
            p.grad = None
        return self

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, m in self._modules.items():
            lines.append("  " + f"({name}): {m!r}".replace("\n", "\n  "))
        return "\n".join(lines) + ")" if len(lines) > 1 else lines[0] + ")"

    def extra_repr(self) -> str:
        return ""


class ModuleList(Module):
    """A list of modules, registered under the names "0", "1", ... (so a parameter is ``layers.3.mlp...``)."""

    def __init__(self, modules=()):
        super().__init__()
        self._items: list[Module] = []
        for m in modules:
            self.append(m)

    def append(self, module: Module) -> ModuleList:
        if not isinstance(module, Module):
            raise TypeError(f"ModuleList.append: expected a Module, got {type(module).__name__}")
        setattr(self, str(len(self._items)), module)
        self._items.append(module)
        return self

    def __getitem__(self, i: int) -> Module:
        return self._items[i]

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Module]:
        return iter(self._items)


def _normal(rng: np.random.Generator, shape: tuple, std: float) -> np.ndarray:
    """N(0, std²) float32 samples from the given generator."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"initialisation needs a numpy.random.Generator, got {type(rng).__name__}")
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(np.float32, copy=False)


class Linear(Module):
    """y = x Wᵀ + b, ``weight`` (out, in) as in PyTorch and the official GLM checkpoints; init N(0, std²), b = 0."""

    def __init__(self, in_features: int, out_features: int, rng: np.random.Generator, bias: bool = True,
                 std: float = 0.02):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = Parameter(_normal(rng, (out_features, in_features), std))  # (out, in)
        self.bias = Parameter(np.zeros(out_features, dtype=np.float32)) if bias else None  # (out,)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def infer(self, x):
        """``forward`` on a plain array, without the graph (decoding): (..., in) -> (..., out)."""
        y = x @ self.weight.data.T
        if self.bias is not None:
            y += self.bias.data
        return y

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}"


class Embedding(Module):
    """A (num_embeddings, dim) lookup table, init N(0, std²); forward takes integer ids of any shape."""

    def __init__(self, num_embeddings: int, dim: int, rng: np.random.Generator, std: float = 0.02):
        super().__init__()
        self.num_embeddings, self.dim = num_embeddings, dim
        self.weight = Parameter(_normal(rng, (num_embeddings, dim), std))  # (num_embeddings, dim)

    def forward(self, ids) -> Tensor:
        return F.embedding(ids, self.weight)

    def infer(self, ids):
        """``forward`` on a plain int array, without the graph: the rows of the table, ids.shape + (dim,)."""
        return self.weight.data[ids]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.dim}"


class LayerNorm(Module):
    """LayerNorm over the last dim with γ = 1, β = 0 at init; eps 1e-5 as in GLM (apex FusedLayerNorm)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.dim, self.eps = dim, float(eps)
        self.weight = Parameter(np.ones(dim, dtype=np.float32))  # (dim,) γ
        self.bias = Parameter(np.zeros(dim, dtype=np.float32))  # (dim,) β

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.weight, self.bias, self.eps)

    def infer(self, x):
        """``forward`` on a plain (N, dim) array, without the graph (decoding)."""
        return F.layer_norm_array(x, self.weight.data, self.bias.data, self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


class Dropout(Module):
    """Inverted dropout, active only in training mode; the random generator is passed at call time."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1), got {p}")
        self.p = float(p)

    def forward(self, x: Tensor, rng: np.random.Generator | None = None) -> Tensor:
        return F.dropout(x, self.p, self.training, rng)

    def extra_repr(self) -> str:
        return f"p={self.p}"
