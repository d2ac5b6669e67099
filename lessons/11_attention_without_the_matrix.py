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
# # Lesson 11 — Attention without the T×T matrix: the online softmax, tiles, and the fused kernel
#
# Plain attention builds every score `s_ij = q_i · k_j / √D`, turns each row into probabilities, and multiplies
# them by the values. Training keeps those probabilities for the backward: a (T, T) matrix per head and sample.
# That is what limits the sequence length on a CPU and what a GPU kernel must avoid.
#
# minglm's fused kernel (`minglm/kernels/flash_attn.cu`, run through CuPy) and its NumPy twin
# (`minglm/kernels/twin.py`, the CPU path for long sequences) compute exactly the same output **one tile of keys
# at a time**, never holding more than a tile of scores:
#
# 1. the **online softmax** keeps three running numbers per query row, so the softmax never needs the whole row;
# 2. GLM's mask comes from `sep` alone, so whole tiles that no query may see are **skipped**;
# 3. the **backward recomputes** the probabilities tile by tile from one saved number per row.
#
# The twin is plain NumPy, so every step can be printed and checked here; the last section puts the CUDA source
# beside it.
#
# **Learning goals.** Run the online softmax by hand, tell which tiles GLM's mask lets a kernel skip, explain how
# the backward gets by with one saved number per row, and read the CUDA kernel's inner loop. Lesson 4's attention
# formula is the starting point; lesson 13 runs the kernel itself on a GPU.

# %%
# %matplotlib inline
import importlib.util
import sys
import textwrap
import tracemalloc
from pathlib import Path

if importlib.util.find_spec("minglm") is None:  # opened from lessons/ without `pip install -e .`
    sys.path.insert(0, str(Path.cwd().parent))

import matplotlib.pyplot as plt
import numpy as np

import viz
from minglm import exercises
from minglm.kernels import reference_attention, twin

rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. What the plain path holds
#
# Forward and backward through plain attention keep the probabilities `P` (B, H, T, T). In float32 with a batch
# of 8 and 8 heads, one layer needs:

# %%
for T in (256, 1024, 2048, 4096, 8192):
    print(f"T = {T:>5}: {8 * 8 * T * T * 4 / 2**20:>9,.0f} MiB of probabilities per layer")

# %% [markdown]
# Measure it (tracemalloc sees every NumPy buffer) on a small batch, for the dense reference
# (`minglm.kernels.reference_attention`) and for the twin, forward and backward each:

# %%
def peak_mib(fn, *args):
    tracemalloc.start()
    try:
        fn(*args)
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def plain(q, k, v, do, sep):
    o, lse, backward = reference_attention(q, k, v, sep)
    return backward(do)


def tiled(q, k, v, do, sep):
    o, lse = twin.flash_attention_forward(q, k, v, sep)
    return twin.flash_attention_backward(q, k, v, o, lse, do, sep)


lengths, plain_mib, twin_mib = [128, 256, 512, 1024], [], []
for T in lengths:
    args = [rng.standard_normal((1, 2, T, 32), dtype=np.float32) for _ in range(4)] + [np.array([T // 2])]
    plain_mib.append(peak_mib(plain, *args))
    twin_mib.append(peak_mib(tiled, *args))

fig, ax = plt.subplots(figsize=(6, 3.2))
ax.plot(lengths, plain_mib, "o-", label="plain (dense mask and probabilities)")
ax.plot(lengths, twin_mib, "s-", label="twin (tiles of 256 × 256)")
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.set_xlabel("sequence length T")
ax.set_ylabel("peak MiB (B 1, H 2, D 32)")
ax.set_title("Memory of one attention forward + backward")
ax.legend(fontsize=8)
plt.show()
print("plain grows by", round(plain_mib[-1] / plain_mib[-2], 1), "x per doubling of T; the twin by",
      round(twin_mib[-1] / twin_mib[-2], 1), "x")

# %% [markdown]
# The plain path grows like T² (4× per doubling); the twin like T (its inputs and outputs, plus fixed-size tiles).
#
# ## 2. The softmax, one tile at a time
#
# Take one query row: scores `s_1 … s_n` and values `v_1 … v_n`. Attention is
# `o = Σ_j exp(s_j) v_j / Σ_j exp(s_j)`. Walk the keys in tiles and keep, after the keys seen so far,
#
# - `m`, the largest score seen (so every `exp` below is at most 1 and nothing overflows),
# - `l = Σ exp(s_j − m)`, the denominator measured from `m`,
# - `acc = Σ exp(s_j − m) v_j`, the numerator measured from `m`.
#
# A new tile may raise the max to `m'`. The old sums were measured from `m`, so multiply them by
# `alpha = exp(m − m') ≤ 1` to move them to `m'`, then add the tile's own terms. At the end `o = acc / l`. Here is
# that recurrence on one row of 12 scores in tiles of 4, the third tile holding the largest score:

# %%
s = np.array([0.5, -1.0, 2.0, 0.1, 1.5, 0.3, -0.2, 1.0, 4.0, 0.0, 3.5, -2.0])
v = rng.standard_normal((12, 3))
m, l, acc = -np.inf, 0.0, np.zeros(3)
history = []
for j0 in range(0, 12, 4):
    tile = s[j0:j0 + 4]
    m_new = max(m, tile.max())
    alpha = np.exp(m - m_new)
    p = np.exp(tile - m_new)
    l = alpha * l + p.sum()
    acc = alpha * acc + p @ v[j0:j0 + 4]
    m = m_new
    history.append((m, l))
    print(f"keys {j0:>2}..{j0 + 3:>2}: max {m:4.1f}   alpha {alpha:.4f}   l {l:8.4f}")

softmax = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
print("online o      :", np.round(acc / l, 6))
print("softmax(s) @ v:", np.round(softmax @ v, 6))
print("same:", np.allclose(acc / l, softmax @ v, rtol=0, atol=1e-12))

# %% [markdown]
# When the third tile brings the score 4.0, `alpha` shrinks the first two tiles' contributions, because they are
# now measured from a higher max. Nothing else about the earlier tiles was kept, and nothing else was needed.
#
# The twin does this for a whole (query tile × key tile) block at once: `m`, `l` and `acc` are arrays over the
# tile's rows, and the block's scores come from one batched `np.matmul`. It also saves `lse = m + log l` per row,
# the log of the softmax denominator, which is all the backward needs (section 5).

# %% [markdown]
# ## 3. Tiles the GLM mask lets us skip
#
# GLM's mask needs only `sep`: key j is visible to query i when `j < sep` (Part A) or `j ≤ i` (causal). So the
# kernel knows, before computing anything, that a tile whose keys all lie at or past `sep` and after every one of
# its queries is invisible: it skips it. A tile where every query sees every key needs no mask at all. Orange tiles
# are the only ones where the mask is applied inside:

# %% tags=["thumbnail"]
fig = viz.plot_tile_map(512, [0, 200, 512], block_q=64, block_k=64)
fig

# %%
for sep in (0, 128, 256, 384, 512):
    print(f"sep = {sep:>3}: the kernel computes {100 * viz.computed_share(512, sep, 64, 64):5.1f} % of the scores")

# %% [markdown]
# `sep = 0` is a causal language model (GPT): a little over half the tiles. `sep = T` is BERT-style full attention:
# everything. A GLM sample lies in between.
#
# ## 4. The twin against the plain path
#
# Same inputs, float64, random `sep` per sample, a length that is not a multiple of the tile: the twin's output,
# log-sum-exp and all three gradients match the dense reference to rounding.

# %%
B, H, T, D = 3, 2, 300, 16
q, k, v, do = (rng.standard_normal((B, H, T, D)) for _ in range(4))
sep = np.array([0, 123, 300])

o_ref, lse_ref, backward = reference_attention(q, k, v, sep)
grads_ref = backward(do)
o, lse = twin.flash_attention_forward(q, k, v, sep, block_q=64, block_k=64)
grads = twin.flash_attention_backward(q, k, v, o, lse, do, sep, block_q=64, block_k=64)

for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), (o, lse, *grads), (o_ref, lse_ref, *grads_ref)):
    print(f"{name:>3}: max |twin - plain| = {np.abs(a - b).max():.1e}")

# %% [markdown]
# ## 5. The backward recomputes instead of storing
#
# The backward needs `P` again. Rather than keeping it, the twin rebuilds each tile from the saved `lse`:
# `P_ij = exp(s_ij − lse_i)` is already normalised. The softmax backward also needs, per row,
# `Σ_j P_ij dP_ij` with `dP = dO Vᵀ`. That sum equals `dO_i · o_i` (because `o_i = Σ_j P_ij v_j`), so it comes from
# the saved output with no T × T matrix at all. Both facts, checked on the small example above:

# %%
scores = np.einsum("bhid,bhjd->bhij", q, k) / np.sqrt(D)
visible = (np.arange(T)[None, None, None, :] < sep[:, None, None, None]) | np.tri(T, dtype=bool)[None, None]
scores = np.where(visible, scores, -np.inf)
P_plain = np.exp(scores - scores.max(-1, keepdims=True))
P_plain /= P_plain.sum(-1, keepdims=True)
P_from_lse = np.exp(scores - lse[..., None])
print("P from lse:   max diff", f"{np.abs(P_from_lse - P_plain).max():.1e}")

dP = np.einsum("bhid,bhjd->bhij", do, v)
print("Σ P·dP = dO·o: max diff", f"{np.abs((P_plain * dP).sum(-1) - (do * o).sum(-1)).max():.1e}")

# %% [markdown]
# So the twin's backward loops over key tiles, recomputes each tile's `P` with one matmul and one `exp`, and adds
# that tile's share to `dq`, `dk` and `dv`. It does the forward's score work twice, and in exchange stores one
# number per row instead of T.
#
# ## 6. The same loop in CUDA
#
# On a GPU the kernel runs one thread block per (query tile, head, sample). Each warp of 32 threads owns some
# query rows, each lane one key of the tile, and the running `m`, `l` and `acc` live in registers. This is the inner
# step of `glm_attn_fwd`, the recurrence of section 2 line for line (`warp_max` and `warp_sum` reduce over the 32
# keys of the tile):

# %%
source = Path(twin.__file__).with_name("flash_attn.cu").read_text(encoding="utf-8").splitlines()
start = next(i for i, line in enumerate(source) if "const float m_new = fmaxf" in line)
stop = next(i for i in range(start, len(source)) if "acc[n][u] = alpha * acc[n][u] + pv;" in source[i])
print(textwrap.dedent("\n".join(line for line in source[start:stop + 1] if "#pragma" not in line)))

# %% [markdown]
# A CPU cannot run CUDA, but it can check the CUDA *source*: `python -m minglm.kernels.nvrtc_check` compiles it with
# NVRTC (the compiler CuPy uses) for T4, A100 and H100 in CI, and `minglm.kernels.emulate` builds the unchanged `.cu`
# file with g++ and runs its threads as fibers. When g++ is here, compare the emulated CUDA kernel with the twin:

# %%
from minglm.kernels import emulate  # noqa: E402 - only this cell needs it

qs, ks, vs = (rng.standard_normal((1, 2, 40, 32)).astype(np.float32) for _ in range(3))
if emulate.compiler() is None:
    print("g++ (C++20) is not installed here: skipping the emulated kernel")
else:
    o_cuda, lse_cuda = emulate.forward(qs, ks, vs, np.array([13]))
    o_twin, lse_twin = twin.flash_attention_forward(qs, ks, vs, np.array([13]))
    print(f"emulated CUDA kernel vs twin: max |o diff| = {np.abs(o_cuda - o_twin).max():.1e} (float32)")

# %% [markdown]
# ## Summary
#
# - Plain attention stores B·H·T² probabilities; the tiled kernel and its twin store O(T) and give the same output.
# - The online softmax keeps a running max `m`, denominator `l` and numerator `acc` per row; a new tile rescales
#   the old sums by `exp(m − m')`, so the keys never need to be seen all at once.
# - GLM's mask follows from `sep`, so tiles no query may see are skipped without looking at their scores.
# - The backward rebuilds each tile of `P` from the saved log-sum-exp and gets the softmax row sums from `dO · o`.
# - The CUDA kernel runs the same recurrence with a warp per row and a lane per key; CI compiles it with NVRTC and
#   runs it in an emulator, and `python -m minglm bench attention` times the twin against PyTorch.
#
# ## Exercises
#
# **1.** Write the online-softmax step for a block of rows: given the state `m` (n,), `l` (n,), `acc` (n, D)
# before a tile, the tile's scores `s` (n, k) (`-inf` where masked) and values `v` (k, D), return the state after
# it. The checker feeds four tiles and compares the state after each with the direct computation.

# %%
def online_softmax_step(m, l, acc, s, v):
    # your code here: return m_new, l_new, acc_new
    return None


exercises.check_online_softmax_step(online_softmax_step)

# %% [markdown]
# **2.** In section 3, tiles of 256 × 256 skip less than tiles of 64 × 64. Compute `viz.computed_share` for
# T = 2048 and sep = 700 with both sizes. Why does the twin still use 256 × 256 on a CPU, and why does the kernel
# use 64-row tiles on a GPU?
#
# **3.** (Think.) Every row starts with `m = -inf`, and the first tile gives `alpha = exp(-inf - m') = 0`. Where
# would the twin's recurrence produce NaN if a row saw no key in its first tile? How does the kernel's `m_ref`
# line avoid it, and why does every row of a GLM mask see key 0?
