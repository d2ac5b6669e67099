"""The GLM model (General Language Model, Du et al. 2021), in one file, ordered by data flow.

Glossary: B = batch, T = time (sequence length), C = channels (d_model), nh = heads, hs = head size (C // nh),
V = vocabulary, L = layers, N = B*T (activations are kept as (N, C) so every Linear is one large GEMM).

What makes it GLM rather than GPT (the paper's §2.2-§2.3; docs/official-code.md §3 and §6; docs/mask.md):
- the input is word + position + *block-position* embedding: two learned position tables of max_len + 1 rows;
- attention is bidirectional over Part A (keys j < sep) and causal over Part B, computed from one integer ``sep``
  per sample; no T×T mask is ever stored in a batch;
- pre-LN blocks with LayerNorm eps 1e-5, a fused QKV projection split into [q | k | v], tanh-GeLU MLP of width 4C,
  a final LayerNorm, and an output head tied to the word embeddings with no bias;
- init N(0, 0.02), and 0.02/√(2L) on the two projections that write into the residual stream.

Parameter names follow the official checkpoints minus their prefixes (see ``minglm/interop.py`` for the mapping):
``word_embeddings.weight``, ``position_embeddings.weight``, ``layers.3.attention.query_key_value.weight``, ...

GLM-130B's changes (Zeng et al. 2022, §2.1-§3 and App. B) are switches on ``GLMConfig``, each off by default so the
GLM-1 model above is unchanged; the ``glm-130b`` preset turns them all on:
- ``position``: "learned2d" (the two tables), "rope1d" (GLM-130B: RoPE by the first position row only, so Part B
  stays at its blank's position) or "rope2d" (SAT's ``--position-encoding-2d``: half of each head turns with the
  position, half with the block id); RoPE models have no position tables;
- ``norm``: "pre" or "deepnorm" (post-LN with residual α·x, α = (2N)^½, and Xavier-normal init with gain β = (2N)^-½
  on the FFN, value and output projections: SAT ``glm130B_model.py``, ``DeepNormWithGLUMixin.layer_forward``);
- ``ffn``: "gelu" or "geglu" (width (8/3)·C, a ⊙ GeLU_erf(b) on the two halves of a 2·(8/3)·C projection);
- ``embedding_grad_scale``: α < 1 shrinks the gradient into the word embeddings (EGS, α = 0.1), forward unchanged;
- ``softmax_scaling``: the FP32-softmax trick with c = layer + 1 (``F.FP32SoftmaxAttention``).

Left out on purpose: Transformer-XL ``mems`` (the official inference cache stores each layer's *input*; ``KVCache``
here stores K and V instead, which gives the same logits at lower cost), model parallelism, fp16, checkpointed
activations, and padding the vocabulary to a multiple of 128 (a speed trick for GPUs).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np

import minglm.functional as F
from minglm.backend import get_xp, to_device, to_numpy
from minglm.masks import glm_mask, own_token_mask
from minglm.nn import Dropout, Embedding, LayerNorm, Linear, Module, ModuleList
from minglm.tensor import Tensor, no_grad

# --- configuration ----------------------------------------------------------------------------------------------


@dataclass
class GLMConfig:
    vocab_size: int = 256  # chars + the 8 special ids fit easily; GLM pads a BPE vocabulary to a multiple of 128
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    max_len: int = 128  # largest position / block-position id; each table has max_len + 1 rows, as in GLM
    seq_len: int | None = None  # training context length, if known; it must fit in the position tables
    dropout: float = 0.0  # embedding + hidden dropout. GLM used 0.1; 0 suits the small CPU runs of the course
    attn_dropout: float = 0.0  # dropout on the attention probabilities (GLM: 0.1)
    layernorm_eps: float = 1e-5  # apex FusedLayerNorm's default: GLM never passes its own eps in
    init_std: float = 0.02  # N(0, 0.02) for every weight; the residual projections get 0.02/√(2·n_layer)
    # GLM-130B's switches (module docstring); the defaults are GLM-1
    position: str = "learned2d"  # learned2d | rope1d (GLM-130B) | rope2d (ChatGLM-6B); RoPE base 10000
    norm: str = "pre"  # pre | deepnorm (GLM-130B's post-LN with α = (2N)^½, β = (2N)^-½)
    ffn: str = "gelu"  # gelu (tanh-GeLU, 4C) | geglu (GLM-130B: exact-erf GeLU gate, (8/3)C)
    embedding_grad_scale: float = 1.0  # EGS α: 1 = off; GLM-130B used 0.1
    softmax_scaling: bool = False  # GLM-130B's FP32 softmax with q/(√hs·c), c = layer + 1: same maths in float32
    # rope1d only (the other position switches ignore it): where the tokens that fill a [gMASK] blank sit. "blank": at
    # the blank's position, like a [MASK] fill (GLM-1's first position row); "continue": counting on from it,
    # position + block id (GLM-130B App. B.3)
    gmask_positions: str = "blank"
    # How attention runs, not what it computes: auto = the fused kernel on a GPU, its NumPy twin on the CPU from
    # kernels.TWIN_MIN_T tokens on, else the plain path; plain | flash force one. The train command takes its default
    # from MINGLM_ATTENTION, once; nothing reads the environment while the model runs.
    attention: str = "auto"
    # A deviation from GLM (README, "What was tried", round 11): a Part-B token never attends
    # to the Part-A token at its own position id, the slot of the blank it fills (masks.own_token_mask). Part A may
    # then keep the words it asks for, and every word of a window can be a blank at once (TrainConfig.all_words)
    hide_own_token: bool = False
    # A second deviation, which lets such a model have several layers (README round 12): Part A is never itself
    # transformed. Every layer computes Part A's keys and values from its embeddings (the word, and its position
    # tables if any), as T-TA's layers do (Shin et al., ACL 2020), and a Part-B token attends to no other span's
    # Part-B tokens (masks.own_token_mask). Then no Part-A token carries a neighbour's word to a later layer, and with
    # hide_own_token no Part-B token ever reads the word it is asked for, at any depth. Only the Part-B tokens are
    # transformed layer after layer
    raw_part_a: bool = False

    SWITCHES = {"position": ("learned2d", "rope1d", "rope2d"), "norm": ("pre", "deepnorm"), "ffn": ("gelu", "geglu"),
                "gmask_positions": ("blank", "continue"), "attention": F.ATTENTION_IMPLS}

    def __post_init__(self):
        for name in ("vocab_size", "n_layer", "n_head", "d_model", "max_len"):
            value = getattr(self, name)
            if not isinstance(value, int | np.integer) or value <= 0:
                raise ValueError(f"GLMConfig.{name} must be a positive integer, got {value!r}")
        if self.seq_len is not None:
            if not isinstance(self.seq_len, int | np.integer) or self.seq_len <= 0:
                raise ValueError(f"GLMConfig.seq_len must be a positive integer or None, got {self.seq_len!r}")
            if self.max_len < self.seq_len:
                raise ValueError(
                    f"GLMConfig.max_len ({self.max_len}) must be >= seq_len ({self.seq_len}): "
                    "positions up to seq_len - 1 and block positions up to the span length must fit the tables"
                )
        if self.d_model % self.n_head:
            raise ValueError(
                f"GLMConfig.d_model ({self.d_model}) must be divisible by n_head ({self.n_head})"
            )
        for name in ("dropout", "attn_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"GLMConfig.{name} must be in [0, 1), got {value!r}")
        for name in ("layernorm_eps", "init_std"):
            if not getattr(self, name) > 0.0:
                raise ValueError(f"GLMConfig.{name} must be positive, got {getattr(self, name)!r}")
        for name, allowed in self.SWITCHES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"GLMConfig.{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if self.position != "learned2d" and self.head_size % (2 * self.rope_chunks):
            raise ValueError(
                f"GLMConfig: position={self.position!r} rotates pairs of dims in {self.rope_chunks} chunk(s) of each "
                f"head, so the head size (d_model / n_head = {self.head_size}) must be divisible by "
                f"{2 * self.rope_chunks}"
            )
        if not 0.0 <= self.embedding_grad_scale <= 1.0:
            raise ValueError(f"GLMConfig.embedding_grad_scale must be in [0, 1] (1 = off), got "
                             f"{self.embedding_grad_scale!r}")
        for name in ("softmax_scaling", "hide_own_token", "raw_part_a"):
            if not isinstance(getattr(self, name), bool | np.bool_):
                raise ValueError(f"GLMConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if self.raw_part_a and self.position == "rope1d" and self.gmask_positions == "continue":
            raise ValueError("GLMConfig.raw_part_a tells a span's Part-B tokens by their shared position id, which "
                             "gmask_positions='continue' does not give them; use gmask_positions='blank'")

    @property
    def head_size(self) -> int:
        return self.d_model // self.n_head

    @property
    def rope_chunks(self) -> int:
        """How many chunks of each head RoPE turns by its own ids: 1 (position) or 2 (position, block id)."""
        return 2 if self.position == "rope2d" else 1

    @property
    def ffn_size(self) -> int:
        """The FFN width: 4C, or (8/3)C for GeGLU (SAT's default ``4 * hidden_size * 2 // 3``)."""
        return 8 * self.d_model // 3 if self.ffn == "geglu" else 4 * self.d_model

    @property
    def deepnorm_alpha(self) -> float:
        """DeepNorm's residual weight α = (2N)^½ (GLM-130B §2.1; DeepNet's decoder-only α is (2N)^¼)."""
        return math.sqrt(2.0 * self.n_layer)

    # The presets. tiny trains a readable character-level Shakespeare model in a few minutes on 2 CPU cores;
    # small is the benchmark config of docs/performance.md; base is for a GPU.
    PRESETS = {
        "tiny": dict(n_layer=4, n_head=4, d_model=128, max_len=128, seq_len=128),
        "small": dict(n_layer=4, n_head=8, d_model=256, max_len=256, seq_len=256),
        "base": dict(n_layer=8, n_head=8, d_model=512, max_len=512, seq_len=512),
        # the default run (python -m minglm train) and the bundled course model (minglm/course.py): tiny's width and
        # heads in ONE layer, with 1-D RoPE, on whole-word tokens (0.72 M parameters, 2.9 MB). In these CPU budgets
        # a step of fewer layers buys more tokens than depth buys per token (README, "What was tried", round 5)
        "words": dict(n_layer=1, n_head=4, d_model=128, max_len=128, seq_len=32, position="rope1d"),
        # the course model: the same, with each Part-B token's own slot hidden (README, "What was tried", round 11;
        # round 12 found two layers over a raw Part A, raw_part_a, faster to learn and no better at the end)
        "course": dict(n_layer=1, n_head=4, d_model=128, max_len=128, seq_len=32, position="rope1d",
                       hide_own_token=True),
        # tiny's size with GLM-130B's recipe (its data mixture is the glm-130b training preset, minglm/config.py)
        "glm-130b": dict(n_layer=4, n_head=4, d_model=128, max_len=128, seq_len=128, position="rope1d",
                         gmask_positions="continue", norm="deepnorm", ffn="geglu", embedding_grad_scale=0.1,
                         softmax_scaling=True),
    }

    @classmethod
    def preset(cls, name: str, **overrides) -> GLMConfig:
        """A named config with overrides, e.g. ``GLMConfig.preset("small", vocab_size=80)``.

        When seq_len is overridden and max_len is not, max_len follows seq_len.
        """
        if name not in cls.PRESETS:
            raise ValueError(f"GLMConfig.preset: unknown preset {name!r}; choose one of {sorted(cls.PRESETS)}")
        values = dict(cls.PRESETS[name])
        if "seq_len" in overrides and "max_len" not in overrides and overrides["seq_len"] is not None:
            values["max_len"] = max(values["max_len"], overrides["seq_len"])
        values.update(overrides)
        return cls.from_dict(values)

    def to_dict(self) -> dict:
        """A JSON-safe dict of every field, except the switches (GLM-130B's, and the attention path) while they hold
        their defaults: so the config of a GLM-1 model, and every checkpoint that stores it, reads as it did before
        the switches existed."""
        defaults = {f.name: f.default for f in fields(self) if f.name in _SWITCH_FIELDS}
        out = {}
        for k, v in asdict(self).items():
            if k in defaults and v == defaults[k]:
                continue
            out[k] = int(v) if isinstance(v, np.integer) else bool(v) if isinstance(v, np.bool_) else v
        return out

    @classmethod
    def from_dict(cls, d: dict) -> GLMConfig:
        """Build from a dict (e.g. read from config.json); unknown keys are an error, missing keys take defaults."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"GLMConfig.from_dict: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)


_SWITCH_FIELDS = ("position", "norm", "ffn", "embedding_grad_scale", "softmax_scaling", "gmask_positions", "attention",
                  "hide_own_token", "raw_part_a")
GMASK_ID = 4  # the id of [gMASK] in minglm's tokenizers (tokenizer.GMASK_ID, one layer up; a test keeps them equal)


# --- the transformer ------------------------------------------------------------------------------------------------


class SelfAttention(Module):
    """Multi-head self-attention with GLM's mask, a fused QKV projection and an output projection."""

    def __init__(self, config: GLMConfig, rng: np.random.Generator):
        super().__init__()
        C, std = config.d_model, config.init_std
        self.n_head, self.attn_dropout = config.n_head, config.attn_dropout
        self.softmax_scaling = bool(config.softmax_scaling)
        self.attention_impl = config.attention  # auto | plain | flash, passed down to every call
        if config.norm == "deepnorm":
            # DeepNorm's init (GLM-130B §2.1): Xavier normal, std = gain·√(2 / (fan_in + fan_out)), each of q, k, v
            # and the output projection a C×C matrix; gain 1 on q and k, β = (2N)^-½ on v and the output.
            xavier, beta = math.sqrt(2.0 / (C + C)), 1.0 / config.deepnorm_alpha
            self.query_key_value = Linear(C, 3 * C, rng, std=xavier)  # (3C, C)
            self.query_key_value.weight.data[2 * C:] *= np.float32(beta)  # the v rows
            self.dense = Linear(C, C, rng, std=beta * xavier)
        else:
            self.query_key_value = Linear(C, 3 * C, rng, std=std)  # weight (3C, C): rows [q; k; v], each head-major
            self.dense = Linear(C, C, rng, std=std / math.sqrt(2.0 * config.n_layer))  # writes into the residual
        self.dropout = Dropout(config.dropout)

    def qkv(self, h: Tensor, B: int, T: int, rotary=None, q_start: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """Project (N, C) to q, k, v of shape (B, nh, T, hs): strided views of the one QKV output, no copies.

        ``rotary`` = (cos, sin, chunks) from ``GLM.rotary`` turns q and k by their positions (RoPE).
        ``q_start`` > 0 keeps only the queries of positions q_start..T-1: q is then (B, nh, T - q_start, hs)."""
        C = h.shape[-1]
        nh, hs = self.n_head, C // self.n_head
        qkv = self.query_key_value(h)  # (N, 3C)
        # The last dim is [q | k | v], each C wide and head-major: view it as (B, T, 3, nh, hs).
        qkv = qkv.reshape(B, T, 3, nh, hs).permute(2, 0, 3, 1, 4)  # (3, B, nh, T, hs), a view
        q = qkv[0, :, :, q_start:] if q_start else qkv[0]
        k, v = qkv[1], qkv[2]
        if rotary is not None:
            cos, sin, chunks = rotary
            k = F.rope(k, cos, sin, chunks)  # (B, nh, T, hs)
            if q_start:
                cos, sin = cos[:, :, q_start:], sin[:, :, q_start:]
            q = F.rope(q, cos, sin, chunks)
        return q, k, v

    def attend(self, q: Tensor, k: Tensor, v: Tensor, sep, layer: int, rng=None, own=None) -> Tensor:
        """softmax(q kᵀ/√hs) v with GLM's mask, and ``own`` (B, 1, Tq, Tk) from ``masks.own_token_mask`` when the
        model hides each Part-B token's own slot: (B, nh, T, hs). ``minglm/prefix.py`` overrides it to put trained
        keys and values in front."""
        p = self.attn_dropout if self.training else 0.0
        coeff = layer + 1 if self.softmax_scaling else None  # GLM-130B: c = layer + 1
        return F.scaled_dot_product_attention(q, k, v, sep=sep, mask=own, dropout_p=p, rng=rng,
                                              impl=self.attention_impl, softmax_coeff=coeff)

    def forward(self, h: Tensor, B: int, T: int, sep, layer: int = 0, cache: KVCache | None = None,
                rng: np.random.Generator | None = None, rotary=None, rows=None, own=None) -> Tensor:
        """(N, C), or (R, C) for the flat positions ``rows`` only (``GLM.forward``'s last layer).

        With ``rows`` the queries before the first of them (in every sample: Part A, for GLM's loss) are not
        computed at all: q, its RoPE and the attention run on positions s0..T-1 only (``_first_query``).
        ``own``: the (B, 1, T, Tk) mask of ``GLMConfig.hide_own_token``, or None."""
        C = h.shape[-1]
        s0 = self._first_query(h, T, rows, cache, own is not None)
        q, k, v = self.qkv(h, B, T, rotary, s0)  # q (B, nh, T - s0, hs), k and v (B, nh, T, hs)
        if cache is not None:
            k, v = cache.append(layer, k, v)  # (B, nh, Tk, hs): everything cached so far, these T included
        if own is not None and s0:
            own = own[:, :, s0:]  # the queries' rows
        y = self.attend(q, k, v, sep, layer, rng, own)  # (B, nh, T - s0, hs): queries are the last positions
        y = y.permute(0, 2, 1, 3).reshape(B * (T - s0), C)  # heads side by side again
        if rows is not None:
            if s0:  # flat index b·T + t of the full sequence -> b·(T − s0) + (t − s0) of the tail
                rows = rows - (rows // T + 1) * s0
            y = y[rows]  # (R, C): the output projection works row by row
        return self.dropout(self.dense(y), rng)

    def _first_query(self, h: Tensor, T: int, rows, cache, masked: bool = False) -> int:
        """The first position whose query the rows need (the smallest t of rows = b·T + t), or 0 for all of them.

        Only where nothing else changes: the plain attention (the tiled kernel wants Tq = Tk, and the queries'
        attention dropout would draw other random numbers), no cache, and NumPy, whose rows are on the host."""
        if rows is None or cache is not None or len(rows) == 0 or get_xp(h.data) is not np:
            return 0
        p = self.attn_dropout if self.training else 0.0
        if p > 0.0 or F.uses_flash(h.data, T, T, masked, p, self.attention_impl):
            return 0
        return int((rows % T).min())

    # --- the same on plain arrays, for decoding (``GLM.infer``) ---

    def attend_array(self, q, k, v, sep, layer: int, own=None):
        """``attend`` on arrays, no dropout: q (B, nh, Tq, hs) against the Tk cached keys and values."""
        xp = get_xp(q)
        Tq, Tk = q.shape[2], k.shape[2]
        scale = 1.0 / math.sqrt(q.shape[-1])
        c = layer + 1 if self.softmax_scaling else 1  # GLM-130B's FP32 softmax: q/(√hs·c), scores times c
        s = (q * (scale / c)) @ k.swapaxes(-1, -2)  # (B, nh, Tq, Tk)
        if c != 1:
            s *= c
        # one new token sees everything cached; several must not see the later ones among them. ``own``
        # (GLMConfig.hide_own_token) joins GLM's mask, so the scores are masked once
        allowed = glm_mask(xp, sep, Tq, Tk) if Tq > 1 else None
        if own is not None:
            allowed = own if allowed is None else allowed & own
        if allowed is not None:
            s = xp.where(allowed, s, -np.inf)
        return F.softmax_array(s, -1) @ v  # (B, nh, Tq, hs)

    def infer(self, h, B: int, T: int, sep, layer: int = 0, cache: KVCache | None = None, rotary=None, own=None):
        """``forward`` on a plain (N, C) array: the new keys and values go into ``cache``. Returns (N, C)."""
        C = h.shape[-1]
        nh, hs = self.n_head, C // self.n_head
        qkv = self.query_key_value.infer(h).reshape(B, T, 3, nh, hs).transpose(2, 0, 3, 1, 4)  # (3, B, nh, T, hs)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if rotary is not None:
            cos, sin, chunks = rotary
            q, k = F.rope_array(q, cos, sin, chunks), F.rope_array(k, cos, sin, chunks)
        if cache is not None:
            k, v = cache.write(layer, k, v)  # (B, nh, Tk, hs)
        y = self.attend_array(q, k, v, sep, layer, own)  # (B, nh, T, hs)
        return self.dense.infer(y.transpose(0, 2, 1, 3).reshape(B * T, C))  # (N, C)


class MLP(Module):
    """Linear(C→4C) → tanh-GeLU → Linear(4C→C) → dropout; with ``ffn="geglu"`` (GLM-130B):
    Linear(C→2F) → a ⊙ GeLU_erf(b) on its halves → Linear(F→C), F = (8/3)C, the official names kept."""

    def __init__(self, config: GLMConfig, rng: np.random.Generator):
        super().__init__()
        C, Fw, std = config.d_model, config.ffn_size, config.init_std
        self.geglu = config.ffn == "geglu"
        up = 2 * Fw if self.geglu else Fw  # GeGLU's projection holds both halves [a | b]
        if config.norm == "deepnorm":  # Xavier normal with gain β = (2N)^-½ on both FFN matrices (GLM-130B §2.1)
            beta = 1.0 / config.deepnorm_alpha
            self.dense_h_to_4h = Linear(C, up, rng, std=beta * math.sqrt(2.0 / (C + up)))
            self.dense_4h_to_h = Linear(Fw, C, rng, std=beta * math.sqrt(2.0 / (Fw + C)))
        else:
            self.dense_h_to_4h = Linear(C, up, rng, std=std)
            self.dense_4h_to_h = Linear(Fw, C, rng, std=std / math.sqrt(2.0 * config.n_layer))  # residual writer
        self.dropout = Dropout(config.dropout)

    def forward(self, h: Tensor, rng: np.random.Generator | None = None) -> Tensor:
        u = self.dense_h_to_4h(h)  # (N, 4C), or (N, 2F) for GeGLU
        h = F.geglu(u) if self.geglu else F.gelu(u, approximate="tanh")  # (N, 4C) or (N, F)
        return self.dropout(self.dense_4h_to_h(h), rng)  # (N, C)

    def infer(self, h):
        """``forward`` on a plain (N, C) array, no dropout."""
        u = self.dense_h_to_4h.infer(h)
        return self.dense_4h_to_h.infer(F.geglu_array(u) if self.geglu else F.gelu_tanh_array(u))


class Block(Module):
    """One pre-LN transformer layer: x + Attn(LN1(x)), then + MLP(LN2(x)).

    ``post_attention_layernorm`` is the official name of the LayerNorm *before* the MLP.
    With ``norm="deepnorm"`` (GLM-130B, SAT ``DeepNormWithGLUMixin.layer_forward``) the same two LayerNorms sit on
    the residual stream instead: a = LN1(x); h = α·a + Attn(a); m = LN2(h); out = α·m + MLP(m), α = (2N)^½. The next
    layer's LN1 (or the final LN) normalises ``out``, so it is post-LN, and the embeddings are normalised too.
    """

    def __init__(self, config: GLMConfig, rng: np.random.Generator):
        super().__init__()
        C, eps = config.d_model, config.layernorm_eps
        self.alpha = config.deepnorm_alpha if config.norm == "deepnorm" else None
        self.input_layernorm = LayerNorm(C, eps)
        self.attention = SelfAttention(config, rng)
        self.post_attention_layernorm = LayerNorm(C, eps)
        self.mlp = MLP(config, rng)

    def forward(self, x: Tensor, B: int, T: int, sep, layer: int = 0, cache: KVCache | None = None,
                rng: np.random.Generator | None = None, rotary=None, rows=None, own=None) -> Tensor:
        """(N, C); with ``rows`` (R,) flat positions, only those rows leave the layer, (R, C). Every position still
        gives its key and value, but after attention each row is computed on its own (the projection, the
        residual, the LayerNorm and the MLP), so the last layer need not compute the rows no loss reads."""
        if self.alpha is not None:  # DeepNorm
            a = self.input_layernorm(x)  # (N, C)
            att = self.attention(a, B, T, sep, layer, cache, rng, rotary, rows, own)
            m = self.post_attention_layernorm((a if rows is None else a[rows]) * self.alpha + att)
            return m * self.alpha + self.mlp(m, rng)  # (N, C) or (R, C)
        att = self.attention(self.input_layernorm(x), B, T, sep, layer, cache, rng, rotary, rows, own)  # (N|R, C)
        x = (x if rows is None else x[rows]) + att
        return x + self.mlp(self.post_attention_layernorm(x), rng)  # (N, C) or (R, C)

    def infer(self, x, B: int, T: int, sep, layer: int = 0, cache: KVCache | None = None, rotary=None, own=None):
        """``forward`` on a plain (N, C) array (which it may overwrite), no dropout."""
        if self.alpha is not None:  # DeepNorm
            a = self.input_layernorm.infer(x)
            m = self.post_attention_layernorm.infer(a * self.alpha + self.attention.infer(a, B, T, sep, layer, cache,
                                                                                          rotary, own))
            return m * self.alpha + self.mlp.infer(m)
        x += self.attention.infer(self.input_layernorm.infer(x), B, T, sep, layer, cache, rotary, own)
        x += self.mlp.infer(self.post_attention_layernorm.infer(x))
        return x


class GLM(Module):
    """The GLM language model: ``forward(tokens, position_ids, block_position_ids, sep) -> logits (B, T, V)``."""

    def __init__(self, config: GLMConfig, rng: np.random.Generator):
        super().__init__()
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"GLM: rng must be a numpy.random.Generator, got {type(rng).__name__}")
        self.config = config
        C, std, P = config.d_model, config.init_std, config.max_len + 1
        self.word_embeddings = Embedding(config.vocab_size, C, rng, std)  # (V, C), also the output head
        if config.position == "learned2d":  # RoPE models turn q and k instead (SelfAttention.qkv)
            self.position_embeddings = Embedding(P, C, rng, std)  # (max_len + 1, C): the position in the text
            self.block_position_embeddings = Embedding(P, C, rng, std)  # (max_len + 1, C): 0 in Part A, 1.. in a span
        self.embedding_dropout = Dropout(config.dropout)
        self.layers = ModuleList(Block(config, rng) for _ in range(config.n_layer))
        self.final_layernorm = LayerNorm(C, config.layernorm_eps)

    def _check_inputs(self, tokens, position_ids, block_position_ids, sep, cache):
        """Validate shapes and id ranges with errors that say what is wrong; returns int arrays and (B,) sep."""
        xp = get_xp(self.word_embeddings.weight.data)
        arrays = []
        for name, a in (("tokens", tokens), ("position_ids", position_ids), ("block_position_ids",
                                                                           block_position_ids)):
            a = a.data if isinstance(a, Tensor) else a
            a = xp.asarray(a)
            if a.ndim != 2:
                raise ValueError(f"GLM.forward: {name} must be (B, T), got shape {a.shape}")
            if a.dtype.kind not in "iu":
                raise ValueError(f"GLM.forward: {name} must be integers, got dtype {a.dtype}")
            arrays.append(a)
        tokens, position_ids, block_position_ids = arrays
        B, T = tokens.shape
        if position_ids.shape != (B, T) or block_position_ids.shape != (B, T):
            raise ValueError(
                f"GLM.forward: tokens {tokens.shape}, position_ids {position_ids.shape} and block_position_ids "
                f"{block_position_ids.shape} must have the same (B, T) shape"
            )
        max_len = self.config.max_len
        for name, a in (("position_ids", position_ids), ("block_position_ids", block_position_ids)):
            if a.size and (int(a.max()) > max_len or int(a.min()) < 0):
                raise ValueError(
                    f"GLM.forward: {name} range [{int(a.min())}, {int(a.max())}] does not fit the position table "
                    f"of max_len={max_len} (ids 0..{max_len}); the input is too long for this model"
                )
        if sep is None:
            raise ValueError("GLM.forward: sep is required (the Part A length per sample; use 0 for causal)")
        sep = xp.asarray(sep.data if isinstance(sep, Tensor) else sep).reshape(-1).astype(np.int64)
        if sep.shape[0] == 1 and B > 1:
            sep = xp.broadcast_to(sep, (B,))
        if sep.shape[0] != B:
            raise ValueError(f"GLM.forward: sep has {sep.shape[0]} entries for a batch of {B}")
        if cache is not None and cache.length + T > cache.capacity:
            raise ValueError(
                f"GLM.forward: the KV cache holds {cache.length} of {cache.capacity} positions and cannot take {T} more"
            )
        return tokens, position_ids, block_position_ids, sep

    def embed(self, tokens, position_ids, block_position_ids, rng=None) -> Tensor:
        """word + position + block-position embedding (word only with RoPE), then dropout: (N, C)."""
        x = self.word_embeddings(tokens.reshape(-1))  # (N, C)
        if self.config.embedding_grad_scale != 1.0:  # EGS: the same values, alpha of the gradient into the table
            x = F.grad_scale(x, self.config.embedding_grad_scale)
        if self.config.position == "learned2d":
            x = x + self.position_embeddings(position_ids.reshape(-1))
            x = x + self.block_position_embeddings(block_position_ids.reshape(-1))
        return self.embedding_dropout(x, rng)

    def rotary(self, position_ids, block_position_ids, tokens=None, cache: KVCache | None = None):
        """(cos, sin, chunks) that turn q and k by the positions (``F.rotary_tables``), or None for the tables.

        rope1d uses the first position row only, so a Part-B token sits at its blank's position (GLM-130B App. B.3);
        with ``gmask_positions="continue"`` a [gMASK] fill counts on from its blank instead (``rope1d_positions``,
        which reads the blank's token from ``tokens``, or from the ``cache`` when decoding). rope2d turns half of
        each head by the position and half by the block id (SAT ``glm130B_model.py``)."""
        if self.config.position == "learned2d":
            return None
        if self.config.position == "rope2d":
            ids = [position_ids, block_position_ids]
        elif self.config.gmask_positions == "continue":
            row = cache.tokens[:, :cache.length + tokens.shape[1]] if cache is not None else tokens  # (B, Tk)
            ids = [rope1d_positions(row, position_ids, block_position_ids)]
        else:
            ids = [position_ids]
        cos, sin = F.rotary_tables(ids, self.config.head_size, self.word_embeddings.weight.dtype)
        return cos, sin, len(ids)

    def _raw_part_a(self, block_position_ids):
        """What ``GLMConfig.raw_part_a`` needs to give every layer after the first Part A's embeddings back: None when
        it is off (or there is one layer); else the flat Part-B rows (R,), the only rows a layer before the last
        computes past its attention, and the index (N,) into ``concat([x0, out])`` that takes each Part-A row from the
        embeddings x0 and each Part-B row from the layer's output (R, C)."""
        if not self.config.raw_part_a or len(self.layers) == 1:
            return None
        xp = get_xp(block_position_ids)
        flat_b = xp.asarray(block_position_ids).reshape(-1) > 0  # (N,)
        part_b = xp.flatnonzero(flat_b)
        back = xp.arange(flat_b.size)
        back[part_b] = flat_b.size + xp.arange(part_b.size)
        return part_b, back

    def own_mask(self, position_ids, block_position_ids, cache: KVCache | None = None):
        """``masks.own_token_mask`` (B, 1, T, Tk) of the queries against every key (those in the ``cache`` too,
        whose ids are written before this is called) when ``config.hide_own_token`` or ``config.raw_part_a``; else
        None."""
        cfg = self.config
        if not (cfg.hide_own_token or cfg.raw_part_a):
            return None
        xp = get_xp(position_ids)
        keys = (position_ids, block_position_ids)
        if cache is not None:
            end = cache.length + position_ids.shape[1]
            keys = (cache.positions[:, :end], cache.blocks[:, :end])
        return own_token_mask(xp, position_ids, block_position_ids, *keys, own_slot=cfg.hide_own_token,
                              other_spans=cfg.raw_part_a)

    def forward(self, tokens, position_ids, block_position_ids, sep, cache: KVCache | None = None,
                rng: np.random.Generator | None = None, rows=None) -> Tensor:
        """Logits (B, T, V) for int arrays tokens / position_ids / block_position_ids (B, T) and sep (B,).

        Key j is visible to query i when j < sep[b] (Part A) or j <= i. With a ``cache`` the new K/V are appended
        and the queries attend over everything cached so far (sep counts from the start of the cache); the cached
        K/V carry no gradient, so use a cache for inference only.
        ``rng`` drives dropout in training mode.
        ``rows`` (R,) flat indices into the B*T positions: only those rows get logits, (R, V). The loss needs only
        the Part-B rows, and with a vocabulary of thousands the tied head is the largest product of the step. The
        last layer already computes only those rows past its attention (``Block.forward``): in a one-layer model the
        MLP then runs on the Part-B rows alone.
        """
        tokens, position_ids, block_position_ids, sep = self._check_inputs(
            tokens, position_ids, block_position_ids, sep, cache
        )
        B, T = tokens.shape
        x = self.embed(tokens, position_ids, block_position_ids, rng)  # (N, C)
        if cache is not None:
            cache.write_ids(tokens, position_ids, block_position_ids)
        rotary = self.rotary(position_ids, block_position_ids, tokens, cache)  # None, or (B, 1, T, hs) tables
        own = self.own_mask(position_ids, block_position_ids, cache)  # None, or (B, 1, T, Tk)
        last = len(self.layers) - 1
        raw = self._raw_part_a(block_position_ids)  # None, or (Part-B rows, the index that puts Part A back)
        x0 = x
        for i, block in enumerate(self.layers):
            # the last layer computes only the rows asked for (R, C): past its attention, every op is row by row
            if raw is None or i == last:
                x = block(x, B, T, sep, i, cache, rng, rotary, rows if i == last else None, own)  # (N, C); last: (R, C)
            else:  # GLMConfig.raw_part_a: only the Part-B rows go on; Part A enters the next layer as its embeddings
                x = F.concat([x0, block(x, B, T, sep, i, cache, rng, rotary, raw[0], own)])[raw[1]]  # (N, C)
        if cache is not None:
            cache.length += T
        if rows is not None:
            return F.linear(self.final_layernorm(x), self.word_embeddings.weight)  # (R, V)
        x = self.final_layernorm(x)  # (N, C)
        logits = F.linear(x, self.word_embeddings.weight)  # (N, V): tied head, no bias
        return logits.reshape(B, T, self.config.vocab_size)  # (B, T, V)

    def infer(self, tokens, position_ids, block_position_ids, sep, cache: KVCache | None = None,
              check: bool = True):
        """``forward`` on plain arrays for decoding: logits (B, T, V) as an array on the model's device.

        Every layer's ``infer`` does its ``forward``'s arithmetic with the same helpers, without Tensor objects, graph
        or dropout. Decoding one token is a chain of tiny products whose time is per-call overhead, so this path is
        about twice as fast as ``forward`` under ``no_grad``; tests hold the two to the same logits.
        ``check=False`` skips ``forward``'s input checks (about 5 % of a decoding step) for a caller that has checked
        its ids itself: it must pass int arrays (B, T) and sep as a (B,) array.
        """
        if check:
            tokens, position_ids, block_position_ids, sep = self._check_inputs(
                tokens, position_ids, block_position_ids, sep, cache
            )
        B, T = tokens.shape
        x = self.word_embeddings.infer(tokens.reshape(-1))  # (N, C)
        if self.config.position == "learned2d":
            x += self.position_embeddings.infer(position_ids.reshape(-1))
            x += self.block_position_embeddings.infer(block_position_ids.reshape(-1))
        if cache is not None:
            cache.write_ids(tokens, position_ids, block_position_ids)
        rotary = self.rotary(position_ids, block_position_ids, tokens, cache)
        own = self.own_mask(position_ids, block_position_ids, cache)
        raw = self._raw_part_a(block_position_ids)
        x0 = x.copy() if raw is not None else None  # block.infer may overwrite x
        for i, block in enumerate(self.layers):
            x = block.infer(x, B, T, sep, i, cache, rotary, own)  # (N, C)
            if raw is not None and i < len(self.layers) - 1:  # GLMConfig.raw_part_a: Part A back to its embeddings
                x = get_xp(x).concatenate([x0, x[raw[0]]])[raw[1]]
        if cache is not None:
            cache.length += T
        x = self.final_layernorm.infer(x)  # (N, C)
        return (x @ self.word_embeddings.weight.data.T).reshape(B, T, self.config.vocab_size)  # tied head

    @no_grad()
    def attention_probs(self, tokens, position_ids, block_position_ids, sep, layer: int) -> np.ndarray:
        """The attention probabilities (B, nh, T, T) of one layer, as NumPy, for plots (no dropout)."""
        if not 0 <= layer < len(self.layers):
            raise ValueError(f"GLM.attention_probs: layer must be in [0, {len(self.layers)}), got {layer}")
        tokens, position_ids, block_position_ids, sep = self._check_inputs(
            tokens, position_ids, block_position_ids, sep, None
        )
        B, T = tokens.shape
        x = self.embed(tokens, position_ids, block_position_ids)
        rotary = self.rotary(position_ids, block_position_ids, tokens)
        own = self.own_mask(position_ids, block_position_ids)
        raw = self._raw_part_a(block_position_ids)
        x0 = x
        for i in range(layer):
            if raw is None:
                x = self.layers[i](x, B, T, sep, i, rotary=rotary, own=own)  # (N, C)
            else:  # GLMConfig.raw_part_a, as in forward
                x = F.concat([x0, self.layers[i](x, B, T, sep, i, rotary=rotary, rows=raw[0], own=own)])[raw[1]]
        attn = self.layers[layer].attention
        q, k, _ = attn.qkv(self.layers[layer].input_layernorm(x), B, T, rotary)
        xp = get_xp(q.data)
        s = (q.data @ xp.swapaxes(k.data, -1, -2)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, nh, T, T)
        allowed = glm_mask(xp, sep, T, T)
        s = xp.where(allowed if own is None else allowed & own, s, -np.inf)
        return to_numpy(F.softmax(Tensor._wrap(s, False), axis=-1).data)


def rope1d_positions(tokens, position_ids, block_position_ids):
    """GLM-130B's one-dimensional positions (App. B.3) from GLM's two rows of ids, for ``gmask_positions="continue"``.

    A Part-B token (block id b > 0) of a [MASK] or [sMASK] blank keeps its blank's position p; one of a [gMASK] blank
    counts on from it, p + b: the [gMASK] suffix is generated as a continuation of the text, as in GLM-130B's
    ``generate.py`` (``position_ids`` = ``arange``, with the [MASK] positions overwritten). Which blank a token fills is
    read off ``tokens[b, p]`` (B, Tk): a Part-A token sits at its own index, so p is also where its blank is.
    position_ids and block_position_ids (B, T) are the last T of the Tk tokens. Returns (B, T) ints.
    """
    xp = get_xp(position_ids)
    blank = xp.take_along_axis(tokens, xp.minimum(position_ids, tokens.shape[1] - 1), axis=1)  # (B, T)
    continued = (block_position_ids > 0) & (blank == GMASK_ID)
    return position_ids + block_position_ids * continued


# --- inference cache ------------------------------------------------------------------------------------------------


class KVCache:
    """Preallocated keys and values of every layer, (L, B, nh, capacity, hs) each, filled left to right.

    Usage: encode the context once with ``sep = len(context)`` (full attention over it), then feed one token at a
    time with ``sep = 0``: each step computes q, k, v for the new token only and attends over the ``length``
    cached positions, so a token costs O(T) instead of recomputing the whole sequence (O(T²)).
    ``truncate(n)`` rolls the cache back to its first n positions (e.g. to try several continuations of a context).
    """

    def __init__(self, model_or_config, batch_size: int, capacity: int, xp=np, dtype=np.float32):
        config = model_or_config.config if isinstance(model_or_config, GLM) else model_or_config
        if not isinstance(config, GLMConfig):
            raise TypeError(f"KVCache: expected a GLM or a GLMConfig, got {type(model_or_config).__name__}")
        if batch_size <= 0 or capacity <= 0:
            raise ValueError(f"KVCache: batch_size and capacity must be positive, got {batch_size} and {capacity}")
        if isinstance(model_or_config, GLM):
            dtype = model_or_config.word_embeddings.weight.dtype
            xp = get_xp(model_or_config.word_embeddings.weight.data)
        shape = (config.n_layer, batch_size, config.n_head, capacity, config.head_size)
        self.k = xp.zeros(shape, dtype=dtype)  # (L, B, nh, capacity, hs)
        self.v = xp.zeros(shape, dtype=dtype)  # (L, B, nh, capacity, hs)
        self.tokens = xp.zeros((batch_size, capacity), dtype=np.int64)  # (B, capacity): the ids fed so far
        self.positions = xp.zeros((batch_size, capacity), dtype=np.int64)  # and their position ids
        self.blocks = xp.zeros((batch_size, capacity), dtype=np.int64)  # and their block ids
        self.batch_size, self.capacity, self.length = batch_size, capacity, 0  # capacity: positions, not a position id

    def write_ids(self, tokens, position_ids, block_position_ids) -> None:
        """Record the new (B, T) token, position and block ids after the cached ones (a [gMASK] fill under 1-D RoPE
        looks its blank up; ``GLMConfig.hide_own_token`` finds each Part-B token's slot)."""
        end = self.length + tokens.shape[1]
        self.tokens[:, self.length:end] = tokens
        self.positions[:, self.length:end] = position_ids
        self.blocks[:, self.length:end] = block_position_ids

    def write(self, layer: int, k, v):
        """Write the new (B, nh, T, hs) key/value arrays after the cached ones; return all of them, (B, nh, Tk, hs)
        views of the cache. ``length`` moves on once every layer has written (``GLM.forward`` / ``GLM.infer``)."""
        B, _, T, _ = k.shape
        if B != self.batch_size:
            raise ValueError(f"KVCache: built for a batch of {self.batch_size}, got {B}")
        end = self.length + T
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """``write`` for Tensors (``forward``); the cached keys and values carry no gradient."""
        k_all, v_all = self.write(layer, k.data, v.data)
        return Tensor._wrap(k_all, False), Tensor._wrap(v_all, False)

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"KVCache.truncate: length must be in [0, {self.length}], got {length}")
        self.length = length


# --- loss -------------------------------------------------------------------------------------------------------


def glm_loss(model: GLM, batch, rng: np.random.Generator | None = None) -> Tensor:
    """GLM's loss (docs/official-code.md §4): cross-entropy summed over every target with loss_mask 1 in the batch,
    divided by their count."""
    xp = get_xp(model.word_embeddings.weight.data)  # the batch is NumPy; on a GPU rows and targets follow the model
    rows = np.flatnonzero(to_numpy(batch.loss_mask).reshape(-1) > 0)  # (R,) the Part-B targets
    targets = to_numpy(batch.targets).reshape(-1)[rows]  # (R,)
    logits = model(batch.tokens, batch.position_ids, batch.block_position_ids, batch.sep, rng=rng,
                   rows=to_device(rows, xp))  # (R, V)
    return F.cross_entropy(logits, to_device(targets, xp))
