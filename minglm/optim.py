"""AdamW over one flat buffer, the learning-rate schedule, gradient clipping: how minglm updates its weights.

docs/official-code.md §4: GLM trains with Adam + decoupled weight decay 0.1, gradient clipping at 1.0 and a linear
warmup followed by a cosine decay. minglm uses GLM-10B's betas (0.9, 0.95) and eps 1e-8 and decays to 10 % of the peak.

**One flat buffer.** A model has dozens of parameter tensors. Updating them one by one costs a Python loop and a
dozen small NumPy calls per tensor. Instead, ``AdamW`` copies every parameter into one contiguous float32 vector and
rebinds each ``param.data`` to a *view* of its slice: the model keeps working as before, but the optimizer can update
all weights with about ten vectorised passes over long arrays (m, v, the update, the decay). The gradients are gathered
into a second flat buffer (one copy per tensor), because the autograd engine rebinds ``.grad`` to fresh arrays.
Consequence: nothing may rebind a parameter's ``.data`` after the optimizer is built (load weights with
``param.data[...] = array``, or move the model to the GPU *before* building the optimizer). ``step`` checks this and
raises a clear error instead of silently training a detached copy.

**Which weights decay** (``decays(name, param)``): a parameter decays when it is a matrix or a table (``ndim >= 2``:
linear weights, the token and both position embeddings, as in GLM), and never when it is 1-D (every bias and every
LayerNorm weight/bias), or when its name says it is a bias or a norm (``...bias``, ``ln``/``norm`` in a name part).
Decayed parameters are placed first in the flat buffer so the decay is one pass over a prefix.

The update, per element, at step t (1-based), lr = the scheduled learning rate:
    p ← p − lr·wd·p                      (decoupled decay, only on the decayed prefix)
    m ← β1·m + (1−β1)·g,   v ← β2·v + (1−β2)·g²
    p ← p − (lr / (1−β1^t)) · m / (sqrt(v) / sqrt(1−β2^t) + eps)
which is PyTorch's ``torch.optim.AdamW`` formula.

Left out: parameter groups with other hyper-parameters, mixed precision / loss scaling, ZeRO-style sharding.
"""

from __future__ import annotations

import math

import numpy as np

from minglm import parallel
from minglm.backend import get_xp, to_device, to_numpy
from minglm.tensor import Tensor

# --- which parameters decay -----------------------------------------------------------------------------------


def decays(name: str, param) -> bool:
    """True when weight decay applies to this parameter (see the module docstring for the rule)."""
    if param.ndim < 2:
        return False
    parts = name.lower().replace("/", ".").split(".")
    if parts[-1] in ("bias", "b") or parts[-1].endswith("_bias"):
        return False
    return not any(p.startswith("ln") or "norm" in p for p in parts)


def _named(params) -> list[tuple[str, Tensor]]:
    """Accept a Module (named_parameters()), a dict name -> Tensor, or an iterable of (name, Tensor) / Tensor."""
    if hasattr(params, "named_parameters"):
        items = list(params.named_parameters())
    elif isinstance(params, dict):
        items = list(params.items())
    else:
        items = []
        for i, p in enumerate(params):
            items.append(p if isinstance(p, tuple) else (f"param{i}", p))
    if not items:
        raise ValueError("AdamW: got no parameters to optimise")
    for name, p in items:
        if not isinstance(p, Tensor):
            raise ValueError(f"AdamW: parameter {name!r} is a {type(p).__name__}, not a Tensor")
        if p.dtype != np.float32:
            raise ValueError(f"AdamW: parameter {name!r} has dtype {p.dtype}; the flat buffer is float32")
    names = [n for n, _ in items]
    if len(set(names)) != len(names):
        raise ValueError("AdamW: parameter names must be unique")
    return items


# --- the learning-rate schedule -------------------------------------------------------------------------------


def lr_at(step: int, peak_lr: float, warmup_steps: int, total_steps: int, min_ratio: float = 0.1) -> float:
    """The learning rate for optimizer step ``step`` (0-based: the first update is step 0).

    Linear warmup: lr = peak·(step+1)/warmup for step < warmup, so the first update is small but not zero.
    Then cosine from the peak (at step = warmup) down to min_ratio·peak (at step = total_steps), flat afterwards.
    """
    if step < 0:
        raise ValueError(f"lr_at: step must be >= 0, got {step}")
    if warmup_steps < 0 or total_steps < 1 or not 0.0 <= min_ratio <= 1.0:
        raise ValueError(
            f"lr_at: need warmup_steps >= 0, total_steps >= 1, 0 <= min_ratio <= 1; "
            f"got warmup_steps={warmup_steps}, total_steps={total_steps}, min_ratio={min_ratio}"
        )
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    min_lr = peak_lr * min_ratio
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class CosineSchedule:
    """``lr_at`` with its settings bound: ``CosineSchedule(3e-3, 100, 2000)(step)``."""

    def __init__(self, peak_lr: float, warmup_steps: int, total_steps: int, min_ratio: float = 0.1):
        lr_at(0, peak_lr, warmup_steps, total_steps, min_ratio)  # validates the settings
        self.peak_lr, self.warmup_steps = peak_lr, warmup_steps
        self.total_steps, self.min_ratio = total_steps, min_ratio

    def __call__(self, step: int) -> float:
        return lr_at(step, self.peak_lr, self.warmup_steps, self.total_steps, self.min_ratio)

    lr_at = __call__


# --- clipping -------------------------------------------------------------------------------------------------


def clip_by_global_norm(flat_grad, max_norm: float) -> float:
    """Scale ``flat_grad`` in place so its L2 norm is at most ``max_norm``; return the norm *before* clipping.

    The norm is accumulated in float64 (one dot product), so it does not depend on summation order quirks of float32.
    A non-finite norm is returned as is and the gradient is left alone (the trainer's guard deals with it).
    """
    xp = get_xp(flat_grad)
    g64 = flat_grad.astype(xp.float64)
    norm = math.sqrt(float(xp.dot(g64, g64)))
    if max_norm > 0 and math.isfinite(norm) and norm > max_norm:
        flat_grad *= np.float32(max_norm / (norm + 1e-6))
    return norm


# --- AdamW ----------------------------------------------------------------------------------------------------


def _scale_rows(x, factor) -> None:
    x *= factor


def adamw_rows(p, g, m, v, t1, t2, b1: float, b2: float, inv_sqrt_bc2: float, eps: float, step: float) -> None:
    """One Adam step on slices of the flat buffers, in place (t1, t2 are scratch): m = b1·m + (1 − b1)·g,
    v = b2·v + (1 − b2)·g², p −= step · m / (√v / √(1 − b2^t) + eps), with step = lr / (1 − b1^t). Every pass is
    elementwise, so ``AdamW.step`` runs it on pieces of the buffers on every core (``parallel.map_rows``)."""
    xp = get_xp(p)
    m *= np.float32(b1)
    xp.multiply(g, np.float32(1.0 - b1), out=t1)
    m += t1
    v *= np.float32(b2)
    xp.multiply(g, g, out=t1)
    t1 *= np.float32(1.0 - b2)
    v += t1
    xp.sqrt(v, out=t1)
    t1 *= np.float32(inv_sqrt_bc2)
    t1 += np.float32(eps)
    xp.divide(m, t1, out=t2)
    t2 *= np.float32(step)
    p -= t2


class AdamW:
    """AdamW with every parameter a view into one flat float32 buffer (see the module docstring).

    Typical step::

        opt.zero_grad(); loss.backward()
        norm = opt.clip_grad_norm(1.0)      # gathers the gradients, clips, returns the pre-clip norm
        opt.step(lr)                        # lr from the schedule (defaults to opt.lr)
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.1):
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0) or eps <= 0 or weight_decay < 0 or lr < 0:
            raise ValueError(f"AdamW: bad hyper-parameters lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        self.lr, self.eps, self.weight_decay = float(lr), float(eps), float(weight_decay)
        self.betas = (float(betas[0]), float(betas[1]))
        items = _named(params)
        # decayed parameters first, so the decay is one pass over flat[:n_decay]; stable order otherwise
        items = [it for it in items if decays(*it)] + [it for it in items if not decays(*it)]
        self.names = [n for n, _ in items]
        self.params = [p for _, p in items]
        self.decayed = {n: decays(n, p) for n, p in items}
        xp = get_xp(self.params[0].data)
        self.xp = xp
        sizes = [p.data.size for p in self.params]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.n_decay = int(sum(s for s, (n, _) in zip(sizes, items) if self.decayed[n]))
        n = int(self.offsets[-1])
        self.flat = xp.empty(n, dtype=np.float32)  # the parameters (each param.data is a view of a slice)
        self.flat_grad = xp.zeros(n, dtype=np.float32)
        self.m = xp.zeros(n, dtype=np.float32)  # first moment
        self.v = xp.zeros(n, dtype=np.float32)  # second moment
        self._tmp = xp.empty(n, dtype=np.float32)  # scratch, reused every step (no fresh big allocation)
        self._tmp2 = xp.empty(n, dtype=np.float32)
        self.views = []
        for p, a, b in zip(self.params, self.offsets[:-1], self.offsets[1:]):
            if get_xp(p.data) is not xp:
                raise ValueError("AdamW: all parameters must be on the same device")
            view = self.flat[a:b].reshape(p.shape)
            view[...] = p.data
            p.data = view
            self.views.append(view)
        self.t = 0  # number of updates done
        self._gathered = False

    @property
    def num_elements(self) -> int:
        return int(self.offsets[-1])

    def zero_grad(self) -> None:
        """Forget the gradients (the engine accumulates into ``.grad`` until this is called)."""
        for p in self.params:
            p.grad = None
        self._gathered = False

    def gather_grads(self):
        """Copy every ``param.grad`` into ``flat_grad`` (zeros where a parameter got no gradient); returns it."""
        for p, a, b in zip(self.params, self.offsets[:-1], self.offsets[1:]):
            if p.grad is None:
                self.flat_grad[a:b] = 0.0
            else:
                self.flat_grad[a:b] = p.grad.reshape(-1)
        self._gathered = True
        return self.flat_grad

    def grad_norm(self) -> float:
        """The global L2 norm of the current gradients (gathering them first)."""
        if not self._gathered:
            self.gather_grads()
        return clip_by_global_norm(self.flat_grad, 0.0)

    def clip_grad_norm(self, max_norm: float) -> float:
        """Gather the gradients, clip their global norm to ``max_norm``, return the norm before clipping."""
        if not self._gathered:
            self.gather_grads()
        return clip_by_global_norm(self.flat_grad, max_norm)

    def _check_views(self) -> None:
        for name, p, view in zip(self.names, self.params, self.views):
            if p.data is not view:
                raise RuntimeError(
                    f"AdamW: parameter {name!r} had its .data rebound after the optimizer was built, so the optimizer "
                    "would update a stale copy. Copy new values in place (param.data[...] = array) or rebuild AdamW."
                )

    def step(self, lr: float | None = None) -> None:
        """One AdamW update with learning rate ``lr`` (default ``self.lr``) from the gathered gradients."""
        self._check_views()
        if not self._gathered:
            self.gather_grads()
        lr = self.lr if lr is None else float(lr)
        b1, b2 = self.betas
        self.t += 1
        g, m, v, tmp, tmp2, flat = self.flat_grad, self.m, self.v, self._tmp, self._tmp2, self.flat
        bc1 = 1.0 - b1**self.t
        bc2 = 1.0 - b2**self.t
        decay = np.float32(1.0 - lr * self.weight_decay)
        n_decay = self.n_decay if self.weight_decay else 0

        if n_decay:  # decoupled weight decay on the decayed prefix, before the Adam step (as PyTorch)
            parallel.map_rows(_scale_rows, flat[:n_decay], args=(decay,))
        parallel.map_rows(adamw_rows, flat, g, m, v, tmp, tmp2,
                          args=(b1, b2, 1.0 / math.sqrt(bc2), self.eps, lr / bc1))
        self._gathered = False

    # --- exact save / restore ---------------------------------------------------------------------------------
    def layout(self) -> list[list]:
        """[[name, shape], ...] in flat-buffer order: a checkpoint's optimizer state only fits the same layout."""
        return [[n, list(p.shape)] for n, p in zip(self.names, self.params)]

    def state_dict(self) -> dict:
        """Everything needed to continue bit for bit: the moments (NumPy copies), the step and the settings."""
        return {
            "t": self.t,
            "m": to_numpy(self.m).copy(),
            "v": to_numpy(self.v).copy(),
            "lr": self.lr,
            "betas": list(self.betas),
            "eps": self.eps,
            "weight_decay": self.weight_decay,
            "layout": self.layout(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()`` output; checks the layout first and changes nothing when it does not fit."""
        layout = [[n, list(s)] for n, s in state.get("layout", self.layout())]
        if layout != self.layout():
            mine, theirs = dict(self.layout()), dict(layout)
            diff = sorted(set(mine) ^ set(theirs))  # names only one side has
            diff += sorted(n for n in set(mine) & set(theirs) if mine[n] != theirs[n])  # same name, other shape
            raise ValueError(
                f"AdamW.load_state_dict: the saved state is for other parameters (differences: {diff[:5]})"
            )
        for key in ("m", "v"):
            arr = np.asarray(state[key])
            if arr.shape != (self.num_elements,) or arr.dtype != np.float32:
                raise ValueError(f"AdamW.load_state_dict: {key} must be float32 of shape ({self.num_elements},), "
                                 f"got {arr.dtype} {arr.shape}")
        self.m[...] = to_device(np.asarray(state["m"]), self.xp)
        self.v[...] = to_device(np.asarray(state["v"]), self.xp)
        self.t = int(state["t"])
        self.lr = float(state.get("lr", self.lr))
        self.betas = tuple(float(b) for b in state.get("betas", self.betas))
        self.eps = float(state.get("eps", self.eps))
        self.weight_decay = float(state.get("weight_decay", self.weight_decay))
        self._gathered = False


def parameters_decayed(params) -> dict[str, bool]:
    """name -> whether it decays, for a Module or named parameters (handy to print or test the rule)."""
    return {n: decays(n, p) for n, p in _named(params)}
