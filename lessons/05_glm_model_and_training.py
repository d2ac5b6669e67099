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
# # Lesson 5 — The GLM model, and training it on Shakespeare
#
# Lesson 3 turned text into batches: token ids, two rows of position ids, targets, a loss mask and one `sep` per
# row. This lesson follows one batch through the model in `minglm/model.py`, checking every shape on the way,
# and then trains a small GLM on a slice of Shakespeare and watches the loss fall.
#
# **Learning goals.** Follow a batch through the model with every shape, compute GLM's loss and its starting
# value, take one training step by hand, train a small model and judge it against a baseline.
#
# The architecture (`docs/official-code.md` §3) is a GPT-2-style transformer (lesson 4 built its block) with three
# GLM touches:
#
# - the input is **word + position + block-position** embedding (two learned position tables);
# - attention uses the **`sep` mask**: bidirectional over Part A, causal over Part B;
# - the output head is **tied** to the word embeddings.
#
# Glossary: B = batch, T = time (tokens), C = channels (`d_model`), nh = heads, hs = head size (C / nh),
# V = vocabulary, N = B·T.
#
# **Fast mode.** With `MINGLM_FAST=1` (the default, and what CI uses) the model is tiny and the run takes well
# under a minute. Set `MINGLM_FAST=0` before starting Jupyter for the real `tiny` preset and a longer run.

# %%
# %matplotlib inline
import importlib.util
import math
import os
import sys
import time
from pathlib import Path

if importlib.util.find_spec("minglm") is None:  # opened from lessons/ without `pip install -e .`
    sys.path.insert(0, str(Path.cwd().parent))

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import display

import minglm.functional as F
import viz
from minglm import exercises, no_grad
from minglm.config import TrainConfig
from minglm.data import BlockLoader, encode_corpus, iter_eval_batches, load_corpus
from minglm.model import GLM, GLMConfig, glm_loss
from minglm.optim import AdamW, CosineSchedule
from minglm.tokenizer import CharTokenizer
from minglm.train import Trainer, unigram_baseline

try:  # sliders beside the static figures; headless (or without ipywidgets) the static figures say the same
    from ipywidgets import IntSlider, interact
except ImportError:
    interact = None

FAST = os.environ.get("MINGLM_FAST", "1") == "1"
rng = np.random.default_rng(0)  # the one generator: model init, data order, the blanks

if FAST:  # about 150 k parameters, 64-token windows: a couple of hundred steps in well under a minute
    model_overrides = dict(n_layer=2, n_head=4, d_model=64)
    train = TrainConfig(seq_len=64, batch_size=16, steps=250, lr=5e-3, warmup=20, eval_every=50, eval_batches=4)
    n_train_plays = 4
else:  # the `tiny` preset of `python -m minglm train`
    model_overrides = {}
    train = TrainConfig(steps=800, eval_every=100, eval_batches=8)
    n_train_plays = 34
print("fast mode" if FAST else "full mode", "|", train.steps, "steps of", train.batch_size, "windows of",
      train.seq_len, "tokens")

# %% [markdown]
# ## 1. Data: a slice of Shakespeare
#
# The corpus is split by play, so the validation plays are never seen in training. A `BlockLoader` frames every
# document as `[CLS] play <eos>`, cuts the stream into windows of `seq_len` tokens and blanks each window with
# the GLM objective (here `glm-base`: token-level spans, as GLM-Base and GLM-Large were trained).
#
# One deliberate change from lesson 3: the spans cover **half** of each window (`mask_ratio=0.5`), not GLM's 15 %,
# as `python -m minglm train` does by default (`TrainConfig.mask_ratio`). In a minute of CPU time the small model
# learns from the number of Part-B targets it sees, and 15 % gives it a third as many.

# %%
corpus = load_corpus("shakespeare")
tok = CharTokenizer.from_texts(corpus.docs)
train_ids, val_ids = encode_corpus(corpus, tok)
train_ids = train_ids[:n_train_plays]  # a slice keeps the lesson quick; the full run uses every training play
print(f"training on {n_train_plays} plays, {sum(map(len, train_ids)):,} characters; vocabulary {tok.vocab_size}")

loader = BlockLoader(train_ids, tok, train.seq_len, train.batch_size, objective="glm-base",
                     mask_ratio=train.mask_ratio)
val_batches = [("token", b) for b in iter_eval_batches(val_ids, tok, train.seq_len, train.batch_size,
                                                       objective="glm-base", max_batches=train.eval_batches,
                                                       mask_ratio=train.mask_ratio)]
print(f"mask_ratio {train.mask_ratio}: {loader.next_batch(np.random.default_rng(1)).loss_mask.mean():.0%} of the "
      "positions of a batch carry a loss")
batch = loader.next_batch(rng)
for name in ("tokens", "targets", "loss_mask", "position_ids", "block_position_ids", "sep"):
    a = getattr(batch, name)
    print(f"{name:>18}  {str(a.shape):10} {a.dtype}")

# %% [markdown]
# The windows are `seq_len` tokens before blanking; Part B adds one `<sop>` per span, so T is a little longer
# than `seq_len` and varies from batch to batch.
#
# ## 2. The model and its parameters
#
# `GLMConfig` holds the sizes. The two position tables have `max_len + 1` rows, as in GLM: position ids reach
# `seq_len − 1` and block ids reach the longest span + 1.

# %%
config = GLMConfig.preset("tiny", vocab_size=tok.vocab_size, seq_len=train.seq_len,
                          max_len=train.seq_len + 1, **model_overrides)
model = GLM(config, rng)
print(config)
print(f"{model.num_parameters():,} parameters")
for name, p in model.named_parameters():
    if name.startswith("layers.") and not name.startswith("layers.0."):
        continue  # every layer has the same parameters as layer 0
    print(f"  {name:48} {str(p.shape):12}")

# %% [markdown]
# There is no separate output matrix: the logits are `h @ word_embeddings.weight.T` (tied weights, no bias).
#
# ## 3. The forward pass, one step at a time
#
# `model(tokens, position_ids, block_position_ids, sep)` does everything below in one call. Here we take it apart
# with the model's own pieces and check that the pieces give exactly the same logits.

# %%
tokens, pos, block, sep = batch.tokens, batch.position_ids, batch.block_position_ids, batch.sep
B, T = tokens.shape
C, nh = config.d_model, config.n_head

with no_grad():
    # embeddings: three table lookups, added; activations are kept as (N, C) so every Linear is one matrix product
    x = model.embed(tokens, pos, block)  # (N, C)
    print("embedding             ", x.shape)

    # first layer, attention half: pre-LayerNorm, fused QKV projection split into heads
    layer0 = model.layers[0]
    h = layer0.input_layernorm(x)  # (N, C)
    q, k, v = layer0.attention.qkv(h, B, T)  # each (B, nh, T, hs)
    print("q, k, v               ", q.shape, "  hs =", C // nh)
    y = F.scaled_dot_product_attention(q, k, v, sep=sep)  # (B, nh, T, hs), with the mask built from sep
    y = y.permute(0, 2, 1, 3).reshape(B * T, C)  # (N, C): the heads side by side again
    x1 = x + layer0.attention.dense(y)  # residual connection
    print("after attention       ", x1.shape)

    # first layer, MLP half: pre-LayerNorm, C -> 4C -> C with the tanh GeLU
    m = F.gelu(layer0.mlp.dense_h_to_4h(layer0.post_attention_layernorm(x1)))  # (N, 4C)
    print("MLP hidden            ", m.shape)
    x1 = x1 + layer0.mlp.dense_4h_to_h(m)  # (N, C)

    # the other layers in one call each, then the final LayerNorm and the tied output head
    for layer in model.layers[1:]:
        x1 = layer(x1, B, T, sep)  # (N, C)
    logits = F.linear(model.final_layernorm(x1), model.word_embeddings.weight)  # (N, V)
    logits = logits.reshape(B, T, config.vocab_size)  # (B, T, V)
    print("logits                ", logits.shape)

    full = model(tokens, pos, block, sep)
print("max |step by step − model(...)| =", float(np.abs(full.numpy() - logits.numpy()).max()))

# %% [markdown]
# ## 4. The loss before training
#
# GLM's loss is the cross-entropy of Part B's targets only, averaged over every target in the batch (the
# `loss_mask` picks them). An untrained model with small random weights predicts nearly uniform probabilities,
# so the loss should start near $\ln V$:

# %%
with no_grad():
    loss0 = glm_loss(model, batch).item()
print(f"initial loss {loss0:.3f}   ln(V) = ln({tok.vocab_size}) = {math.log(tok.vocab_size):.3f}")
print("Part-B targets in this batch:", int(batch.loss_mask.sum()), "of", batch.loss_mask.size, "positions")

# %% [markdown]
# Untrained attention, layer 0, head 0, for the first row: every query spreads its weight almost evenly over the
# keys it may see. The white region is the mask: Part A cannot look into Part B, and Part B is causal.

# %%
display(viz.plot_attention_weights(model, batch, layer=0, head=0, tokenizer=tok))

# %% [markdown]
# ## 5. One training step by hand
#
# A step is: forward, loss, `backward()` (the engine of lesson 1 fills every parameter's `.grad`), clip the global
# gradient norm to 1, and one AdamW update at the scheduled learning rate (warmup, then cosine decay). Lesson 6
# writes each of these out and shows what goes wrong without them.

# %%
optimizer = AdamW(model.named_parameters(), lr=train.lr, betas=(train.beta1, train.beta2), eps=train.eps,
                  weight_decay=train.weight_decay)
schedule = CosineSchedule(train.lr, train.warmup, train.steps, train.min_lr_ratio)

loss = glm_loss(model, batch)
optimizer.zero_grad()
loss.backward()
print("gradient of the word embeddings:", model.word_embeddings.weight.grad.shape)
norm = optimizer.clip_grad_norm(train.clip)
optimizer.step(schedule(0))
with no_grad():
    print(f"loss {loss.item():.4f} -> {glm_loss(model, batch).item():.4f} after one step (grad norm {norm:.2f}, "
          f"lr {schedule(0):.1e})")

# %% [markdown]
# ## 6. Training
#
# `minglm.train.Trainer` repeats that step, evaluates on fixed validation batches every `eval_every` steps, and
# guards against loss spikes (it would roll back to the last checkpoint). `python -m minglm train` wraps the same
# Trainer with run folders, checkpoints and a `log.jsonl`; here we keep everything in memory.

# %%
trainer = Trainer(model, optimizer, schedule, loader, rng, train, val_batches=val_batches, verbose=True)
start = time.perf_counter()
trainer.fit()
seconds = time.perf_counter() - start
print(f"{trainer.step} steps in {seconds:.1f} s")

# %% [markdown]
# `trainer.records` holds one dictionary per step (loss, learning rate, gradient norm, and the validation loss on
# evaluation steps): the same records a run writes to `log.jsonl`, so the same plot works for both. The small bump
# and the flat stretch a little after step 18, where the warmup ends and the loss reaches the unigram level, are no
# accident: lesson 6 takes them apart.

# %% tags=["thumbnail"]
display(viz.plot_loss_curves([trainer.records], labels=["lesson 3"], smooth=0.8))

# %% [markdown]
# Is the drop real learning? Compare with the best **context-free** guess, a unigram model of Part-B targets (it
# knows how often each character, and `<eop>`, is a target, but not where it is). The model must beat it clearly.

# %%
unigram = unigram_baseline(loader, val_batches, tok.vocab_size, n_batches=16)
final = trainer.evaluate()
print(f"validation loss {final['val_loss']:.3f}  vs  unigram {unigram:.3f}  vs  uniform {math.log(tok.vocab_size):.3f}")
print(f"validation accuracy on Part-B targets: {final['val_acc']:.1%}")

# %% [markdown]
# After training, attention is no longer uniform. Rows are queries; the white regions are the mask (Part A cannot
# see Part B, and Part B is causal). Vertical stripes mean a head picks its keys by *what* they are (certain
# characters, wherever they sit) rather than by distance. In fast mode the model is small and young; with
# `MINGLM_FAST=0` the patterns get sharper.

# %%
display(viz.plot_attention_weights(model, val_batches[0][1], layer=config.n_layer - 1, head=0, tokenizer=tok))

# %% [markdown]
# In Jupyter, step through every layer and head with the sliders (headless, the figure above is the last layer's
# first head):

# %%
def head_of(layer, head):
    display(viz.plot_attention_weights(model, val_batches[0][1], layer=layer, head=head, tokenizer=tok))


if interact is not None:
    _ = interact(head_of, layer=IntSlider(value=config.n_layer - 1, min=0, max=config.n_layer - 1),
                 head=IntSlider(value=0, min=0, max=config.n_head - 1))

# %% [markdown]
# The probability the model gives each Part-B target of one validation row, span by span: the first character of
# a span (right after `<sop>`) is the hard guess; later characters of a word and `<eop>` get easier.

# %%
vb = val_batches[0][1]
with no_grad():
    logp = F.log_softmax(model(vb.tokens, vb.position_ids, vb.block_position_ids, vb.sep), axis=-1).numpy()
row = 0
n, s = int(vb.lengths[row]), int(vb.sep[row])
target_p = np.exp(logp[row, np.arange(s, n), vb.targets[row, s:n]])
fig, ax = plt.subplots(figsize=(10, 2.8))
ax.bar(np.arange(s, n), target_p, color="#0072B2")
ax.set_xticks(np.arange(s, n), [tok.decode([t]).replace(" ", "␣").replace("\n", "↵") for t in vb.targets[row, s:n]],
              fontsize=7)
ax.set_ylim(0, 1)
ax.set_ylabel("p(target)")
ax.set_title("Probability of each Part-B target (one validation row); tick = the target character")
plt.show()

# %% [markdown]
# ## Summary
#
# - The input of GLM is three embeddings added: word, position (the blank's place in Part A) and block position.
# - Each layer is pre-LN: `x + Attn(LN(x))`, then `x + MLP(LN(x))`; attention splits C into nh heads of hs
#   channels, and the mask is built from `sep` alone. A final LayerNorm and the tied embedding give the logits.
# - The loss is cross-entropy over Part-B targets only; it starts near $\ln V$.
# - Training is forward, backward, clip, AdamW step, at a warmup-then-cosine learning rate; the validation loss is
#   judged against a unigram baseline, not just against its own start.
#
# ## Exercises
#
# **1.** The loss gradient. GLM's loss is $\sum_n m_n(\log\sum_v e^{z_{nv}} - z_{n t_n}) / \sum_n m_n$ over all
# tokens $n$ of the batch, with mask $m$. Derive $\partial\,\text{loss}/\partial z$ in NumPy.

# %%
def cross_entropy_backward(logits, targets, loss_mask):
    # your code here: return dlogits with the shape of logits
    return None


exercises.check_cross_entropy_backward(cross_entropy_backward)

# %% [markdown]
# **2.** Count the parameters of a GLM from its config alone: the embeddings; per layer two LayerNorms, QKV, the
# output projection and the MLP; the final LayerNorm; no output matrix. The checker compares with
# `GLM(config).num_parameters()` for two configs.

# %%
def parameter_count(config):
    # your code here: use config.vocab_size, config.d_model, config.n_layer, config.max_len
    return None


exercises.check_parameter_count(parameter_count)

# %% [markdown]
# **3.** Retrain with the block-position embedding switched off: set every `block_position_ids` to 0 before the
# forward (write a small loader wrapper; do not edit the library). Which gets harder, and why? Hint: without it,
# how does the model know which character of the span comes next?
#
# **4.** (Think.) The loss counts `<eop>` targets. What would the model fail to learn if it did not?
