"""Weights in and out of minglm under the names the official GLM code and SwissArmyTransformer (SAT) use.

Three layouts of the same tensors (docs/parity.md §3); only the names differ, every shape is identical:

minglm name -> official THUDM/GLM name (``checkpoint['module']``) -> SAT 0.4.12 ``GLMModel`` name:
- ``word_embeddings.weight`` -> ``word_embeddings.weight`` -> ``transformer.word_embeddings.weight``
- ``position_embeddings.weight`` -> ``transformer.position_embeddings.weight`` (SAT: the same)
- ``block_position_embeddings.weight`` -> ``transformer.block_position_embeddings.weight``
  -> ``mixins.block_position_embedding.block_position_embeddings.weight``
- ``layers.{i}.<rest>`` -> ``transformer.layers.{i}.<rest>`` (SAT: the same), where <rest> is
  ``input_layernorm``, ``attention.query_key_value``, ``attention.dense``, ``post_attention_layernorm``,
  ``mlp.dense_h_to_4h`` or ``mlp.dense_4h_to_h``, each ``.weight`` and ``.bias``
- ``final_layernorm.{weight,bias}`` -> ``transformer.final_layernorm.{weight,bias}`` (SAT: the same)

Linear weights are (out, in) everywhere and the QKV rows are [q; k; v], head-major, so nothing is transposed.
Files are ``.npz`` (read with ``allow_pickle=False``). A PyTorch checkpoint of the official code can be converted when
torch is installed; it is opened with ``weights_only=True``, so no pickled code ever runs.

GLM-130B's architecture (``GLMConfig`` switches: RoPE, DeepNorm, optionally GeGLU) is SAT's *other* model,
``sat.model.official.glm130B_model.GLM130B``. Its names are the SAT names above without the position tables:
``transformer.word_embeddings.weight``, ``transformer.layers.{i}.<rest>``, ``transformer.final_layernorm.*``. One
tensor is laid out differently: GLM130B views the fused QKV output as (heads, 3·hs), so its rows are interleaved per
head [q₀; k₀; v₀; q₁; k₁; v₁; ...] where minglm (and GLM-1) keeps [q; k; v] (``attention_forward`` there:
``mixed_raw_layer.view(..., np, 3 * hn)``). The ``sat`` layout of such a model permutes those rows; nothing else
changes (``dense_h_to_4h`` is [a | b] with the GeLU on b in both). SAT can only hold two combinations of the switches:
GLMModel = learned 2-D tables + pre-LN + tanh-GeLU (GLM-1) and GLM130B = RoPE (1-D or ``--position-encoding-2d``) +
DeepNorm + GeGLU (or tanh-GeLU with ``--no-glu``); EGS and the FP32 softmax change no weight. Other combinations, and
the official layout of anything but GLM-1, are refused with a message that says why.

Left out: model-parallel shards (merge them first), fp16 master weights and optimizer states, and the vocabulary
padding (a padded table loads as it is; its extra rows are never produced by a minglm tokenizer).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from minglm.checkpoint import atomic_write
from minglm.model import GLMConfig

LAYOUTS = ("minglm", "official", "sat")

# minglm name -> {layout: name} for the tensors outside the layers
_FIXED = {
    "word_embeddings.weight": {"official": "word_embeddings.weight", "sat": "transformer.word_embeddings.weight"},
    "position_embeddings.weight": {"official": "transformer.position_embeddings.weight",
                                   "sat": "transformer.position_embeddings.weight"},
    "block_position_embeddings.weight": {
        "official": "transformer.block_position_embeddings.weight",
        "sat": "mixins.block_position_embedding.block_position_embeddings.weight",
    },
}
# the per-layer and final-LayerNorm names: minglm prefix -> the same under "transformer." in both other layouts
_PREFIXED = re.compile(r"^(layers\.\d+\.|final_layernorm\.)")


def _to_minglm_name(name: str, layout: str) -> str:
    if layout == "minglm":
        return name
    for ours, theirs in _FIXED.items():
        if theirs[layout] == name:
            return ours
    if name.startswith("transformer.") and _PREFIXED.match(name[len("transformer."):]):
        return name[len("transformer."):]
    raise KeyError(f"interop: {name!r} is not a GLM parameter name of the {layout!r} layout")


def _from_minglm_name(name: str, layout: str) -> str:
    if layout == "minglm":
        return name
    if name in _FIXED:
        return _FIXED[name][layout]
    if _PREFIXED.match(name):
        return "transformer." + name
    raise KeyError(f"interop: {name!r} is not a minglm GLM parameter name")


def convert_names(state: dict, src: str, dst: str) -> dict:
    """Rename every key of ``state`` from layout ``src`` to ``dst`` ("minglm" | "official" | "sat"); arrays are shared.

    An unknown key raises a KeyError that names it.
    """
    for layout in (src, dst):
        if layout not in LAYOUTS:
            raise ValueError(f"interop.convert_names: layout must be one of {LAYOUTS}, got {layout!r}")
    out = {}
    for name, value in state.items():
        new = _from_minglm_name(_to_minglm_name(name, src), dst)
        if new in out:
            raise KeyError(f"interop.convert_names: two keys map to {new!r}")
        out[new] = value
    return out


def detect_layout(state: dict) -> str:
    """Tell the layout of a state dict from its block-position-embedding key (the one name all three differ in)."""
    for layout in LAYOUTS:
        if _from_minglm_name("block_position_embeddings.weight", layout) in state:
            return layout
    raise KeyError("interop.detect_layout: no block-position-embedding key found; is this a GLM state dict?")


def config_from_state_dict(state: dict, n_head: int, **overrides):
    """A GLMConfig with the sizes read off the tensors (any layout). The head count is not stored: pass it."""
    sd = convert_names(state, detect_layout(state), "minglm")
    V, C = sd["word_embeddings.weight"].shape
    n_layer = len({k.split(".")[1] for k in sd if k.startswith("layers.")})
    values = dict(vocab_size=int(V), d_model=int(C), n_head=int(n_head), n_layer=n_layer,
                  max_len=int(sd["position_embeddings.weight"].shape[0]) - 1)
    values.update(overrides)
    return GLMConfig(**values)


def sat_model(config) -> str:
    """The SAT class that holds a model of this config: "GLMModel" (GLM-1) or "GLM130B"; a ValueError naming the
    switches SAT has no model for otherwise."""
    if getattr(config, "hide_own_token", False):
        raise ValueError("interop: SAT's GLM lets a Part-B token see its own slot in Part A, so a model trained with "
                         "hide_own_token=True would give other logits there; only GLM's own mask exports")
    if getattr(config, "raw_part_a", False):
        raise ValueError("interop: SAT's GLM transforms Part A in every layer, so a model trained with "
                         "raw_part_a=True would give other logits there; only GLM's own layers export")
    glm1 = (config.position, config.norm, config.ffn) == ("learned2d", "pre", "gelu")
    if glm1:
        return "GLMModel"
    if config.position in ("rope1d", "rope2d") and config.norm == "deepnorm":
        return "GLM130B"
    raise ValueError(
        f"interop: SAT has no model with position={config.position!r}, norm={config.norm!r}, ffn={config.ffn!r}: "
        "its GLMModel is learned2d + pre + gelu (GLM-1) and its GLM130B is rope1d/rope2d + deepnorm + geglu (or gelu "
        "with --no-glu); train with one of those to export"
    )


def sat_args(config) -> str:
    """The SAT model arguments that read an exported file back, as text (e.g. for the export command)."""
    c = config
    common = (f"num_layers={c.n_layer}, hidden_size={c.d_model}, num_attention_heads={c.n_head}, "
              f"vocab_size={c.vocab_size}")
    if sat_model(c) == "GLMModel":
        return f"SAT GLMModel: {common}, max_sequence_length={c.max_len + 1}"
    return (f"SAT GLM130B: {common}, inner_hidden_size={c.ffn_size}, position_encoding_2d={c.position == 'rope2d'}, "
            f"no_glu={c.ffn != 'geglu'}, layernorm_epsilon={c.layernorm_eps}")


def _qkv_rows(a: np.ndarray, n_head: int, to_sat: bool) -> np.ndarray:
    """Reorder the fused QKV rows (3C, ...) between minglm's [q; k; v] and GLM130B's per-head [q_h; k_h; v_h]."""
    rest = a.shape[1:]
    hs = a.shape[0] // (3 * n_head)
    if to_sat:
        return a.reshape(3, n_head, hs, *rest).swapaxes(0, 1).reshape(a.shape)
    return a.reshape(n_head, 3, hs, *rest).swapaxes(0, 1).reshape(a.shape)


def _glm130b_names(state: dict, config, to_sat: bool) -> dict:
    """minglm <-> SAT GLM130B: "transformer." in front, no position tables, the QKV rows permuted."""
    out = {}
    for name, value in state.items():
        if to_sat:
            new = "transformer." + name
        elif name.startswith("transformer."):
            new = name[len("transformer."):]
        else:
            raise KeyError(f"interop: {name!r} is not a SAT GLM130B parameter name")
        if name.endswith(("query_key_value.weight", "query_key_value.bias")):
            value = _qkv_rows(np.asarray(value), config.n_head, to_sat)
        out[new] = value
    return out


def export_state_dict(model, layout: str = "official") -> dict[str, np.ndarray]:
    """The model's weights as NumPy float32 arrays under the names of ``layout``.

    A model with GLM-130B's switches exports only to "sat" (SAT's GLM130B) or "minglm"; see the module docstring."""
    if layout not in LAYOUTS:
        raise ValueError(f"interop.export_state_dict: layout must be one of {LAYOUTS}, got {layout!r}")
    config = model.config
    if layout == "minglm":
        return model.state_dict()
    if layout == "official" and sat_model(config) != "GLMModel":
        raise ValueError(f"interop: the official THUDM/GLM layout holds GLM-1 only (learned2d + pre + gelu), not "
                         f"position={config.position!r}, norm={config.norm!r}, ffn={config.ffn!r}; use --layout sat")
    if sat_model(config) == "GLM130B":
        return _glm130b_names(model.state_dict(), config, to_sat=True)
    return convert_names(model.state_dict(), "minglm", layout)


def load_state_dict(model, state: dict, strict: bool = True) -> None:
    """Load a state dict of any layout (detected from its keys) into a minglm GLM; shapes are checked by name.

    For a model with GLM-130B's switches, a dict whose names start with "transformer." is read as SAT's GLM130B."""
    config = getattr(model, "config", None)
    glm130b = config is not None and (config.position, config.norm, config.ffn) != ("learned2d", "pre", "gelu")
    if glm130b:  # no position tables, so detect_layout has no key to go by: SAT names or minglm's own
        if any(k.startswith("transformer.") for k in state):
            sat_model(config)  # a clear error for a combination SAT cannot hold
            state = _glm130b_names(state, config, to_sat=False)
        model.load_state_dict(state, strict=strict)
        return
    model.load_state_dict(convert_names(state, detect_layout(state), "minglm"), strict=strict)


def save(model, path, layout: str = "official") -> Path:
    """Write the model's weights to ``path`` (.npz added if missing) under the names of ``layout``; returns the path.

    Written through a temporary file and renamed into place (``checkpoint.atomic_write``), so a crash leaves the
    old file or the new one; a ``path`` that is a symbolic link is refused rather than written through.
    """
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    arrays = export_state_dict(model, layout)
    return atomic_write(path, lambda f: np.savez(f, **arrays))


def load_npz(path) -> dict[str, np.ndarray]:
    """Read a .npz of weights (never unpickling anything)."""
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def load(model, path, strict: bool = True) -> None:
    """Load an .npz in any of the three layouts into ``model``."""
    load_state_dict(model, load_npz(path), strict=strict)


def torch_checkpoint_to_npz(src, dst) -> Path:
    """Convert an official GLM PyTorch checkpoint (``{'module': state_dict}`` or a bare state dict) to an .npz in the
    official layout. Needs torch; loads tensors only (``weights_only=True``)."""
    try:
        import torch  # noqa: PLC0415 - optional, only for this converter
    except ImportError:
        raise ImportError("interop.torch_checkpoint_to_npz needs PyTorch (pip install torch)") from None
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    state = ckpt.get("module", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"interop: {src} holds no state dict (expected {{'module': ...}} or a dict of tensors)")
    arrays = {}
    for name, value in state.items():
        if not hasattr(value, "detach"):
            continue
        arrays[name] = value.detach().to(torch.float32).numpy()
    layout = detect_layout(arrays)
    arrays = convert_names(arrays, layout, "official")
    dst = Path(dst)
    np.savez(dst, **arrays)
    return dst
