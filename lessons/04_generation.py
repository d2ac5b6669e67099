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
# # Lesson 4 — Filling blanks: generation step by step
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

# %%
# %matplotlib inline
import importlib.util
import os
import sys
from pathlib import Path

if importlib.util.find_spec("minglm") is None:  # opened from lessons/ without `pip install -e .`
    sys.path.insert(0, str(Path.cwd().parent))

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import display

import viz
from minglm import exercises
from minglm.commands import train as train_command
from minglm.data import Sample
from minglm.generate import Sampling, build_context, fill, format_steps, recompute_logits
from minglm.model import KVCache
from minglm.runs import load_run
from minglm.tensor import no_grad

FAST = os.environ.get("MINGLM_FAST", "1") == "1"
RUNS = Path(os.environ.get("MINGLM_RUNS", "runs"))  # where run folders live (`python -m minglm train --out`)

# %% [markdown]
# ## 1. A trained model
#
# If you have run `python -m minglm train` (a few CPU minutes), set `RUN` to its folder, e.g.
# `RUN = Path("../runs/shakespeare-tiny-glm-base")`, and you will see much better fills. Otherwise this cell
# trains a model now with the same command (in fast mode a very small one, for well under a minute, which is
# enough to see the mechanics but not to write good English).

# %%
RUN = None  # or the Path of a run folder

if RUN is None:
    name = "lesson4-fast" if FAST else "lesson4-tiny"
    RUN = RUNS / name
    if not (RUN / "ckpt").is_dir():
        args = ["--out", str(RUNS), "--name", name, "--quiet", "--set", "fill_words=0", "--set", "fill_spans=0",
                "--set", "eval_batches=2"]
        if FAST:
            args += ["--steps", "300", "--set", "model.n_layer=2", "--set", "model.d_model=64",
                     "--set", "model.n_head=4", "--set", "seq_len=64", "--set", "lr=5e-3", "--set", "warmup=20"]
        assert train_command.main(args) == 0, "training failed"

model, tok = load_run(RUN)
print(model.config)
print(f"{model.num_parameters():,} parameters, vocabulary {tok.vocab_size}")
display(viz.plot_loss_curves(RUN))

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

# %%
n = result.context_len
seen = Sample(
    tokens=np.asarray(result.tokens), targets=np.asarray(result.tokens), loss_mask=np.zeros(len(result.tokens)),
    position_ids=np.asarray(result.position_ids), block_position_ids=np.asarray(result.block_position_ids), sep=n,
)
display(viz.plot_positions(seen, tokenizer=tok, show_targets=False, title="what the model saw while decoding"))

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
# ## 6. `[gMASK]`: generation after a prompt
#
# A text without a blank gets `[gMASK]` appended: the whole continuation is one span after a bidirectional
# prompt. The model above never saw `[gMASK]` in training (the default objective, `glm-base`, blanks spans with
# `[MASK]` only), and `python -m minglm fill` warns about that. A model that learned `[gMASK]` needs GLM's
# multi-task objective:
# `--objective glm-10b` mixes word spans with `[sMASK]` sentences and `[gMASK]` document endings. This cell trains
# one (in fast mode a small one for a few hundred steps, enough for the mechanics, not for good English), then
# samples with a temperature and top-k from our own seeded generator.

# %%
name = "lesson4-multitask-fast" if FAST else "lesson4-multitask"
MULTI = RUNS / name
if not (MULTI / "ckpt").is_dir():
    args = ["--out", str(RUNS), "--name", name, "--quiet", "--objective", "glm-10b", "--set", "fill_words=0",
            "--set", "fill_spans=0", "--set", "eval_batches=2", "--set", "plots=false"]
    if FAST:
        args += ["--steps", "300", "--set", "model.n_layer=2", "--set", "model.d_model=64",
                 "--set", "model.n_head=4", "--set", "seq_len=64", "--set", "lr=5e-3", "--set", "warmup=20"]
    assert train_command.main(args) == 0, "training failed"
multi, multi_tok = load_run(MULTI)

rng = np.random.default_rng(0)
for temperature in (0.5, 1.0):
    out = fill(multi, multi_tok, "ROMEO:\n", Sampling(temperature=temperature, top_k=10, max_new_tokens=40),
               rng=rng)
    print(f"temperature {temperature}: {out.fills[0]!r}  (stopped: {out.stop_reasons[0]})")

# %% [markdown]
# ## Summary
#
# - Decoding uses the training layout: the context is Part A (`sep = len(context)`, full attention), each fill is
#   a Part-B span fed from `<sop>` at (the blank's position, block ids 1, 2, ...).
# - The context is encoded once and cached; each step costs one token's forward. A full recomputation gives the
#   same predictions.
# - Blanks are filled left to right, and a later blank sees the earlier fills.
# - The end token (`<eop>`, or `<eos>` after `[gMASK]`) is chosen but never fed.
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
# **2.** Fill the same blank with `Sampling(temperature=..., top_k=...)` and several seeds. When does greedy
# decoding get stuck repeating itself, and why does sampling help?
#
# **3.** (Think.) Blanks are filled left to right at inference, but Part B was shuffled in training. Why is it
# fine to fill them in any order, and what would go wrong if training had always used text order?
