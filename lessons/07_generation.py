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
# # Lesson 7 — Filling blanks: generation step by step
#
# A trained GLM fills a blank the way it was trained to: the text with its blanks is Part A, and each fill is a
# Part-B span written one token at a time. `minglm/generate.py` does it in four moves, after the official
# `generate_samples.py` (`docs/decoding.md` in the repository):
#
# 1. the **context** is `[CLS] text <eos>`, with `[MASK]` where a blank is;
# 2. the context is **encoded once** with `sep = len(context)`: every context token sees every other, and the
#    keys and values of every layer go into a cache;
# 3. each blank, left to right, is written from `<sop>`: feed one token at (position = the blank's index,
#    block id = 1, 2, 3, ...), read the next-token distribution, choose, repeat until `<eop>` (or `<eos>`);
# 4. the cache keeps growing, so a later blank sees the fills of the earlier ones, as antecedent spans did in
#    Part B during training.
#
# This lesson runs those moves on a model trained on Shakespeare and prints what happens at every step.
#
# **Learning goals.** Read a decoding trace (the token fed, its two positions, the choice), explain why the cache
# changes the cost and not the answer, and control the choice with temperature and top-k.

# %%
# %matplotlib inline
import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("minglm") is None:  # opened from lessons/ without `pip install -e .`
    sys.path.insert(0, str(Path.cwd().parent))

import matplotlib.pyplot as plt
import numpy as np
from course_models import course_model
from IPython.display import display

import viz
from minglm import exercises, generate
from minglm.data import Sample
from minglm.generate import Sampling, build_context, fill, format_steps, recompute_logits
from minglm.model import KVCache
from minglm.tensor import no_grad

try:  # sliders beside the static figures; headless (or without ipywidgets) the static figures say the same
    from ipywidgets import IntSlider, interact
except ImportError:
    interact = None

# %% [markdown]
# ## 1. A trained model
#
# Every lesson that needs a trained GLM takes it from `course_model()` (in `lessons/course_models.py`): the course
# model that ships with minglm when it is installed, otherwise a small model trained here once with
# `python -m minglm train` (in fast mode two layers for 300 steps, under a minute: enough to see the mechanics, not
# to write good English) and kept in `runs/`. To read your own run instead, write
# `model, tok = load_run("../runs/<name>")` (from `minglm.runs`).
#
# The course model has one layer and one switch that GLM does not: `hide_own_token=True`, so a Part-B token never
# attends to the Part-A token in its own slot (here the `[MASK]` it fills). That let it train with every word of a
# line a blank at once, Part A left whole (`docs/mask.md`, and the README's "What was tried", round 11). The
# decoding below is GLM's either way.

# %%
model, tok, source = course_model()
print("model:", source)
print(model.config)
print(f"{model.num_parameters():,} parameters, vocabulary {tok.vocab_size}")
if (Path(source) / "log.jsonl").is_file():  # the bundled model keeps its weights only, not its training log
    display(viz.plot_loss_curves(Path(source)))

# %% [markdown]
# ## 2. The context
#
# `build_context` frames the text and finds the blanks. Their indices in the context are what every fed token
# of that blank will use as its first position id. (The last token is `<eos>`, which shares id 0 with `[PAD]` and
# prints as `[PAD]`.)

# %%
text = "Now is the winter of our [MASK]"
context, blanks, appended = build_context(tok, text)
print(len(context), "context tokens; blank at index", blanks)
print(" ".join(f"{i}:{tok.decode([t])!r}" for i, t in enumerate(context.tolist())))

# %% [markdown]
# ## 3. Filling one blank, step by step
#
# We decode greedily (always the most likely token) so the result is reproducible. `fill` returns the text and a
# trace: at each step, the token fed, its two position ids, the token chosen and the five best candidates.

# %%
result = fill(model, tok, text, Sampling(greedy=True, max_new_tokens=24), n_top=5)
print(result.marked_text)
print("stopped because:", result.stop_reasons)
print()
print(format_steps(result, tok))

# %% [markdown]
# Read the `pos` and `block` columns: every step of this blank has position = the blank's index in the context,
# and the block id counts 1 (`<sop>`), 2, 3, ... exactly like the Part-B rows of a training sample. The token
# that ends the blank (`<eop>`) is chosen but never fed.
#
# The sequence the model has seen is therefore a training-style sample: Part A = the context, Part B = `<sop>` +
# the fill. The same pictures as in lesson 2 apply:

# %% tags=["thumbnail"]
n = result.context_len
seen = Sample(
    tokens=np.asarray(result.tokens), targets=np.asarray(result.tokens), loss_mask=np.zeros(len(result.tokens)),
    position_ids=np.asarray(result.position_ids), block_position_ids=np.asarray(result.block_position_ids), sep=n,
)
display(viz.plot_positions(seen, tokenizer=tok, show_targets=False, title="what the model saw while decoding"))

# %% [markdown]
# In Jupyter, the slider replays the decoding one step at a time: what the model has read after step k, and the
# five candidates it weighed (headless, the figure above shows the end).

# %%
def after_step(k):
    shown = n + k + 1  # the context, <sop> and the first k chosen tokens
    display(viz.plot_positions(seen, tokenizer=tok, show_targets=False, window=(0, shown),
                               title=f"after step {k}: fed {tok.decode([result.steps[k].token_in])!r}"))
    print("candidates:", ", ".join(f"{tok.decode([t])!r} {p:.2f}" for t, p in result.steps[k].top))


if interact is not None:
    _ = interact(after_step, k=IntSlider(value=0, min=0, max=len(result.steps) - 1, description="step"))

# %% [markdown]
# How sure was the model at each step? The probability of the token it chose, with the runner-up:

# %%
steps = result.steps
fig, ax = plt.subplots(figsize=(8, 2.8))
x = np.arange(len(steps))
ax.bar(x - 0.2, [s.top[0][1] for s in steps], width=0.4, label="chosen (top 1)", color="#0072B2")
ax.bar(x + 0.2, [s.top[1][1] for s in steps], width=0.4, label="runner-up", color="#E69F00")
ax.set_xticks(x, [f"{tok.decode([s.token_out])!r}\nb={s.block_id}" for s in steps], fontsize=7)
ax.set_ylim(0, 1)
ax.set_ylabel("probability")
ax.set_title("Greedy decoding of one blank: each step's choice")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## 4. The cache changes nothing but the cost
#
# Encoding the context once and feeding one token at a time (with the keys and values cached) must give the same
# predictions as running the whole sequence through the model from scratch. `recompute_logits` does the latter:
# one full forward over context + `<sop>` + fill, with `sep` = the context length. Its argmax at every fed
# position must be the token the decoder chose.

# %%
full = recompute_logits(model, result.tokens, result.position_ids, result.block_position_ids, sep=n)  # (T, V)
chosen_again = full[n:].argmax(axis=-1)
print("decoder chose :", [s.token_out for s in steps])
print("full forward  :", chosen_again.tolist())
print("same:", chosen_again.tolist() == [s.token_out for s in steps])

# %% [markdown]
# `fill` runs the model's own layers. Each layer in `minglm/model.py` has a `forward` (Tensors and the autograd
# graph, what training uses) and, right below it, an `infer`: the same arithmetic on plain arrays, with no graph.
# Decoding one token is a chain of tiny products whose time is mostly per-call overhead, so `infer` is about twice
# as fast; `fill(..., decoder="cached")` takes `forward` instead. Both fill the same `KVCache` and give the same
# logits, here for the whole context:

# %%
ctx_ids, ctx_pos = context[None], np.arange(len(context))[None]
ctx_block, ctx_sep = np.zeros_like(ctx_pos), [len(context)]
fast = model.infer(ctx_ids, ctx_pos, ctx_block, ctx_sep, cache=KVCache(model, 1, len(context)))  # (1, n, V) array
with no_grad():
    plain = model(ctx_ids, ctx_pos, ctx_block, ctx_sep).data  # (1, n, V)
print("largest difference between infer and forward:", float(np.abs(fast - plain).max()))

# %% [markdown]
# ## 5. Several blanks
#
# With two blanks, the second is filled after the first, and it sees the first blank's `<sop>` and fill through
# the cache. Watch the position column jump to the second blank's index and the block id restart at 1.

# %%
two = fill(model, tok, "To be, or not to be, [MASK] is the [MASK]", Sampling(greedy=True, max_new_tokens=16), n_top=3)
print(two.marked_text)
print(format_steps(two, tok))

# %% [markdown]
# ## 6. Choosing the next token: temperature and top-k
#
# Greedy decoding takes the most likely token every time. Sampling draws it from the distribution instead, after
# two changes that `Sampling` makes: the logits are divided by a **temperature** $\tau$ (below 1 sharpens the
# distribution, above 1 flattens it), and all but the **top-k** most likely tokens are cut:
#
# $$p_i = \frac{e^{z_i/\tau}}{\sum_{j \in K} e^{z_j/\tau}} \text{ for } i \in K, \quad p_i = 0 \text{ otherwise}$$
#
# where $K$ is the set of the $k$ largest logits.
#
# `generate.sampling_probs` computes exactly that. Here it is on the model's first step of the blank above:

# %%
first = recompute_logits(model, result.tokens[: n + 1], result.position_ids[: n + 1],
                         result.block_position_ids[: n + 1], sep=n)[n]  # the logits after <sop>
fig, axes = plt.subplots(1, 3, figsize=(11, 2.8), sharey=True)
best = np.argsort(-first)[:12]
for ax, (temperature, top_k) in zip(axes, ((1.0, 0), (0.5, 0), (1.0, 5))):
    p = generate.sampling_probs(first, Sampling(temperature=temperature, top_k=top_k))
    ax.bar(range(12), p[best], color="#0072B2")
    ax.set_xticks(range(12), [repr(tok.decode([t]))[1:-1] or "·" for t in best], fontsize=7)
    ax.set_title(f"temperature {temperature}, top-k {top_k or 'off'}", fontsize=9)
axes[0].set_ylabel("probability")
plt.show()

rng = np.random.default_rng(0)  # sampling draws from this generator: the same seed gives the same fills
for temperature in (0.5, 1.0):
    out = fill(model, tok, text, Sampling(temperature=temperature, top_k=10, max_new_tokens=24), rng=rng)
    print(f"temperature {temperature}: {out.fills[0]!r}")

# %% [markdown]
# A text without any blank gets `[gMASK]` appended and the model writes a continuation: that needs a model trained
# with GLM's multi-task objective, which is lesson 9.

# %% [markdown]
# ## Summary
#
# - Decoding uses the training layout: the context is Part A (`sep = len(context)`, full attention), each fill is
#   a Part-B span fed from `<sop>` at (the blank's position, block ids 1, 2, ...).
# - The context is encoded once and cached; each step costs one token's forward. A full recomputation gives the
#   same predictions.
# - Blanks are filled left to right, and a later blank sees the earlier fills.
# - The end token (`<eop>`, or `<eos>` after `[gMASK]`) is chosen but never fed.
# - Sampling divides the logits by a temperature and keeps the top-k before the softmax; a seeded generator makes
#   it reproducible.
#
# ## Exercises
#
# **1.** Write the position and block ids of everything the model reads while filling blanks at `mask_positions`
# (indices into a context of `context_len` tokens, ascending) with `fill_lengths` tokens each. The checker runs
# `minglm.generate.fill` with a scripted stand-in for the model and compares.

# %%
def decode_positions(context_len, mask_positions, fill_lengths):
    # your code here: return position_ids, block_position_ids for the context and every fed token
    return None


exercises.check_decode_positions(decode_positions)

# %% [markdown]
# **2.** Temperature and top-k: return the distribution `Sampling(temperature=..., top_k=...)` draws from, for a
# vector of logits (top_k = 0 keeps every token). The checker compares with `minglm.generate.sampling_probs`.

# %%
def sampling_probs(logits, temperature, top_k):
    # your code here: return the probabilities (same shape as logits)
    return None


exercises.check_sampling_probs(sampling_probs)

# %% [markdown]
# **3.** Fill the same blank with `Sampling(temperature=..., top_k=...)` and several seeds. When does greedy
# decoding get stuck repeating itself, and why does sampling help?
