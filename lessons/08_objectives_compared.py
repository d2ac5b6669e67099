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
# # Lesson 8 — The objectives compared: BERT, GPT, prefix LM, T5 and GLM
#
# GLM's paper opens with three families of pretraining: **autoencoding** (BERT: fill masked tokens, reading both
# ways), **autoregressive** (GPT: predict the next token, reading left to right) and **encoder-decoder** (T5: an
# encoder reads the corrupted text, a decoder writes the spans), with the **prefix LM** (UniLM) between the first
# two. Each is good at something the others are not. GLM's claim is that blank infilling with Part A / Part B does
# all of their jobs in one model.
#
# In minglm every objective produces the same `Batch` (tokens, targets, loss mask, two position rows, `sep`), so the
# same model trains on any of them (`minglm/data/objectives.py`). This lesson puts them side by side: their masks,
# what each one predicts, and then a measured comparison on one budget.
#
# **Learning goals.** For each objective, say what the model sees, what it predicts and how many tokens carry a
# loss; and read a small comparison of infilling and language modelling for what it does and does not show.

# %%
# %matplotlib inline
import importlib.util
import os
import sys
import time
from pathlib import Path

if importlib.util.find_spec("minglm") is None:  # opened from lessons/ without `pip install -e .`
    sys.path.insert(0, str(Path.cwd().parent))

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import display

import viz
from minglm import exercises, no_grad
from minglm.config import TrainConfig
from minglm.data import BlockLoader, describe, encode_corpus, iter_eval_batches, load_corpus, make_objective
from minglm.fill_eval import build_blank_set, model_fills, score
from minglm.model import GLM, GLMConfig, glm_loss
from minglm.optim import AdamW, CosineSchedule
from minglm.tokenizer import CharTokenizer
from minglm.train import Trainer

FAST = os.environ.get("MINGLM_FAST", "1") == "1"
OBJECTIVES = ["bert", "gpt", "prefix", "t5", "glm-base"]
corpus = load_corpus("shakespeare")
tok = CharTokenizer.from_texts(corpus.docs)
train_ids, val_ids = encode_corpus(corpus, tok)

# %% [markdown]
# ## 1. Five masks over one text
#
# The same text under each objective. Rows are queries, columns keys, coloured where attention is allowed. BERT
# sees everything; GPT only the past; the prefix LM sees its prefix both ways and the rest causally; T5's decoder
# (right block) reads the encoder and its own past; GLM's Part B reads Part A and its own past, with the spans in a
# shuffled order.

# %%
display(viz.plot_objective_masks())

# %% [markdown]
# ## 2. What each one predicts
#
# One window of 40 characters, through each objective. Read the `loss` row: it marks the targets the model is
# graded on. BERT predicts the original token at a few corrupted positions (no shift); GPT and the prefix LM
# predict the next token; T5 and GLM write the blanked spans after the text (targets already shifted), T5 in text
# order with one sentinel between spans, GLM in a shuffled order with `<sop>`/`<eop>` and its two position rows.

# %%
window = next(iter(iter_eval_batches(val_ids, tok, 40, 1, objective="gpt", max_batches=1))).targets[0]
window = np.concatenate([[tok.cls_id], window[:38], [tok.eos_id]])  # [CLS] 38 characters <eos>
for name in OBJECTIVES:
    batch = make_objective(name, tok).make_batch([window], np.random.default_rng(3))
    print(f"--- {name}: sep = {int(batch.sep[0])}, {int(batch.loss_mask.sum())} of {int(batch.lengths[0])} "
          "positions carry a loss")
    print(describe(batch, tok, max_tokens=48))

# %% [markdown]
# ## 3. One budget, five models
#
# The same model (lesson 5's), the same data order, the same number of steps of the same batch size, trained on
# each objective. Afterwards we measure three things:
#
# - **infilling**: greedy fills of held-out one-word and 2-4-word blanks, in GLM's decoding format (lesson 7),
#   scored by exact match and character F1 (`minglm/fill_eval.py`, the `eval fill` benchmark on a smaller set), and,
#   because a short run rarely fills a word exactly, the **infilling loss**: the cross-entropy of the blanked spans
#   of held-out windows written in GLM's Part B (15 % blanked, the same batches for every model);
# - **language modelling**: the loss of predicting every next token of held-out windows left to right (the GPT
#   format: `sep = 0`);
# - **the share of positions that carry a loss** in a training batch: how many targets one step learns from.
#
# In fast mode each model gets 80 steps (a few seconds each): enough to see the share of targets at work, not to
# settle which objective is better. `MINGLM_FAST=0` trains 1,000 steps each (several minutes).

# %%
steps = 80 if FAST else 1000
blanks = build_blank_set(corpus.val, n_word=24 if FAST else 150, n_span=8 if FAST else 50, max_chars=58)


def train_on(objective):
    rng = np.random.default_rng(0)
    train = TrainConfig(seq_len=64, batch_size=16, steps=steps, lr=5e-3 if FAST else 2e-3, warmup=20,
                        eval_every=0, objective=objective)
    model = GLM(GLMConfig.preset("tiny", vocab_size=tok.vocab_size, seq_len=64, max_len=80, n_layer=2, n_head=4,
                                 d_model=64) if FAST else
                GLMConfig.preset("tiny", vocab_size=tok.vocab_size, seq_len=64, max_len=80), rng)
    loader = BlockLoader(train_ids[:4] if FAST else train_ids, tok, train.seq_len, train.batch_size,
                         objective=objective)
    optimizer = AdamW(model.named_parameters(), lr=train.lr, betas=(train.beta1, train.beta2),
                      weight_decay=train.weight_decay)
    trainer = Trainer(model, optimizer, CosineSchedule(train.lr, train.warmup, train.steps), loader, rng, train,
                      verbose=False)
    trainer.fit()
    return model, trainer


results = {}
for name in OBJECTIVES:
    start = time.perf_counter()
    model, trainer = train_on(name)
    model.eval()
    probe = trainer.loader.next_batch(np.random.default_rng(9))
    share = float(probe.loss_mask.sum() / probe.lengths.sum())
    with no_grad():
        lm = np.mean([glm_loss(model, b).item() for b in iter_eval_batches(val_ids, tok, 64, 16, objective="gpt",
                                                                             max_batches=4)])
        infill = np.mean([glm_loss(model, b).item() for b in iter_eval_batches(val_ids, tok, 64, 16,
                                                                                 objective="glm-base",
                                                                                 max_batches=4)])
    fills = score(model_fills(model, tok, blanks, max_new=12), blanks)["all"]
    results[name] = dict(share=share, lm=lm, infill=infill, exact=fills["exact"], f1=fills["f1"],
                         records=trainer.records)
    print(f"{name:>8}: {share:5.1%} of positions carry a loss | LM loss {lm:.2f} | infilling loss {infill:.2f} | "
          f"fill exact {fills['exact']:.1%} char-F1 {fills['f1']:.1%} | {time.perf_counter() - start:.0f} s")

# %% tags=["thumbnail"]
fig, axes = plt.subplots(1, 4, figsize=(15, 3.4))
colors = ["#56B4E9", "#E69F00", "#009E73", "#CC79A7", "#0072B2"]
for ax, key, title in zip(axes, ("share", "lm", "infill", "f1"),
                          ("share of positions with a loss", "left-to-right LM loss (lower is better)",
                           "infilling loss (lower is better)", "greedy fills: char-F1 (higher is better)")):
    ax.bar(OBJECTIVES, [results[n][key] for n in OBJECTIVES], color=colors)
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis="x", labelsize=8)
plt.show()
display(viz.plot_loss_curves([results[n]["records"] for n in OBJECTIVES], labels=OBJECTIVES, smooth=0.9,
                             show_lr=False, per_objective=False,
                             title="Training loss of each objective (each on its own targets)"))

# %% [markdown]
# How to read this (and what not to read into it):
#
# - **The share of targets** is the cleanest difference. GPT learns from every position, the prefix LM from the
#   part after its random prefix (about half on average), BERT, T5 and GLM at 15 % from a seventh to a fifth of
#   them (T5 and GLM add the `<eop>`/sentinel targets). On a fixed budget of steps that is a real handicap for the
#   blank fillers, and the reason the course's own runs blank half of each window (lesson 5).
# - **The training losses are not comparable** with each other: each objective has its own targets. BERT's
#   targets are single characters with context on both sides, which is easier than GPT's next character.
# - **Language modelling** favours the objectives that train in that exact format (GPT and the prefix LM). GLM-Base
#   never sees a causal Part A, and does poorly here: that is why GLM adds `[gMASK]` document-level blanks (lesson 9).
# - **Infilling** in GLM's format favours the objectives that write spans after the text (GLM, and T5, whose
#   decoder stream is close to GLM's Part B): their training examples look like the question. BERT predicts tokens
#   in place and must guess the length of a blank it was never trained to choose; GPT never saw a `[MASK]`. Eighty
#   steps leave every model far from an exact word (the greedy fills are mostly spaces and frequent letters), so
#   read the infilling loss, and rerun with `MINGLM_FAST=0` before drawing conclusions from the fills.
#
# The paper's own comparison (its tables of SuperGLUE, generation and the ablations) uses models of hundreds of
# millions of parameters; the point here is the method: one model, one budget, each objective measured on the same
# held-out data.
#
# ## Summary
#
# - BERT, GPT, prefix LM, T5 and GLM differ in three things only: which keys each query sees (`sep`, or T5's
#   separate decoder), which positions carry a loss, and whether the targets are shifted.
# - In minglm they all produce the same `Batch`, so one model trains on any of them and the comparison is fair.
# - GPT-style objectives train on nearly every position; masked ones on a fraction, which matters on a small budget.
# - Each objective does best at the task whose format it trains on; GLM's mixture (lesson 9) is how one model
#   covers both infilling and generation.
#
# ## Exercises
#
# **1.** BERT's corruption: the chosen positions become `[MASK]` 80 % of the time, a random token 10 % and stay
# unchanged 10 %. Given the chosen positions, one uniform number `u` per position and the random ids to use, return
# the corrupted tokens. The checker draws the same numbers as `BertObjective` and compares.

# %%
def bert_corrupt(tokens, chosen, u, random_ids):
    # your code here: return the corrupted tokens (a copy; [MASK] is id 2)
    return None


exercises.check_bert_corrupt(bert_corrupt)

# %% [markdown]
# **2.** (Think.) Why does BERT leave 10 % of the chosen tokens unchanged and replace 10 % by random ones, instead
# of always writing `[MASK]`? Which problem of BERT does GLM avoid by never putting the answer's position in the
# input at all?
#
# **3.** (Think.) The comparison above gives every objective the same number of *steps*. Name two other budgets
# one could hold equal (think of what a step costs for each objective), and say which objective each would favour.
