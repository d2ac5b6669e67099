"""LoRA: fine-tune a frozen GLM through small low-rank adapters (Hu et al. 2021, "LoRA").

A frozen ``Linear`` computes y = x Wᵀ + b. LoRA adds a trainable low-rank update beside it:

    y = x Wᵀ + b + (alpha / r) · (x Aᵀ) Bᵀ,     A (r, in), B (out, r), r ≪ min(in, out)

A starts small and random, B starts at zero, so the adapted model is exactly the pretrained one at step 0 and the
first gradients reach B (dL/dB = (alpha/r)·dyᵀ (x Aᵀ), non-zero) and only then A. With rank r a layer trains
r·(in + out) numbers instead of in·out.

Here the adapters go on the four projections of every block (docs/official-code.md §3 names): the fused
``query_key_value``, the attention output ``dense`` and both MLP projections ``dense_h_to_4h``/``dense_4h_to_h``.
Everything else (embeddings, LayerNorms, the base weights) is frozen with ``requires_grad = False``.

``merge`` folds the update into W (W ← W + (alpha/r)·B A), which gives the same logits with no extra cost at inference;
``unmerge`` subtracts it again. The adapters are saved on their own, a few KB next to a model of MB: an ``.npz`` with
the A and B arrays plus a ``.json`` with rank, alpha, targets and shapes.

Left out: dropout on the adapter input, adapters on the embeddings, and quantised bases (QLoRA).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import minglm.functional as F
from minglm.backend import get_xp, to_device, to_numpy
from minglm.nn import Linear, Module, Parameter
from minglm.tensor import Tensor

DEFAULT_TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")


class LoRALinear(Linear):
    """A ``Linear`` that keeps the base layer's own ``weight``/``bias`` Parameters (so parameter names and
    checkpoints do not change) and adds ``lora_A`` (r, in) and ``lora_B`` (out, r)."""

    def __init__(self, base: Linear, rank: int, alpha: float, rng: np.random.Generator):
        Module.__init__(self)  # not Linear.__init__: the weights are the base layer's, not new ones
        if rank < 1 or rank > min(base.in_features, base.out_features):
            raise ValueError(f"LoRALinear: rank must be in [1, {min(base.in_features, base.out_features)}], "
                             f"got {rank}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # (out, in), frozen by apply_lora
        self.bias = base.bias  # (out,)
        self.rank, self.alpha = int(rank), float(alpha)
        self.scaling = self.alpha / self.rank
        xp = get_xp(base.weight.data)
        std = np.float32(1.0 / np.sqrt(self.in_features))  # like a fresh Linear's scale; B = 0 makes it harmless
        a = rng.standard_normal((rank, self.in_features), dtype=np.float32) * std
        self.lora_A = Parameter(to_device(a.astype(base.weight.dtype), xp))  # (r, in), small random
        self.lora_B = Parameter(xp.zeros((self.out_features, rank), dtype=base.weight.dtype))  # (out, r), zero
        self.merged = False

    def delta(self):
        """The weight update (alpha/r)·B A as an array (out, in)."""
        return (self.lora_B.data @ self.lora_A.data) * self.scaling

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight, self.bias)  # (..., out): the frozen base
        if self.merged:  # the update already lives in the weight
            return y
        low = F.linear(x, self.lora_A)  # (..., r)
        return y + F.linear(low, self.lora_B) * self.scaling  # (..., out)

    def infer(self, x):
        """``forward`` on a plain array (decoding), so a model with adapters decodes on the fast path too."""
        y = super().infer(x)  # (..., out): the frozen base
        if not self.merged:
            y += ((x @ self.lora_A.data.T) @ self.lora_B.data.T) * self.scaling  # (..., out)
        return y

    def merge(self) -> None:
        if not self.merged:
            self.weight.data[...] += self.delta()
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self.weight.data[...] -= self.delta()
            self.merged = False

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, rank={self.rank}, alpha={self.alpha}"


def lora_layers(model: Module) -> dict[str, LoRALinear]:
    """Every LoRALinear in the model by its dotted module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model: Module, rank: int = 8, alpha: float = 16.0, rng: np.random.Generator | None = None,
               targets=DEFAULT_TARGETS) -> dict[str, LoRALinear]:
    """Replace every ``Linear`` attribute named in ``targets`` by a ``LoRALinear`` and freeze all other weights.

    Returns the adapted layers by name. Only ``lora_A``/``lora_B`` keep ``requires_grad = True``.
    """
    if rng is None:
        raise ValueError("apply_lora: pass an explicit numpy Generator `rng` (A is initialised randomly)")
    if lora_layers(model):
        raise ValueError("apply_lora: the model already has LoRA adapters")
    found = []
    for _, parent in list(model.named_modules()):
        for attr, child in list(parent._modules.items()):
            if attr in targets and type(child) is Linear:
                found.append((parent, attr, child))
    if not found:
        raise ValueError(f"apply_lora: no Linear layer named one of {list(targets)} in the model")
    for parent, attr, child in found:
        setattr(parent, attr, LoRALinear(child, rank, alpha, rng))
    for name, p in model.named_parameters():
        p.requires_grad = name.endswith(".lora_A") or name.endswith(".lora_B")
    return lora_layers(model)


def trainable_parameters(model: Module) -> list[tuple[str, Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def lora_summary(model: Module) -> str:
    """One line: how many parameters train, of how many."""
    total = model.num_parameters()
    train = sum(p.size for _, p in trainable_parameters(model))
    return f"LoRA: {train:,} trainable parameters of {total:,} ({100.0 * train / max(total, 1):.2f} %)"


def merge_lora(model: Module) -> None:
    """Fold every adapter into its base weight (same logits, no adapter cost)."""
    for m in lora_layers(model).values():
        m.merge()


def unmerge_lora(model: Module) -> None:
    """Take the adapters back out of the base weights."""
    for m in lora_layers(model).values():
        m.unmerge()


def remove_lora(model: Module, merge: bool = True) -> None:
    """Put plain ``Linear`` layers back (merging the adapters into them first when ``merge``)."""
    for name, m in lora_layers(model).items():
        if merge:
            m.merge()
        else:
            m.unmerge()
        parent = model
        *path, attr = name.split(".")
        for part in path:
            parent = getattr(parent, part)
        plain = Linear.__new__(Linear)
        Module.__init__(plain)
        plain.in_features, plain.out_features = m.in_features, m.out_features
        plain.weight, plain.bias = m.weight, m.bias
        setattr(parent, attr, plain)


# --- saving the adapters on their own ----------------------------------------------------------------------------


def save_lora(model: Module, path) -> tuple[Path, Path]:
    """Write only the adapters: ``<path>.npz`` (lora_A/lora_B by parameter name) and ``<path>.json`` (rank, alpha,
    targets, shapes). Returns both paths."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("save_lora: the model has no LoRA adapters")
    if any(m.merged for m in layers.values()):
        raise ValueError("save_lora: unmerge the adapters first (merged weights are not adapters)")
    path = Path(path)
    if path.suffix in (".npz", ".json"):
        path = path.with_suffix("")
    arrays = {}
    for name, m in layers.items():
        arrays[f"{name}.lora_A"] = to_numpy(m.lora_A.data)
        arrays[f"{name}.lora_B"] = to_numpy(m.lora_B.data)
    first = next(iter(layers.values()))
    meta = {
        "format": "minglm-lora",
        "rank": first.rank,
        "alpha": first.alpha,
        "targets": sorted({name.rsplit(".", 1)[-1] for name in layers}),
        "arrays": {k: list(v.shape) for k, v in arrays.items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    npz, meta_path = path.with_suffix(".npz"), path.with_suffix(".json")
    np.savez(npz, **arrays)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return npz, meta_path


def load_lora(model: Module, path, rng: np.random.Generator | None = None) -> dict[str, LoRALinear]:
    """Load adapters saved by ``save_lora`` into ``model``, adding them first (rank, alpha, targets from the JSON)
    when the model has none. Raises a ValueError naming what does not fit."""
    path = Path(path)
    if path.suffix in (".npz", ".json"):
        path = path.with_suffix("")
    npz, meta_path = path.with_suffix(".npz"), path.with_suffix(".json")
    if not npz.exists() or not meta_path.exists():
        raise FileNotFoundError(f"load_lora: need both {npz} and {meta_path}")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != "minglm-lora":
        raise ValueError(f"load_lora: {meta_path} is not a minglm LoRA file")
    layers = lora_layers(model)
    if not layers:
        layers = apply_lora(model, meta["rank"], meta["alpha"], rng or np.random.default_rng(0), meta["targets"])
    with np.load(npz, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    params = dict(model.named_parameters())
    missing = [k for k in params if (k.endswith(".lora_A") or k.endswith(".lora_B")) and k not in arrays]
    unexpected = [k for k in arrays if k not in params]
    if missing or unexpected:
        raise ValueError(f"load_lora: the adapters do not fit the model (missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]})")
    for k, a in arrays.items():
        p = params[k]
        if tuple(a.shape) != p.shape:
            raise ValueError(f"load_lora: {k} has shape {tuple(a.shape)} in the file, {p.shape} in the model")
        p.data[...] = to_device(a, get_xp(p.data)).astype(p.dtype, copy=False)
    return layers
