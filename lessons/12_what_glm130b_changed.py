# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Lesson 12 — What GLM-130B changed
#
# GLM-130B (Zeng et al. 2022) kept GLM's blank infilling and changed the model around it, so that 130 billion
# parameters would train stably in 16-bit floats on hundreds of GPUs. Five changes, each a switch on `GLMConfig`
# in minglm (`minglm/model.py`, `docs/glm130b.md`):
#
# | switch | GLM (lessons 4-11) | GLM-130B |
# |---|---|---|
# | `position` | two learned position tables | **RoPE**, rotary positions (1-D; SAT also has a 2-D variant) |
# | `norm` | pre-LN | **DeepNorm**: post-LN with a weighted residual and a scaled init |
# | `ffn` | GeLU MLP, 4C | **GeGLU**, a gated MLP of width (8/3)C |
# | `embedding_grad_scale` | 1 | **EGS** 0.1: a tenth of the gradient reaches the word embeddings |
# | `softmax_scaling` | off | **FP32 softmax** with the scores scaled down by the layer number first |
#
# Each one is shown below on the model, then all are measured with the machinery of `python -m minglm ablate`.
#
# **Learning goals.** Say what each switch does and which failure it guards against, check RoPE's
# relative-position property, and read the ablation table for what a few hundred steps can and cannot show.

# %%
# %matplotlib inline
import importlib.util
import inspect
import os
import sys
from dataclasses import replace
from pathlib import Path

if importlib.util.find_spec("minglm") is None:  # opened from lessons/ without `pip install -e .`
    sys.path.insert(0, str(Path.cwd().parent))

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import display

import minglm.functional as F
import viz
from minglm import ablate, exercises, no_grad
from minglm.model import GLM, Block, GLMConfig, glm_loss
from minglm.tensor import Tensor

FAST = os.environ.get("MINGLM_FAST", "1") == "1"
rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. RoPE: positions as rotations
#
# Instead of adding a position vector to the input, RoPE **turns** each query and key by an angle proportional to
# its position. The head's dims are paired, $(x_i, x_{i+d/2})$, and pair $i$ at position $n$ turns by
# $n\,\theta_i$ with $\theta_i = 10000^{-2i/d}$:
#
# $$\begin{pmatrix} x'_i \\ x'_{i+d/2} \end{pmatrix} = \begin{pmatrix} \cos n\theta_i & -\sin n\theta_i \\
# \sin n\theta_i & \cos n\theta_i \end{pmatrix} \begin{pmatrix} x_i \\ x_{i+d/2} \end{pmatrix}.$$
#
# Two rotations compose: the score between a query turned by $m$ and a key turned by $n$ depends only on $m - n$.
# Attention therefore sees *relative* positions, with no table to learn. Checked with `F.rotary_tables` and
# `F.rope_array` (the code the model runs):

# %%
d = 16
q, k = rng.standard_normal(d), rng.standard_normal(d)


def turned(x, position):
    cos, sin = F.rotary_tables([np.array([[position]])], d, dtype=np.float64)
    return F.rope_array(x[None, None, None], cos, sin)[0, 0, 0]


for m, n in ((5, 2), (13, 10), (103, 100)):
    print(f"query at {m:>3}, key at {n:>3} (distance {m - n}): score {turned(q, m) @ turned(k, n):+.6f}")

# %% [markdown]
# In GLM-130B (1-D RoPE) a Part-B token uses only its first position id, the blank's position, so every token of a
# span sits at its blank; the order inside the span comes from the causal mask. SAT's 2-D variant turns half of
# each head by the position and half by the block id. Two tokens of one span (position 7, block ids 1 and 2) under
# each, through `GLM.rotary`, the tables the model itself uses:

# %%
for position in ("rope1d", "rope2d"):
    m = GLM(GLMConfig(vocab_size=20, n_layer=1, n_head=1, d_model=d, max_len=16, position=position), rng)
    cos, sin, chunks = m.rotary(np.array([[7, 7]]), np.array([[1, 2]]))
    a, b = (F.rope_array(q[None, None, None], cos[:, :, i:i + 1], sin[:, :, i:i + 1], chunks)[0, 0, 0]
            for i in (0, 1))
    print(f"{position}: the two tokens' rotated queries differ by {np.abs(a - b).max():.3f} "
          f"(first half {np.abs(a - b)[: d // 2].max():.3f}, second half {np.abs(a - b)[d // 2:].max():.3f})")

# %% [markdown]
# 1-D: identical, the span's order is left to the mask. 2-D: the first half (turned by the position) is the same,
# the second half (turned by the block id) differs. The angles of each pair over the positions:

# %%
cos, _ = F.rotary_tables([np.arange(64)[None]], d, dtype=np.float64)
fig, ax = plt.subplots(figsize=(8, 2.8))
ax.imshow(cos[0, 0, :, : d // 2].T, aspect="auto", cmap="RdBu", vmin=-1, vmax=1)
ax.set_xlabel("position")
ax.set_ylabel("pair i")
ax.set_title("cos(n·θ_i): fast-turning pairs see near tokens, slow ones far tokens")
plt.show()

# %% [markdown]
# ## 2. DeepNorm: post-LN that trains
#
# Pre-LN (lesson 4) trains easily, but its residual stream grows with depth and the last layers' LayerNorm does a
# lot of the work. Post-LN normalises the stream itself after every sub-layer, which is better in the end but
# hard to train deep. DeepNorm makes post-LN stable by weighting the residual by $\alpha = (2N)^{1/2}$ and shrinking
# the initial weights of the value and output projections and the MLP by $\beta = (2N)^{-1/2}$, for $N$ layers:
#
# $$x \leftarrow \mathrm{LN}(\alpha\, x + \mathrm{Attn}(x)), \qquad
# x \leftarrow \mathrm{LN}(\alpha\, x + \mathrm{MLP}(x)).$$
#
# The first branch of `Block.forward`:

# %% tags=["thumbnail"]
print(inspect.getsource(Block.forward).split("        x = x +")[0])


def stream_norms(norm, weight_scale=10.0, layers=8):
    """‖x‖ after each block of an 8-layer model whose weight matrices are × weight_scale (trained weights are far
    larger than the initial ones; lesson 4), and DeepNorm's α."""
    model = GLM(GLMConfig(vocab_size=20, n_layer=layers, n_head=4, d_model=32, max_len=16, norm=norm),
                np.random.default_rng(1))
    for _, p in model.named_parameters():
        if p.data.ndim == 2:
            p.data *= np.float32(weight_scale)
    tokens = np.random.default_rng(2).integers(8, 20, size=(2, 10))
    pos, block = np.tile(np.arange(10), (2, 1)), np.zeros((2, 10), dtype=np.int64)
    norms = []
    with no_grad():
        x = model.embed(tokens, pos, block)
        for layer in model.layers:
            x = layer(x, 2, 10, np.array([5, 5]))
            norms.append(float(np.linalg.norm(x.numpy(), axis=1).mean()))
    return np.array(norms), model.config.deepnorm_alpha


fig, ax = plt.subplots(figsize=(6, 3))
for norm in ("pre", "deepnorm"):
    norms, alpha = stream_norms(norm)
    ax.plot(range(1, 9), norms / norms[0], "o-",
            label=f"{norm}" + (f" (α = {alpha:.1f})" if norm == "deepnorm" else ""))
    print(f"{norm:>8}: ‖x‖ after each layer {np.round(norms, 1)}")
ax.set_xlabel("layers applied")
ax.set_ylabel("‖x‖ / ‖x‖ after layer 1")
ax.set_title("The residual stream with depth (8 layers, weights × 10)")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# Pre-LN's stream keeps growing with depth, because every layer adds to an unnormalised sum. DeepNorm's does not:
# every layer starts from a normalised input and adds at most one layer's worth to it, so no depth of layers can
# make the stream run away: what GLM-130B needed for 70 layers in float16.
#
# ## 3. GeGLU: a gated MLP
#
# The MLP's first projection makes two halves $[a \mid b]$ and the activation lets $a$ through gated by
# $\mathrm{GeLU}(b)$: $\mathrm{GeGLU}(u) = a \odot \mathrm{GeLU}(b)$. To keep the parameter count, the width drops
# from $4C$ to $\frac{8}{3}C$:

# %%
for ffn in ("gelu", "geglu"):
    cfg = GLMConfig(vocab_size=100, n_layer=4, n_head=4, d_model=96, max_len=64, ffn=ffn)
    mlp = GLM(cfg, np.random.default_rng(0)).layers[0].mlp
    print(f"{ffn:>5}: width {cfg.ffn_size}, up-projection {mlp.dense_h_to_4h.weight.shape}, "
          f"MLP parameters {sum(p.size for _, p in mlp.named_parameters()):,}")
u = Tensor(rng.standard_normal((1, 6)))
print("GeGLU of [a | b] = a ⊙ GeLU(b):", np.round(F.geglu(u).numpy(), 4),
      "=", np.round(u.numpy()[:, :3] * F.gelu(u[:, 3:], approximate="none").numpy(), 4))

# %% [markdown]
# ## 4. EGS: a smaller gradient into the embeddings
#
# GLM-130B's loss spikes often started in the word embeddings, whose gradients were much larger than the other
# layers'. Embedding gradient shrink leaves the forward unchanged and multiplies the gradient flowing back into the
# table *from the input side* by $\alpha = 0.1$: `word_embedding * alpha + word_embedding.detach() * (1 - alpha)`.
# The table is also the output head (tied weights), and that gradient is not shrunk. On one batch, the two parts
# separated (the input part is the difference of the two runs divided by $1 - \alpha$):

# %%
def embedding_grad(scale):
    cfg = GLMConfig(vocab_size=30, n_layer=2, n_head=4, d_model=32, max_len=40, embedding_grad_scale=scale)
    model = GLM(cfg, np.random.default_rng(0))
    batch, _ = viz.sample_from_text("Is this a dagger which I see before me", objective="glm-base", seed=1)
    loss = glm_loss(model, batch)
    loss.backward()
    return loss.item(), model.word_embeddings.weight.grad


(loss1, g1), (loss01, g01) = embedding_grad(1.0), embedding_grad(0.1)
from_input = (g1 - g01) / 0.9  # what the input side contributes without EGS
from_head = g1 - from_input  # what the tied output head contributes (EGS leaves it alone)
print(f"loss {loss1:.6f} vs {loss01:.6f} (the forward is unchanged)")
print(f"‖gradient from the input side‖ {np.linalg.norm(from_input):.4f} -> with EGS "
      f"{np.linalg.norm(g01 - from_head):.4f} (× {np.linalg.norm(g01 - from_head) / np.linalg.norm(from_input):.2f})")
print(f"‖gradient from the output head‖ {np.linalg.norm(from_head):.4f} in both runs")

# %% [markdown]
# ## 5. The FP32 softmax
#
# In float16 the largest number is 65,504. Attention scores of a deep model can pass that, and `exp` overflows much
# earlier. GLM-130B computes the scores with the query divided by the layer's number $c$ as well as by $\sqrt d$,
# turns them to float32, multiplies by $c$ again and takes the softmax there. The same mathematics, another range:

# %%
scores = np.array([60000.0, 70000.0, 80000.0])  # large attention logits deep in a model
c = 10.0
with np.errstate(over="ignore"):
    print("float16 scores:           ", scores.astype(np.float16))  # 70000 and 80000 overflow to inf
small = (scores / c).astype(np.float16)  # q/(√d·c) kᵀ computed in float16: in range
print("scaled by 1/c in float16: ", small)
back = small.astype(np.float32) * c  # float32, times c again
print("softmax in float32:       ", np.round(np.exp(back - back.max()) / np.exp(back - back.max()).sum(), 4))

# %% [markdown]
# minglm trains in float32, where none of this overflows: `softmax_scaling=True` gives the same numbers as the plain
# softmax, which the ablation below confirms to the digit.
#
# ## 6. The ablation
#
# `python -m minglm ablate --quick` trains the tiny model with each switch alone, all together, and at a ten times
# larger learning rate, at two seeds, and measures the validation loss, greedy fills, the largest gradient-norm
# spike and the speed (`minglm/ablate.py`). Here the same machinery runs a few settings briefly (in fast mode, two
# settings for 20 steps: the mechanics, not a result; `MINGLM_FAST=0` runs the whole `--quick` ablation, about ten
# minutes):

# %%
if FAST:
    cfg = replace(ablate.QUICK, steps=20, seeds=(0,), fill_word=6, fill_span=2, eval_batches=1, fill_max_new=6)
    settings = ablate.select(["glm1", "glm130b"])
else:
    cfg, settings = ablate.QUICK, None
result = ablate.run_ablation(cfg, settings)
print(ablate.format_table(result))
display(viz.plot_ablation(result))

# %% [markdown]
# The full `--quick` ablation (120 steps, two seeds, 12 settings), as measured for the README on a 2-core machine:
#
# | setting | val loss | largest grad-norm spike |
# |---|---:|---:|
# | GLM-1 (all off) | 2.742 | ×3.0 |
# | RoPE 1-D | **2.592** | ×1.7 |
# | RoPE 2-D | 2.613 | ×2.3 |
# | DeepNorm | 3.037 | ×12.9 |
# | GeGLU | 2.752 | ×3.2 |
# | EGS 0.1 | 2.763 | ×5.2 |
# | FP32 softmax | 2.742 | ×3.0 |
# | GLM-130B (all on) | 2.714 | ×1.8 |
# | GLM-1, lr × 10 | 3.050 | ×2.2 |
# | GLM-130B, lr × 10 | 3.144 | ×1.4 |
#
# What 120 steps show, and no more: RoPE lowers the loss fastest (Part-B tokens find their blank's neighbours
# through a rotation instead of two learned tables); DeepNorm starts slowest on 4 layers, where depth is not the
# problem it solves; the FP32 softmax changes nothing in float32, to the digit; at the high learning rate nothing
# diverged, every run stalled near the unigram loss. The switches were made for a scale (70 layers, float16,
# 130B parameters) that a CPU course cannot reach; the ablation tells you what they cost and do at this one.
#
# ## Summary
#
# - RoPE turns queries and keys by their positions, so scores depend on relative position and no table is learned.
# - DeepNorm is post-LN with an $\alpha$-weighted residual and a $\beta$-scaled init: bounded activations at any depth.
# - GeGLU gates the MLP, $a \odot \mathrm{GeLU}(b)$, at width $\frac83 C$ to keep the parameter count.
# - EGS passes a tenth of the gradient into the word embeddings; the forward is unchanged.
# - The FP32 softmax scales the scores down before float16 can overflow and takes the softmax in float32.
# - `python -m minglm ablate` measures each switch on the same data and budget; read it for this scale only.
#
# ## Exercises
#
# **1.** Write RoPE for x (T, d) and integer positions (T,), in the rotate-half layout (dim i pairs with
# dim i + d/2).

# %%
def rope(x, positions, base):
    # your code here: return the rotated (T, d) array
    return None


exercises.check_rope(rope)

# %% [markdown]
# **2.** (Think.) RoPE is applied to queries and keys but not to values. Why would rotating the values be wrong?
# And why does 1-D RoPE with GLM's Part-B positions (every token of a span at its blank's position) still let the
# model know which token of the span comes next?
#
# **3.** (Think.) DeepNorm's $\alpha = (2N)^{1/2}$ grows with the number of layers. What does a large $\alpha$ do to
# the share of each layer's update in the residual stream, and why does that make a deep post-LN model stable?
