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
# # Lesson 6 — The training recipe, and how it fails
#
# Lesson 5 trained a GLM with four ingredients it named in one sentence: **AdamW**, a **warmup** then a **cosine**
# learning rate, **gradient clipping**, and a guard that **rolls back** a bad step. GLM trains with exactly these
# (`docs/official-code.md` §4). This lesson writes each one out, then watches the recipe fail and recover:
#
# 1. AdamW's update, and the property that matters most: its step does not shrink when the gradient does;
# 2. the schedule and the clip;
# 3. the loss spike a little after step 18 that every fast-mode loss curve of the course shows, taken apart;
# 4. a spike rolled back live by the trainer's guard;
# 5. an exact resume: stop a run, load its checkpoint, and get the same numbers bit for bit.
#
# The code is `minglm/optim.py` (AdamW, `lr_at`, clipping) and `minglm/train.py` (the Trainer, its guard and its
# checkpoints). **Learning goals.** Write AdamW's update and the schedule from memory, read a loss curve for the
# signs of a too-large learning rate, and know what a checkpoint must hold for a run to continue exactly.

# %%
# %matplotlib inline
import importlib.util
import sys
import tempfile
from pathlib import Path

if importlib.util.find_spec("minglm") is None:  # opened from lessons/ without `pip install -e .`
    sys.path.insert(0, str(Path.cwd().parent))

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import display

import viz
from minglm import exercises
from minglm.config import TrainConfig
from minglm.data import BlockLoader, encode_corpus, load_corpus
from minglm.model import GLM, GLMConfig, glm_loss
from minglm.optim import AdamW, CosineSchedule, lr_at
from minglm.tokenizer import CharTokenizer
from minglm.train import Trainer

corpus = load_corpus("shakespeare")
tok = CharTokenizer.from_texts(corpus.docs)
train_ids, _ = encode_corpus(corpus, tok)
train_ids = train_ids[:4]  # lesson 5's slice of four plays


def make_trainer(seed=0, mask_ratio=0.5, ckpt_dir=None, fault_hook=None, **settings):
    """Lesson 5's fast-mode setup (2 layers of width 64, 16 windows of 64 characters, peak lr 5e-3 after 20 warmup
    steps), with any TrainConfig field changed by ``settings``; everything drawn from one seeded generator."""
    rng = np.random.default_rng(seed)
    cfg = dict(seq_len=64, batch_size=16, steps=250, lr=5e-3, warmup=20, eval_every=0, mask_ratio=mask_ratio)
    train = TrainConfig(**{**cfg, **settings})
    model = GLM(GLMConfig.preset("tiny", vocab_size=tok.vocab_size, seq_len=64, max_len=65, n_layer=2, n_head=4,
                                 d_model=64), rng)
    loader = BlockLoader(train_ids, tok, train.seq_len, train.batch_size, objective="glm-base",
                         mask_ratio=train.mask_ratio)
    optimizer = AdamW(model.named_parameters(), lr=train.lr, betas=(train.beta1, train.beta2), eps=train.eps,
                      weight_decay=train.weight_decay)
    schedule = CosineSchedule(train.lr, train.warmup, train.steps, train.min_lr_ratio)
    return Trainer(model, optimizer, schedule, loader, rng, train, ckpt_dir=ckpt_dir, fault_hook=fault_hook,
                   verbose=False)


def steps_of(trainer, key="loss"):
    records = [r for r in trainer.records if key in r]
    return np.array([r["step"] for r in records]), np.array([r[key] for r in records])


# %% [markdown]
# ## 1. AdamW, written out
#
# For every weight $p$ with gradient $g$, at update $t = 1, 2, \dots$ and learning rate $\eta_t$ (the schedule's),
# with $\beta_1 = 0.9$, $\beta_2 = 0.95$ (GLM-10B's), $\epsilon = 10^{-8}$ and weight decay $\lambda = 0.1$:
#
# $$\begin{aligned}
# p &\leftarrow p - \eta_t \lambda\, p && \text{decoupled decay (matrices only, not biases or LayerNorms)}\\
# m &\leftarrow \beta_1 m + (1-\beta_1)\, g, \qquad v \leftarrow \beta_2 v + (1-\beta_2)\, g^2
#   && \text{running mean and mean square of } g\\
# p &\leftarrow p - \eta_t\, \frac{m / (1-\beta_1^t)}{\sqrt{v / (1-\beta_2^t)} + \epsilon}
#   && \text{bias-corrected, per weight}
# \end{aligned}$$
#
# The last line divides the mean gradient by its own root mean square, so each weight moves by about $\eta_t$
# **whatever the size of its gradient**. Here is that property on lesson 5's model: one AdamW step with the true
# gradient, and one with the gradient divided by 100, move the weights by the same amount.

# %%
moves = []
for shrink in (1.0, 0.01):
    trainer = make_trainer()
    batch = trainer.loader.next_batch(trainer.rng)
    loss = glm_loss(trainer.model, batch)
    loss.backward()
    for p in trainer.optimizer.params:
        if p.grad is not None:
            p.grad = p.grad * shrink
    before = trainer.optimizer.flat.copy()
    trainer.optimizer.step(1e-3)
    moves.append(np.abs(trainer.optimizer.flat - before))
    print(f"gradient × {shrink:<5}: mean |Δp| = {moves[-1].mean():.2e}, largest {moves[-1].max():.2e} (lr 1e-3)")

# %% [markdown]
# That is why Adam needs no tuning per layer, and also why a learning rate that is too large shows up as a
# *sudden* failure rather than a slow one: when the gradients become small, the steps do not. Keep this in mind
# for section 3.
#
# ## 2. The schedule and the clip
#
# The learning rate rises linearly for `warmup` steps, then follows half a cosine down to 10 % of its peak
# (`minglm.optim.lr_at`, 0-based steps):
#
# $$\eta_t = \begin{cases} \eta_{\max}\,\dfrac{t+1}{w} & t < w \\[1ex]
# \eta_{\min} + \tfrac12(\eta_{\max} - \eta_{\min})\left(1 + \cos\pi\,\dfrac{t - w}{T - w}\right) & t \ge w
# \end{cases}$$
#
# Before each update the gradient of all weights together is **clipped** to norm 1: if $\|g\| > 1$, every entry is
# divided by $\|g\|$. One extreme batch can then change the direction of a step, but not its size.

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3))
for peak, warmup, total, label in ((5e-3, 20, 250, "lessons 5 and 6 (fast mode)"),
                                   (2e-3, 100, 3600, "python -m minglm train (tiny)")):
    t = np.arange(total)
    ax = ax1 if total < 1000 else ax2
    ax.plot(t, [lr_at(s, peak, warmup, total) for s in t])
    ax.axvline(warmup, color="gray", ls=":", lw=1)
    ax.set_title(label, fontsize=10)
    ax.set_xlabel("step")
ax1.set_ylabel("learning rate")
plt.show()

# %% [markdown]
# ## 3. The spike a little after step 18
#
# The fast-mode loss curves of the course have a bump a little after step 18, where the warmup ends. Here is lesson
# 5's setup for 30 steps, once at its own 50 % of blanked tokens and once at GLM's 15 %, where the bump becomes a
# real spike, and then twice more at 15 % with the recipe changed in one place: a lower peak learning rate, and a
# longer warmup.

# %% tags=["thumbnail"]
runs = {
    "lesson 5 (50 % blanks)": make_trainer(),
    "GLM's 15 % blanks": make_trainer(mask_ratio=0.15),
    "15 %, peak lr 2e-3": make_trainer(mask_ratio=0.15, lr=2e-3),
    "15 %, warmup 60": make_trainer(mask_ratio=0.15, warmup=60),
}
for trainer in runs.values():
    trainer.fit(until=30)

fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
for name, trainer in runs.items():
    for ax, key in zip(axes, ("loss", "grad_norm", "lr")):
        ax.plot(*steps_of(trainer, key), label=name)
axes[0].axhline(3.1, color="gray", ls=":", lw=1)
axes[0].text(1, 3.13, "unigram baseline ≈ 3.1", fontsize=8, color="gray")
axes[0].set_title("loss")
axes[1].set_yscale("log")
axes[1].set_title("gradient norm (before the clip at 1)")
axes[2].set_title("learning rate")
for ax in axes:
    ax.axvline(20, color="gray", ls="--", lw=0.8)
    ax.set_xlabel("step")
axes[0].legend(fontsize=7)
plt.show()
for name, trainer in runs.items():
    steps, norm = steps_of(trainer, "grad_norm")
    loss = steps_of(trainer)[1]
    k = int(np.argmax(np.where(steps > 10, norm, 0)))  # the largest gradient norm after the first steps
    print(f"{name:<24} largest gradient norm after step 10: {norm[k]:5.1f} at step {steps[k]} "
          f"(loss {loss[k - 1]:.2f} -> {loss[k]:.2f}); median {np.median(norm[10:]):.1f}")

# %% [markdown]
# What the measurements say:
#
# - **When**: the spike comes right where the warmup ends (dashed line): the first steps at the peak learning rate
#   of 5e-3.
# - **What the model is doing then**: its loss has just fallen to about the unigram baseline. It has learned how
#   often each character is a target, and not yet how to use the context. Its gradient norm has fallen from about
#   3 to about 0.5: the easy progress is made.
# - **Why that is dangerous**: AdamW's steps do not shrink with the gradient (section 1). A small, noisy gradient
#   still moves every weight by about the learning rate, now at its largest. One batch lands where such a step
#   overshoots, the loss jumps, and that step's gradient norm comes out many times larger than the others (at 15 %
#   blanks; at 50 % the loss averages over three times as many targets, and the same event is a small bump).
# - **Why it recovers at once**: the clip limits the damage of the next step to norm 1, and the loss is back within
#   a step or two. With the same peak reached more slowly (warmup 60) or a lower peak (2e-3), there is no spike.
#
# So the spike is the recipe's learning rate at its edge, at the moment the model reaches its first plateau. It
# does no lasting harm here; the README's runs use peak 2e-3 for the tiny preset.
#
# ## 4. A spike rolled back, live
#
# Some spikes do lasting harm: a NaN, or a loss ten times the recent median. The Trainer checks every loss
# *before* applying the update. A bad one triggers a **rollback**: weights and optimizer go back to the last
# checkpoint, while the data position and the random generator go on, so the offending batches are skipped
# (`minglm/train.py`). Here a fault hook multiplies the loss of step 32 by 50, once (as one corrupted batch
# would), and the run keeps a checkpoint every 10 steps:

# %%
corrupted = []


def corrupt_step_32_once(step, loss):
    if step == 32 and not corrupted:
        corrupted.append(step)
        return loss * 50.0
    return loss


with tempfile.TemporaryDirectory() as ckpt:
    trainer = make_trainer(ckpt_dir=ckpt, ckpt_every=10, fault_hook=corrupt_step_32_once)
    trainer.verbose = True  # print the rollback line
    trainer.fit(until=36)
events = [r for r in trainer.records if r.get("event") == "rollback"]
print(events)
display(viz.plot_loss_curves([trainer.records], labels=["spike injected at step 32"], smooth=0.0, show_lr=False))

# %% [markdown]
# The red line marks the rollback; the crosses are the steps it undid (31 and 32 are redone with new batches). The
# corrupted loss was never applied to the weights.
#
# ## 5. Exact resume
#
# A run that is stopped (a crash, a time limit) and resumed must continue as if nothing happened. That needs more
# than the weights: AdamW's $m$, $v$ and $t$, the random generator's state, the data loader's position and the
# guard's recent losses. A Trainer checkpoint holds all of them (`Trainer.state`). Train 30 steps with a
# checkpoint at 15; then build everything anew, load step 15, and train to 30 again:

# %%
with tempfile.TemporaryDirectory() as ckpt:
    first = make_trainer(ckpt_dir=ckpt, ckpt_every=15)
    first.fit(until=30)
    second = make_trainer(seed=123, ckpt_dir=None)  # another seed: everything must come from the checkpoint
    print("resumed from step", second.load_checkpoint(Path(ckpt) / "step_15.json"))
    second.fit(until=30)
a = [r["loss"] for r in first.records if "loss" in r and r["step"] > 15]
b = [r["loss"] for r in second.records if "loss" in r]
print("steps 16-30, first run: ", np.round(a[:5], 6), "...")
print("steps 16-30, resumed:   ", np.round(b[:5], 6), "...")
print("bit for bit the same:", a == b)
print("same weights at step 30:", all(np.array_equal(p.data, q.data) for p, q in
                                      zip(first.optimizer.params, second.optimizer.params)))

# %% [markdown]
# `python -m minglm train --resume RUN` does the same with a run folder, and also truncates `log.jsonl` to the
# line the checkpoint counted, so the log reads as one uninterrupted run.
#
# ## Summary
#
# - AdamW: decoupled decay, then the bias-corrected mean gradient over its root mean square. Each weight moves by
#   about the learning rate whatever its gradient's size.
# - The learning rate warms up linearly and decays along a half cosine; the global gradient norm is clipped to 1.
# - The fast-mode spike after step 18 is the peak learning rate arriving just as the model reaches the unigram
#   plateau, where small gradients still take full-size steps; a lower peak or a longer warmup removes it.
# - The guard checks a loss before it is applied and rolls back to the last checkpoint, skipping the bad batches.
# - A checkpoint with the optimizer moments, the rng, the data position and the guard's history resumes a run bit
#   for bit.
#
# ## Exercises
#
# **1.** Write the schedule: `lr_schedule(step, peak, warmup, total, min_ratio)`.

# %%
def lr_schedule(step, peak, warmup, total, min_ratio):
    # your code here
    return None


exercises.check_lr_schedule(lr_schedule)

# %% [markdown]
# **2.** Write one AdamW update of a weight matrix: return the new `(p, m, v)`. The checker runs three steps beside
# `minglm.optim.AdamW`.

# %%
def adamw_step(p, g, m, v, t, lr, beta1, beta2, eps, weight_decay):
    # your code here: return p, m, v
    return None


exercises.check_adamw_step(adamw_step)

# %% [markdown]
# **3.** (Think.) A rollback restores the weights but lets the data and the random generator go on. Why not
# replay the same batches after restoring? And why does the guard compare with a *median* of recent losses rather
# than their mean?
