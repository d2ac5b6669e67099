"""Prefix tuning, P-tuning v2 style: fine-tune a frozen GLM through trained keys and values in every layer.

Prefix-Tuning (Li & Liang 2021) and P-Tuning v2 (Liu et al. 2022, "P-Tuning v2: Prompt Tuning Can Be Comparable to
Fine-tuning Universally Across Scales and Tasks", the method of GLM's own ChatGLM fine-tuning scripts) put P trained
vectors in front of the keys and the values of *every* layer, instead of a continuous prompt at the input only:

    attention(q, [K_p; K], [V_p; V]),     K_p, V_p (nh, P, hs) per layer, shared by every sequence

Everything the model had is frozen (``requires_grad = False``); a layer trains 2·P·C numbers, the model 2·L·P·C.
In GLM's terms the prefix is part of Part A: every query sees it (``sep`` grows by P) and it is never causal. It has
no position, so RoPE does not turn it. A KV cache holds the sequence's own keys only; the prefix goes in front of
them in ``attend``, so decoding with a cache works unchanged.

The keys and values start as those the frozen model itself computes for P random tokens of its vocabulary (Li &
Liang found an init from real activations better than a random one), so training starts from vectors of the right
scale. Unlike LoRA's zero-initialised B, a prefix does change the model at step 0: it takes a share of the attention.

``save_prefix`` writes the prefixes on their own (an ``.npz`` plus a ``.json``), a few KB beside the model.
Both paths carry the prefix: ``attend`` (Tensors, training) and ``attend_array`` (plain arrays, decoding).
Left out: the reparameterisation MLP of Prefix-Tuning (P-tuning v2's ``prefix_projection``, off by default there),
and prompt tokens at the input only (P-tuning v1, prompt tuning).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import minglm.functional as F
from minglm.backend import get_xp, to_device, to_numpy
from minglm.model import GLM, KVCache, SelfAttention
from minglm.nn import Module, Parameter
from minglm.tensor import Tensor, no_grad


class PrefixSelfAttention(SelfAttention):
    """A ``SelfAttention`` that keeps the base layer's own parameters (so names and checkpoints do not change) and
    adds ``prefix_key`` and ``prefix_value`` (nh, P, hs) in front of the keys and values it attends over."""

    def __init__(self, base: SelfAttention, key: np.ndarray, value: np.ndarray):
        Module.__init__(self)  # not SelfAttention.__init__: the weights are the base layer's, not new ones
        _take_over(base, self)
        self.prefix_key = Parameter(key)  # (nh, P, hs)
        self.prefix_value = Parameter(value)  # (nh, P, hs)

    @property
    def length(self) -> int:
        return self.prefix_key.shape[1]

    def attend(self, q: Tensor, k: Tensor, v: Tensor, sep, layer: int, rng=None, own=None) -> Tensor:
        B = q.shape[0]
        xp = get_xp(q.data)
        batch = Tensor._wrap(xp.zeros((B, 1, 1, 1), dtype=q.dtype), False)  # broadcasts the prefix over the batch
        k = F.concat([self.prefix_key[None] + batch, k], axis=2)  # (B, nh, P + Tk, hs)
        v = F.concat([self.prefix_value[None] + batch, v], axis=2)
        # the prefix is Part A: all queries see it
        return super().attend(q, k, v, sep + self.length, layer, rng, self._see_prefix(xp, own))

    def attend_array(self, q, k, v, sep, layer: int, own=None):
        """``attend`` on plain arrays (decoding through ``GLM.infer``): the same prefix in front."""
        xp = get_xp(q)
        shape = (q.shape[0],) + self.prefix_key.shape  # (B, nh, P, hs)
        k = xp.concatenate([xp.broadcast_to(self.prefix_key.data, shape), k], axis=2)
        v = xp.concatenate([xp.broadcast_to(self.prefix_value.data, shape), v], axis=2)
        return super().attend_array(q, k, v, sep + self.length, layer, self._see_prefix(xp, own))

    def _see_prefix(self, xp, own):
        """``own`` (B, 1, Tq, Tk) with the prefix's P columns in front, all visible; None stays None."""
        if own is None:
            return None
        return xp.concatenate([xp.ones(own.shape[:3] + (self.length,), dtype=bool), own], axis=-1)

    def extra_repr(self) -> str:
        return f"prefix={self.length}"


def _take_over(src: SelfAttention, dst: SelfAttention) -> None:
    """Give ``dst`` every setting (n_head, softmax_scaling, training, ...) and layer of ``src``, shared, not copied."""
    for name, value in vars(src).items():
        if not name.startswith(("_", "prefix_")):
            setattr(dst, name, value)


def prefix_layers(model: Module) -> dict[str, PrefixSelfAttention]:
    """Every PrefixSelfAttention in the model by its dotted module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, PrefixSelfAttention)}


@no_grad()
def _activations(model: GLM, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The keys and values (L, nh, P, hs) the model computes for the tokens ``ids`` (P,), read from a KVCache."""
    xp = get_xp(model.word_embeddings.weight.data)
    P = len(ids)
    cache = KVCache(model, 1, P)
    was_training = model.training
    model.eval()
    try:
        model(xp.asarray(ids, dtype=np.int64)[None], xp.arange(P)[None], xp.zeros((1, P), dtype=np.int64),
              xp.asarray([P]), cache=cache)
    finally:
        model.train(was_training)
    return cache.k[:, 0].copy(), cache.v[:, 0].copy()


def apply_prefix(model: GLM, length: int = 16,
                 rng: np.random.Generator | None = None) -> dict[str, PrefixSelfAttention]:
    """Give every layer a trained prefix of ``length`` keys and values and freeze everything else.

    Returns the prefixed attention layers by name; only ``prefix_key``/``prefix_value`` keep ``requires_grad``."""
    if rng is None:
        raise ValueError("apply_prefix: pass an explicit numpy Generator `rng` (the init draws random tokens)")
    if not isinstance(length, int | np.integer) or length < 1:
        raise ValueError(f"apply_prefix: length must be a positive integer, got {length!r}")
    if prefix_layers(model):
        raise ValueError("apply_prefix: the model already has prefixes")
    if length > model.config.max_len + 1:
        raise ValueError(f"apply_prefix: the init runs {length} tokens through the model, more than its "
                         f"max_len={model.config.max_len} positions")
    keys, values = _activations(model, rng.integers(0, model.config.vocab_size, length))
    for i, block in enumerate(model.layers):
        block.attention = PrefixSelfAttention(block.attention, keys[i], values[i])
    for name, p in model.named_parameters():
        p.requires_grad = name.endswith((".prefix_key", ".prefix_value"))
    return prefix_layers(model)


def remove_prefix(model: GLM) -> None:
    """Put plain ``SelfAttention`` layers back (the base weights are shared, so nothing else changes)."""
    for block in model.layers:
        a = block.attention
        if isinstance(a, PrefixSelfAttention):
            plain = SelfAttention.__new__(SelfAttention)
            Module.__init__(plain)
            _take_over(a, plain)
            block.attention = plain
    for _, p in model.named_parameters():
        p.requires_grad = True


def prefix_summary(model: Module) -> str:
    """One line: how many parameters train, of how many."""
    total = model.num_parameters()
    train = sum(p.size for _, p in model.named_parameters() if p.requires_grad)
    layers = prefix_layers(model)
    length = next(iter(layers.values())).length if layers else 0
    return (f"prefix tuning: {train:,} trainable parameters of {total:,} ({100.0 * train / max(total, 1):.2f} %), "
            f"{length} keys and values in each of {len(layers)} layers")


# --- saving the prefixes on their own ----------------------------------------------------------------------------


def save_prefix(model: Module, path) -> tuple[Path, Path]:
    """Write only the prefixes: ``<path>.npz`` (by parameter name) and ``<path>.json`` (length, shapes)."""
    layers = prefix_layers(model)
    if not layers:
        raise ValueError("save_prefix: the model has no prefixes")
    path = Path(path)
    if path.suffix in (".npz", ".json"):
        path = path.with_suffix("")
    arrays = {}
    for name, m in layers.items():
        arrays[f"{name}.prefix_key"] = to_numpy(m.prefix_key.data)
        arrays[f"{name}.prefix_value"] = to_numpy(m.prefix_value.data)
    meta = {"format": "minglm-prefix", "length": next(iter(layers.values())).length,
            "arrays": {k: list(v.shape) for k, v in arrays.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    npz, meta_path = path.with_suffix(".npz"), path.with_suffix(".json")
    np.savez(npz, **arrays)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return npz, meta_path


def load_prefix(model: GLM, path) -> dict[str, PrefixSelfAttention]:
    """Load prefixes saved by ``save_prefix`` into ``model`` (adding them first when it has none). Raises a
    ValueError naming what does not fit."""
    path = Path(path)
    if path.suffix in (".npz", ".json"):
        path = path.with_suffix("")
    npz, meta_path = path.with_suffix(".npz"), path.with_suffix(".json")
    if not npz.exists() or not meta_path.exists():
        raise FileNotFoundError(f"load_prefix: need both {npz} and {meta_path}")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != "minglm-prefix":
        raise ValueError(f"load_prefix: {meta_path} is not a minglm prefix file")
    if not prefix_layers(model):
        apply_prefix(model, int(meta["length"]), np.random.default_rng(0))  # the values are overwritten below
    with np.load(npz, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    params = dict(model.named_parameters())
    wanted = [k for k in params if k.endswith((".prefix_key", ".prefix_value"))]
    missing = [k for k in wanted if k not in arrays]
    unexpected = [k for k in arrays if k not in params]
    if missing or unexpected:
        raise ValueError(f"load_prefix: the prefixes do not fit the model (missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]})")
    for k, a in arrays.items():
        p = params[k]
        if tuple(a.shape) != p.shape:
            raise ValueError(f"load_prefix: {k} has shape {tuple(a.shape)} in the file, {p.shape} in the model")
        p.data[...] = to_device(a, get_xp(p.data)).astype(p.dtype, copy=False)
    return prefix_layers(model)


__all__ = ["PrefixSelfAttention", "apply_prefix", "load_prefix", "prefix_layers", "prefix_summary", "remove_prefix",
           "save_prefix"]
