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
# # Lesson 4 — Attention and the transformer block
#
# Lesson 3 ended with one integer per sample, `sep`, that says who may see whom. This lesson builds the layer that
# uses it, piece by piece, each formula next to the library code that computes it:
#
# 1. **scaled dot-product attention**, and why the scores are divided by $\sqrt{d}$;
# 2. the **masks**: padding, causal, GLM's `sep`, all from one function;
# 3. **multi-head** attention: one projection, split into heads, joined again;
# 4. **LayerNorm**, the **tanh GeLU** MLP and the **pre-LN residual** block that holds them together.
#
# The code is `minglm/functional.py` (the ops) and `minglm/model.py` (`SelfAttention`, `MLP`, `Block`).
#
# **Learning goals.** Compute attention by hand and match the library, build any of the course's masks from `sep`,
# follow the shapes of multi-head attention, and explain what each line of `Block.forward` is for.

# %%
# %matplotlib inline
import importlib.util
import inspect
import math
import sys
from pathlib import Path

if importlib.util.find_spec("minglm") is None:  # opened from lessons/ without `pip install -e .`
    sys.path.insert(0, str(Path.cwd().parent))

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import display

import minglm.functional as F
import viz
from minglm import exercises, no_grad
from minglm.masks import glm_mask
from minglm.model import GLM, Block, GLMConfig, SelfAttention
from minglm.tensor import Tensor

rng = np.random.default_rng(0)


def show_source(fn):
    """Print a library function's source, so the formula above it sits next to the code that computes it."""
    print(inspect.getsource(fn))


# %% [markdown]
# ## 1. Scaled dot-product attention
#
# Every token $i$ has a **query** $q_i$, a **key** $k_i$ and a **value** $v_i$, vectors of $d$ numbers. Token $i$
# scores every token $j$ by how well its query matches their key, turns the scores of its row into weights with a
# softmax, and takes the weighted mean of the values:
#
# $$\mathrm{Attention}(Q, K, V) = \mathrm{softmax}\!\left(\frac{Q K^\top}{\sqrt{d}} + M\right) V,
# \qquad M_{ij} = \begin{cases} 0 & \text{key } j \text{ visible to query } i \\ -\infty & \text{otherwise.}
# \end{cases}$$
#
# `F.scaled_dot_product_attention(q, k, v, sep=...)` takes (B, H, T, d) tensors. Here it is on 6 tokens of one
# head, against the formula written directly in NumPy:

# %%
T, d = 6, 8
q, k, v = (rng.standard_normal((1, 1, T, d)) for _ in range(3))
out = F.scaled_dot_product_attention(Tensor(q), Tensor(k), Tensor(v), sep=np.array([3]), impl="plain")

scores = q[0, 0] @ k[0, 0].T / math.sqrt(d)  # (T, T): query rows, key columns
scores = np.where(glm_mask(np, 3, T)[0, 0], scores, -np.inf)  # M: -inf where the key is hidden
weights = np.exp(scores - scores.max(axis=1, keepdims=True))
weights /= weights.sum(axis=1, keepdims=True)  # each row sums to 1
print("max |library − formula| =", float(np.abs(out.numpy()[0, 0] - weights @ v[0, 0]).max()))
display(viz.plot_attention_map(weights, sep=3, labels=[f"t{i}" for i in range(T)], head=0,
                               title="softmax(q kᵀ/√d + M): sep = 3"))

# %% [markdown]
# ### Why divide by $\sqrt{d}$
#
# If the entries of $q$ and $k$ have variance 1, their dot product is a sum of $d$ such products and has variance
# $d$. Without the scale, wide heads produce large scores, the softmax puts almost all its weight on one key, and
# its gradient vanishes (lesson 1's softmax Jacobian $y_i(\delta_{ij} - y_j)$ is near 0 when one $y$ is near 1).
# Measured on random vectors:

# %%
dims = [4, 16, 64, 256, 1024]
raw_std, top_raw, top_scaled = [], [], []
for dd in dims:
    qq, kk = rng.standard_normal((200, dd)), rng.standard_normal((64, dd))
    s = qq @ kk.T
    raw_std.append(s.std())
    for store, z in ((top_raw, s), (top_scaled, s / math.sqrt(dd))):
        p = np.exp(z - z.max(axis=1, keepdims=True))
        store.append((p / p.sum(axis=1, keepdims=True)).max(axis=1).mean())

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.2))
ax1.plot(dims, raw_std, "o-", label="std of q·k")
ax1.plot(dims, np.sqrt(dims), "k:", label="√d")
ax1.set_xscale("log")
ax1.set_yscale("log")
ax1.set_xlabel("head size d")
ax1.legend(fontsize=8)
ax1.set_title("Unscaled scores grow like √d")
ax2.plot(dims, top_raw, "o-", label="softmax(q·k)")
ax2.plot(dims, top_scaled, "s-", label="softmax(q·k / √d)")
ax2.set_xscale("log")
ax2.set_xlabel("head size d")
ax2.set_ylabel("mean largest weight (64 keys)")
ax2.set_title("…and the unscaled softmax saturates")
ax2.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## 2. Masks from one function
#
# `minglm.masks.glm_mask(xp, sep, T, lengths=...)` is the only place the mask rule is written: key $j$ is visible
# to query $i$ when $j <$ `sep` or $j \le i$, and with `lengths` the rows of padding see nothing. Every mask of the
# course is that rule with another `sep`: `sep = 0` is causal (GPT), `sep = T` is fully bidirectional (BERT), and
# a GLM sample lies in between. Padding sits at the end, in the causal part, so no real token ever sees it.

# %% tags=["thumbnail"]
T = 10
cases = [("causal (sep 0)", 0, None), ("GLM (sep 6)", 6, None), ("bidirectional (sep T)", T, None),
         ("GLM + 3 pads (length 7)", 4, 7)]
fig, axes = plt.subplots(1, 4, figsize=(12, 3.2))
for ax, (title, sep, length) in zip(axes, cases):
    m = glm_mask(np, sep, T, lengths=None if length is None else np.array([length]))[0, 0]
    ax.imshow(m, cmap="Blues", vmin=0, vmax=1.3)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("key")
    ax.set_xticks([])
    ax.set_yticks([])
axes[0].set_ylabel("query")
plt.show()

# %% [markdown]
# Inside attention the mask is applied as $-\infty$ before the softmax, so a hidden key gets weight exactly 0 and
# the weights of the visible keys still sum to 1. (Exercise 1 asks what goes wrong if you zero the weights after
# the softmax instead.)
#
# ## 3. Multi-head attention
#
# One head compares tokens in one way. $n_h$ heads of size $h_s = C / n_h$ each get their own slice of the
# projections and can look for different things; their outputs are put side by side and mixed by one more
# matrix:
#
# $$\mathrm{MultiHead}(x) = [\,\mathrm{head}_1 \,|\, \dots \,|\, \mathrm{head}_{n_h}] \, W_O, \qquad
# \mathrm{head}_h = \mathrm{Attention}(x W_Q^{(h)}, x W_K^{(h)}, x W_V^{(h)}).$$
#
# minglm computes the three projections of every head with **one** matrix, `query_key_value` (3C × C, the
# official name), and splits its output into heads with a reshape and a permute, no copies:

# %%
show_source(SelfAttention.qkv)

# %% [markdown]
# The shapes, on a layer of width C = 32 with 4 heads, and the same output computed one head at a time:

# %%
config = GLMConfig(vocab_size=20, n_layer=1, n_head=4, d_model=32, max_len=16)
attention = SelfAttention(config, rng)
B, T, C = 2, 7, config.d_model
h = Tensor(rng.standard_normal((B * T, C)).astype(np.float32))  # activations as (N, C), N = B·T
sep = np.array([4, 7])
with no_grad():
    q, k, v = attention.qkv(h, B, T)
    print("h", h.shape, "-> q, k, v", q.shape, "= (B, nh, T, hs)")
    y = attention(h, B, T, sep)
    heads = [F.scaled_dot_product_attention(q[:, i:i + 1], k[:, i:i + 1], v[:, i:i + 1], sep=sep, impl="plain")
             for i in range(config.n_head)]  # each (B, 1, T, hs)
    joined = np.concatenate([hh.numpy() for hh in heads], axis=1).transpose(0, 2, 1, 3).reshape(B * T, C)
    by_head = attention.dense(Tensor(joined))  # the output projection W_O mixes the heads
print("max |one call − head by head| =", float(np.abs(y.numpy() - by_head.numpy()).max()))

# %% [markdown]
# ## 4. LayerNorm
#
# Each token's vector is normalised on its own: subtract its mean over the C channels, divide by its standard
# deviation, then scale and shift with learned $w$ and $b$ (lesson 1 derived its backward):
#
# $$\mathrm{LN}(x) = \frac{x - \mu}{\sqrt{\sigma^2 + \varepsilon}} \odot w + b,$$
#
# with $\mu$ and $\sigma^2$ taken over the last axis.

# %%
x = Tensor(rng.standard_normal((3, C)) * 5.0 + 2.0)
y = F.layer_norm(x, Tensor(np.ones(C)), Tensor(np.zeros(C)))
print("before: row means", np.round(x.numpy().mean(1), 2), "stds", np.round(x.numpy().std(1), 2))
print("after:  row means", np.round(y.numpy().mean(1), 6), "stds", np.round(y.numpy().std(1), 4))

# %% [markdown]
# ## 5. The MLP and the tanh GeLU
#
# After attention has moved information between tokens, a two-layer MLP transforms each token on its own:
# $C \to 4C \to C$ with a GeLU between. GeLU is $x\,\Phi(x)$ ($\Phi$ the normal CDF); GPT-2, the official GLM and
# minglm use its tanh approximation:
#
# $$\mathrm{GeLU}(x) \approx \tfrac12 x \left(1 + \tanh\!\left(\sqrt{2/\pi}\,(x + 0.044715\,x^3)\right)\right).$$

# %%
show_source(F.gelu_tanh_into)  # the one place the formula is written, in place to save memory
xs = np.linspace(-4, 4, 401)
tanh_gelu = F.gelu(Tensor(xs)).numpy()
erf_gelu = 0.5 * xs * (1 + np.array([math.erf(t / math.sqrt(2)) for t in xs]))
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.2))
ax1.plot(xs, np.maximum(xs, 0), ":", label="ReLU")
ax1.plot(xs, tanh_gelu, label="GeLU (tanh form)")
ax1.set_title("GeLU: smooth, and slightly negative below 0")
ax1.legend(fontsize=8)
ax2.plot(xs, tanh_gelu - erf_gelu)
ax2.set_title("tanh form − exact GeLU")
plt.show()
print(f"largest difference from the exact GeLU: {np.abs(tanh_gelu - erf_gelu).max():.1e}")

# %% [markdown]
# ## 6. The block: pre-LN with residuals
#
# A GLM layer adds what attention and the MLP compute **to** its input instead of replacing it (a *residual*
# connection), and normalises only the copy it hands to each sub-layer (*pre-LN*):
#
# $$x \leftarrow x + \mathrm{Attn}(\mathrm{LN}_1(x)), \qquad x \leftarrow x + \mathrm{MLP}(\mathrm{LN}_2(x)).$$
#
# The sum keeps a straight path from the loss back to every layer's input, so the gradient of a deep stack does
# not have to pass through every sub-layer on its way down. Here are those two lines in `Block.forward` (the first
# branch is GLM-130B's DeepNorm, lesson 12):

# %%
show_source(Block.forward)

block = Block(config, rng)
x = Tensor(rng.standard_normal((B * T, C)).astype(np.float32))
with no_grad():
    by_hand = x + block.attention(block.input_layernorm(x), B, T, sep)
    by_hand = by_hand + block.mlp(block.post_attention_layernorm(by_hand))
    print("max |Block(x) − the two lines| =", float(np.abs(block(x, B, T, sep).numpy() - by_hand.numpy()).max()))

# %% [markdown]
# Because nothing normalises the sum itself, the **residual stream** grows as the layers add to it; that is why the
# model ends with one more LayerNorm (`final_layernorm`) before the output head. At initialisation the weights are
# small (standard deviation 0.02) and each layer adds almost nothing, so the stream of an untrained model stays
# flat. Training makes the weights much larger (the course's trained model goes from about 1 to about 50 in two
# layers); with every weight matrix of an untrained 8-layer model made 10 times larger, the growth shows:

# %%
def stream_norms(weight_scale, layers=8):
    """Mean ‖x‖ of a token after the embeddings and after each block, for weight matrices × weight_scale."""
    deep = GLM(GLMConfig(vocab_size=20, n_layer=layers, n_head=4, d_model=32, max_len=16), np.random.default_rng(1))
    for _, p in deep.named_parameters():
        if p.data.ndim == 2:  # the matrices and tables, not the biases and LayerNorm gains
            p.data *= np.float32(weight_scale)
    tokens = np.random.default_rng(2).integers(8, 20, size=(B, T))
    pos, block_pos = np.tile(np.arange(T), (B, 1)), np.zeros((B, T), dtype=np.int64)
    norms = []
    with no_grad():
        x = deep.embed(tokens, pos, block_pos)  # (N, C)
        norms.append(float(np.linalg.norm(x.numpy(), axis=1).mean()))
        for layer in deep.layers:
            x = layer(x, B, T, sep)
            norms.append(float(np.linalg.norm(x.numpy(), axis=1).mean()))
    return norms


fig, ax = plt.subplots(figsize=(6, 3))
for scale in (1, 10):
    ax.plot(stream_norms(scale), "o-", label=f"weights × {scale}" + (" (as initialised)" if scale == 1 else ""))
ax.set_xlabel("layers applied (0 = the embeddings)")
ax.set_ylabel("mean ‖x‖ of a token")
ax.set_title("The pre-LN residual stream grows as each layer adds to it")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## Summary
#
# - Attention is $\mathrm{softmax}(QK^\top/\sqrt d + M)V$: scores, a mask of $-\infty$, a row softmax, a weighted
#   mean of values. Dividing by $\sqrt d$ keeps the scores at unit scale, so the softmax does not saturate.
# - Every mask in the course comes from `glm_mask`: `sep = 0` causal, `sep = T` bidirectional, GLM in between;
#   padding sits in the causal part and is never seen.
# - Multi-head attention is one QKV matrix, viewed as $n_h$ heads of size $C/n_h$, joined and mixed by $W_O$.
# - A block is pre-LN: $x + \mathrm{Attn}(\mathrm{LN}(x))$, then $x + \mathrm{MLP}(\mathrm{LN}(x))$, with a
#   $4C$ tanh-GeLU MLP; the residual stream grows, and the final LayerNorm tames it before the output head.
#
# ## Exercises
#
# **1.** Write masked attention for (B, H, T, D) arrays and a (T, T) boolean `visible` mask. Use $-\infty$ before
# the softmax. (The checker also tries masking *after* the softmax, which leaves rows that do not sum to 1.)

# %%
def attention(q, k, v, visible):
    # your code here: return the (B, H, T, D) output
    return None


exercises.check_attention(attention)

# %% [markdown]
# **2.** Write the tanh GeLU for an array `x`.

# %%
def gelu(x):
    # your code here
    return None


exercises.check_gelu(gelu)

# %% [markdown]
# **3.** (Think.) The original transformer was *post*-LN: $x \leftarrow \mathrm{LN}(x + \mathrm{Attn}(x))$. What
# does that put on the path from the loss to the first layer that pre-LN does not, and why do post-LN models need
# a learning-rate warmup (lesson 6) to train at all?
