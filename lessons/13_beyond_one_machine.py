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
# # Lesson 13 — Beyond one machine: a GPU, many GPUs, and handing the model to SAT
#
# Everything so far ran on a laptop CPU. GLM itself was trained on hundreds of GPUs with the official code and
# SwissArmyTransformer (SAT) on DeepSpeed. This lesson takes the three steps from here to there:
#
# 1. **one GPU**: the same minglm code on CuPy, through the one backend seam `minglm/backend.py`;
# 2. **many GPUs**: the two ways a step is split across devices, data parallel and tensor (model) parallel,
#    each checked on the CPU with the model's own weights;
# 3. **export**: a minglm model's weights under SAT's names, read back and checked, ready for SAT's training loop.
#
# **Learning goals.** Move a model to a GPU and know what runs there, explain what an all-reduce adds up in data
# and in tensor parallelism, and export a model so that another library can continue with it.

# %%
# %matplotlib inline
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

if importlib.util.find_spec("minglm") is None:  # opened from lessons/ without `pip install -e .`
    sys.path.insert(0, str(Path.cwd().parent))

import matplotlib.pyplot as plt
import numpy as np
from course_models import course_model

import minglm.functional as F
from minglm import backend, interop, no_grad
from minglm.data import BlockLoader, collate, encode_corpus, load_corpus
from minglm.model import GLM, GLMConfig, glm_loss
from minglm.tensor import Tensor

rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. One GPU: CuPy behind the same code
#
# Every array operation in minglm goes through an `xp` module that `minglm/backend.py` chooses: NumPy on the CPU,
# CuPy (NumPy's API on CUDA) on a GPU. Nothing else imports CuPy, so the model, the optimizer and the training loop
# are the same code on both. `model.to("gpu")` moves the weights; batches follow the weights. On a GPU the attention
# runs the fused CUDA kernel of lesson 11 (`minglm/kernels/flash_attn.cu`).

# %%
GPU = backend.gpu_available()
if GPU:
    cp = backend.cupy_module()
    props = cp.cuda.runtime.getDeviceProperties(0)
    print("GPU:", props["name"].decode(), f"({props['totalGlobalMem'] / 2**30:.0f} GiB); CuPy", cp.__version__)
else:
    print("No GPU here: CuPy is not installed or sees no CUDA device, so this lesson runs its GPU cells on the CPU "
          "and says so. On a machine with an NVIDIA driver: pip install -r requirements-gpu.txt")

# %% [markdown]
# The same forward and backward on each device that is here, on a model the size of the `small` preset's layers:

# %%
config = GLMConfig(vocab_size=96, n_layer=4, n_head=8, d_model=256, max_len=260)
B, T = 4, 256
tokens = rng.integers(8, 96, size=(B, T))
pos, block = np.tile(np.arange(T), (B, 1)), np.zeros((B, T), dtype=np.int64)
sep = np.full(B, T // 2)


def time_step(device):
    model = GLM(config, np.random.default_rng(0))
    if device == "gpu":
        model.to("gpu")
    xp = backend.device_xp(device)
    args = [xp.asarray(a) for a in (tokens, pos, block, sep)]
    for _ in range(2 if device == "gpu" else 0):  # the first calls compile the GPU's kernels
        logits = model(*args)
        logits.sum().backward()
    if device == "gpu":
        cp.cuda.Device().synchronize()
    start = time.perf_counter()
    logits = model(*args)
    (logits * logits).mean().backward()
    if device == "gpu":
        cp.cuda.Device().synchronize()
    return time.perf_counter() - start, backend.to_numpy(logits.data)


timings = {"cpu": time_step("cpu")}
if GPU:
    timings["gpu"] = time_step("gpu")
for device, (seconds, _) in timings.items():
    print(f"{device}: one forward + backward of {B} × {T} tokens in {1000 * seconds:.0f} ms")
if GPU:
    diff = np.abs(timings["gpu"][1] - timings["cpu"][1]).max()
    print(f"largest difference of the logits, GPU against CPU: {diff:.1e} (float32, other summation orders)")

# %% [markdown]
# ## 2. Many GPUs, way one: data parallel
#
# Each of $W$ workers holds a full copy of the model and takes its own share of the batch. After the backward the
# workers **all-reduce** their gradients (add them up across devices), so every copy takes the same step. GLM's loss
# is a mean over the Part-B targets of the whole batch, so each worker's gradient is weighted by its share of the
# targets:
#
# $$\nabla L = \sum_{w} \frac{n_w}{\sum_v n_v}\, \nabla L_w, \qquad n_w = \text{targets on worker } w.$$
#
# Two "workers" on one CPU, with a real batch of lesson 5's data:

# %%
corpus = load_corpus("shakespeare")
from minglm.tokenizer import CharTokenizer  # noqa: E402 - the data of this section only

tok = CharTokenizer.from_texts(corpus.docs)
loader = BlockLoader(encode_corpus(corpus, tok)[0][:2], tok, 64, 8, objective="glm-base", mask_ratio=0.5)
batch = loader.next_batch(rng)
small = GLM(GLMConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, d_model=64, max_len=80),
            np.random.default_rng(0))


def gradients(b):
    small.zero_grad()
    glm_loss(small, b).backward()
    return {n: p.grad.copy() for n, p in small.named_parameters()}, float(b.loss_mask.sum())


whole, _ = gradients(batch)
halves = [collate([batch.row(i) for i in rows]) for rows in (range(0, 4), range(4, 8))]  # one per worker
(g0, n0), (g1, n1) = gradients(halves[0]), gradients(halves[1])
reduced = {n: (n0 * g0[n] + n1 * g1[n]) / (n0 + n1) for n in whole}  # the all-reduce
print(f"targets on the workers: {n0:.0f} and {n1:.0f}")
print("largest difference, all-reduced against the whole batch:",
      f"{max(float(np.abs(reduced[n] - whole[n]).max()) for n in whole):.1e}")

# %% [markdown]
# (Each half is padded to its own longest row; padding carries no loss, so it changes nothing.) Data parallelism
# needs the whole model on every device. When the model does not fit, it is split instead.
#
# ## 3. Many GPUs, way two: tensor parallel
#
# The official GLM (its `mpu/` package, after Megatron-LM) splits every layer across devices. Attention splits by
# **heads**: device $w$ holds the QKV rows of its heads and the matching *columns* of the output projection, computes
# its heads' attention alone, and multiplies by its slice of $W_O$. The layer's output is the **sum** of the devices'
# partial outputs: one all-reduce per sub-layer. With the model's own weights, two "devices":

# %%
attention = small.layers[0].attention
C, nh = small.config.d_model, small.config.n_head
hs, half = C // nh, nh // 2
x = Tensor(rng.standard_normal((1 * 10, C)).astype(np.float32))
W, bias = attention.query_key_value.weight.numpy(), attention.query_key_value.bias.numpy()  # (3C, C), (3C,)
Wo = attention.dense.weight.numpy()  # (C, C)

partial = []
for device in range(2):
    heads = range(device * half, (device + 1) * half)
    cols = np.concatenate([np.arange(h * hs, (h + 1) * hs) for h in heads])  # this device's channels
    rows = np.concatenate([part * C + cols for part in range(3)])  # its q, k and v rows of the fused matrix
    qkv = x.numpy() @ W[rows].T + bias[rows]  # (N, 3·C/2): only this device's heads
    q, k, v = (qkv[:, i * len(cols):(i + 1) * len(cols)].reshape(1, 10, half, hs).transpose(0, 2, 1, 3)
               for i in range(3))
    y = F.scaled_dot_product_attention(Tensor(q), Tensor(k), Tensor(v), sep=np.array([6]), impl="plain").numpy()
    partial.append(y.transpose(0, 2, 1, 3).reshape(10, len(cols)) @ Wo[:, cols].T)  # (N, C), a partial sum
with no_grad():
    full = attention(x, 1, 10, np.array([6])).numpy()
print("largest difference, sum of the two devices against the whole layer:",
      f"{np.abs(partial[0] + partial[1] + attention.dense.bias.numpy() - full).max():.1e}")

# %% [markdown]
# The MLP splits the same way: the first matrix by columns (each device computes a slice of the $4C$ hidden units,
# GeLU needs no communication), the second by rows, and one all-reduce adds the partial outputs. DeepSpeed adds
# ZeRO on top of data parallelism: it shards AdamW's moments, the gradients and even the weights across the workers,
# so each holds a fraction of the training state.
#
# ## 4. Handing the model to SAT
#
# minglm's weights have the same shapes as the official GLM's and SAT's; only the names differ
# (`minglm/interop.py`, `docs/parity.md` §3). `interop.save(model, path, "sat")` writes them under SAT's names, and
# `interop.sat_args` says which SAT model reads them back with which sizes. Here the course model goes out and comes
# back (SAT holds two kinds of GLM: GLM-1, and GLM-130B's RoPE + DeepNorm; another mix of lesson 12's switches is
# refused with the reason, and then this cell exports the small GLM-1 of section 2 instead):

# %%
model, mtok, source = course_model()
try:
    interop.sat_model(model.config)
except ValueError as e:
    print(e)
    model, mtok = small, tok
with tempfile.TemporaryDirectory() as folder:
    path = interop.save(model, Path(folder) / "glm_sat.npz", layout="sat")
    state = interop.load_npz(path)
    print(f"wrote {path.name}: {len(state)} tensors, {path.stat().st_size / 2**20:.1f} MiB")
    for name in list(state)[:4]:
        print(f"  {name:<62} {state[name].shape}")
    print("to read it back:", interop.sat_args(model.config))
    again = GLM(model.config, np.random.default_rng(1))
    interop.load(again, path)  # the names are detected (SAT here) and mapped back

ids = np.array([mtok.encode("To be, or not to be")])
n = ids.shape[1]
with no_grad():
    a = model(ids, np.arange(n)[None], np.zeros((1, n), dtype=np.int64), [n]).numpy()
    b = again(ids, np.arange(n)[None], np.zeros((1, n), dtype=np.int64), [n]).numpy()
print("largest difference of the logits after the round trip:", float(np.abs(a - b).max()))

# %% [markdown]
# In SAT the file loads into `GLMModel` (or `GLM130B` for a model with lesson 12's switches) with `strict=True`, and
# `tests/test_interop.py` checks the logits match SAT's own to about 1e-7 (`docs/parity.md`). From there SAT's
# training loop runs on DeepSpeed: data and tensor parallelism as above, mixed precision and ZeRO, on as many GPUs as
# you have. minglm stops at the export; the shapes, the names and the logits are what make the hand-over exact.
#
# A picture of what each scheme communicates per step, for lesson 5's tiny model (in floats):

# %% tags=["thumbnail"]
P = small.num_parameters()
N_tok = int(batch.lengths.sum())
schemes = {"data parallel\n(gradients, once a step)": P,
           "tensor parallel\n(activations, 2 per layer, fwd+bwd)": 2 * 2 * small.config.n_layer * N_tok * C}
fig, ax = plt.subplots(figsize=(7, 2.6))
ax.barh(list(schemes), list(schemes.values()), color=["#0072B2", "#E69F00"])
for y, v in enumerate(schemes.values()):
    ax.text(v, y, f" {v:,}", va="center", fontsize=8)
ax.set_xlabel("numbers all-reduced per step")
ax.set_title(f"What crosses the wire: {P:,} parameters, {N_tok:,} tokens a step")
plt.show()

# %% [markdown]
# Data parallelism sends the gradient once a step (its size is the model's); tensor parallelism sends activations
# twice per layer and direction (their size is the batch's), so it wants the fast links inside one machine.
#
# ## Summary
#
# - One backend seam: the same minglm code runs on NumPy or CuPy, and on a GPU the attention is the fused kernel.
# - Data parallel: full copies, a share of the batch each, gradients all-reduced (weighted by targets for GLM's loss).
# - Tensor parallel: layers split by heads (attention) and hidden units (MLP), partial outputs all-reduced.
# - `interop.save(..., layout="sat")` writes the weights under SAT's names; read back, the logits are identical.
#
# ## Exercises
#
# **1.** (Think.) In the data-parallel cell, what goes wrong if each worker averages its loss over its own targets
# and the all-reduce then takes the plain mean of the two gradients? When is that harmless?
#
# **2.** (Think.) Tensor parallelism splits the attention by heads. Why is a split by heads free of communication
# *inside* the attention, and what would have to be communicated if the split were by sequence positions instead?
