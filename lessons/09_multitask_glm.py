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
# # Lesson 9 — Multi-task GLM: `[MASK]`, `[sMASK]` and `[gMASK]`
#
# Lesson 8 showed the trade-off: short blanks teach a model to fill in, long left-to-right stretches teach it to
# write. GLM's answer (paper §2.3) is to train one model on both, **one objective per batch**:
#
# - **token level**: short spans, Poisson(3) long, 15 % of the text, blank `[MASK]` (lessons 3-5);
# - **sentence level**: whole sentences, 15 % of the text, blank **`[sMASK]`**;
# - **document level**: one long span at the end of the text, **50 % to 100 %** of it, blank **`[gMASK]`**: the
#   rest of a document written from its beginning, which is language modelling with a bidirectional prompt.
#
# The blank's name tells the model which kind of answer is wanted. minglm's presets mix them as the official
# scripts do (`minglm/data/objectives.py`, `docs/official-code.md` §2.1-§2.4).
#
# **Learning goals.** Build a sentence-level and a document-level sample and read them, know what each preset
# mixes, read span-length distributions, and prompt a model trained on the mixture with each blank.

# %%
# %matplotlib inline
import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("minglm") is None:  # opened from lessons/ without `pip install -e .`
    sys.path.insert(0, str(Path.cwd().parent))

import matplotlib.pyplot as plt
import numpy as np
from course_models import lesson_run
from IPython.display import display

import viz
from minglm import exercises
from minglm.data import GLM_PRESETS, describe, encode_corpus, load_corpus, make_objective, make_windows
from minglm.data.loader import frame_documents
from minglm.generate import Sampling, fill
from minglm.tokenizer import CharTokenizer

corpus = load_corpus("shakespeare")
tok = CharTokenizer.from_texts(corpus.docs)
rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. The presets
#
# Each preset is a handful of numbers: the probability that a batch is token level (`bert_prob`), sentence level
# (`sentence_prob`; document level gets the rest), the shortest `[gMASK]` span as a fraction of the sample
# (`gpt_min_ratio`), and whether sentences and documents get their own blanks (`task_mask`).

# %%
print(f"{'preset':<10} {'token':>6} {'sentence':>9} {'document':>9} {'gMASK min':>10} {'task masks':>11}")
for name, p in GLM_PRESETS.items():
    doc = 1 - p["bert_prob"] - p["sentence_prob"]
    print(f"{name:<10} {p['bert_prob']:>6.0%} {p['sentence_prob']:>9.0%} {doc:>9.0%} {p['gpt_min_ratio']:>10.0%} "
          f"{str(p['task_mask']):>11}")

# %% [markdown]
# `glm-base` is lessons 3-8's objective. `glm-doc` is the paper's GLM-Doc (half token level, half documents of
# 50-100 %, all with `[MASK]`); `glm-10b` is GLM-10B's mixture with the task masks; `glm-130b` is GLM-130B's (70 %
# `[gMASK]`, lesson 12).
#
# ## 2. `[sMASK]`: whole sentences
#
# At sentence level, whole sentences (ending in `. ? ! ; :` or a line break) are drawn until they cover 15 % of the
# sample. Each becomes one `[sMASK]` in Part A and one span in Part B:

# %%
text = ("Is this a dagger which I see before me? Come, let me clutch thee. I have thee not, and yet I see "
        "thee still. Art thou not, fatal vision, sensible to feeling as to sight?")
sentence, _ = viz.sample_from_text(text, tok, objective="glm-10b", mode="sentence", seed=2)
print(describe(sentence, tok, max_tokens=200, show_mask=False)[:1500])
display(viz.plot_blank_infilling(sentence, tokenizer=tok, line_width=60))

# %% [markdown]
# ## 3. `[gMASK]`: the rest of the document
#
# At document level one span covers the end of the sample: Part A is the beginning followed by `[gMASK]`, Part B
# writes the rest from `<sop>`. Its last target is the document's own `<eos>` (no `<eop>`), so the model learns to
# end a text as well as to continue it.

# %%
document, _ = viz.sample_from_text(text, tok, objective="glm-10b", mode="document", seed=2)
print(describe(document, tok, max_tokens=200, show_mask=False)[:900])
display(viz.plot_attention_mask(document, tokenizer=tok))

# %% [markdown]
# The mask is a prefix LM's: the beginning is read both ways, the continuation left to right. `sep` is again all
# the mask needs.
#
# ## 4. How long are the blanks?
#
# The span lengths of many batches of the `glm-10b` and `glm-doc` mixtures, by level, on 128-character windows of
# the corpus. Token-level spans follow the Poisson(3); sentences are as long as Shakespeare's sentences; the
# document span of `glm-doc` is spread evenly between half and all of the window (`gpt_min_ratio = 0.5`), and
# `glm-10b`'s from a quarter.

# %% tags=["thumbnail"]
train_ids, _ = encode_corpus(corpus, tok)
windows = make_windows(frame_documents(train_ids[:3], tok.cls_id, tok.eos_id), 128, tok.cls_id)


def span_lengths(batch):
    """The length of every blanked span of a batch, read from Part B: a span restarts its block ids at 1."""
    out = []
    for row in range(batch.tokens.shape[0]):
        sep, n = int(batch.sep[row]), int(batch.lengths[row])
        starts = np.flatnonzero(batch.block_position_ids[row, sep:n] == 1)
        out += list(np.diff(np.r_[starts, n - sep]) - 1)  # minus the <sop>
    return out


lengths = {}
for preset in ("glm-10b", "glm-doc"):
    objective = make_objective(preset, tok)
    for mode in ("token", "sentence", "document"):
        if mode == "sentence" and GLM_PRESETS[preset]["sentence_prob"] == 0:
            continue
        got = []
        for _ in range(40):
            picks = rng.choice(len(windows), size=8, replace=False)
            got += span_lengths(objective.make_batch([windows[i] for i in picks], rng, mode=mode))
        lengths[(preset, mode)] = np.array(got)

fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
axes[0].hist(lengths[("glm-10b", "token")], bins=np.arange(1, 16) - 0.5, color="#0072B2")
axes[0].set_title("token level ([MASK]): Poisson(3)", fontsize=10)
axes[1].hist(lengths[("glm-10b", "sentence")], bins=20, color="#009E73")
axes[1].set_title("sentence level ([sMASK])", fontsize=10)
for preset, color in (("glm-10b", "#E69F00"), ("glm-doc", "#CC79A7")):
    axes[2].hist(lengths[(preset, "document")] / 128, bins=np.linspace(0, 1, 21), alpha=0.7, color=color,
                 label=f"{preset} (min {GLM_PRESETS[preset]['gpt_min_ratio']:.0%})")
axes[2].set_title("document level ([gMASK]): share of the window", fontsize=10)
axes[2].legend(fontsize=8)
for ax in axes:
    ax.set_xlabel("span length" + (" / window" if ax is axes[2] else " (characters)"))
plt.show()

# %% [markdown]
# ## 5. A model trained on the mixture
#
# `lesson_run` (in `lessons/course_models.py`) trains a small GLM with `--objective glm-10b` once and keeps it (in
# fast mode 2 layers for 300 steps, under a minute; enough for the mechanics, not for good English). Its log
# records the loss of each level separately, which the right panel shows:

# %%
model, mtok, run = lesson_run("lesson-multitask-fast", objective="glm-10b")
display(viz.plot_loss_curves(run, smooth=0.9))

# %% [markdown]
# Now the three blanks, each asking for a different kind of answer. A text without any blank gets `[gMASK]`
# appended, so plain text is a prompt to continue. Sampling uses our own seeded generator:

# %%
prompts = ["To be, or not to be: that is the [MASK].",
           "Friends, Romans, countrymen. [sMASK] I come to bury Caesar.",
           "ROMEO:\n"]
rng = np.random.default_rng(0)
for prompt in prompts:
    out = fill(model, mtok, prompt, Sampling(temperature=0.7, top_k=10, max_new_tokens=40), rng=rng)
    print(f"{prompt!r}\n  -> {out.marked_text!r}   (stopped: {out.stop_reasons})")

# %% [markdown]
# ## Summary
#
# - GLM trains one model on three levels of blanks, one level per batch: token spans (`[MASK]`), sentences
#   (`[sMASK]`) and one long suffix of 50-100 % of the document (`[gMASK]`).
# - A `[gMASK]` sample is a prefix LM: a bidirectional beginning and a left-to-right continuation that ends with the
#   document's `<eos>`.
# - The presets are a few numbers: `glm-10b` mixes 50/30/20 % with task masks, `glm-doc` 50/50 % with `[MASK]`.
# - At inference the blank chooses the task: fill a span, write a sentence, or continue a text.
#
# ## Exercises
#
# **1.** A document-level batch draws one bound for all its samples, uniformly between `int(min_ratio · shortest)`
# (at least 1) and `longest − 2`. Return that range `(lo, hi)`, both ends included, for the lengths of a batch.

# %%
def gmask_range(lengths, min_ratio):
    # your code here: return lo, hi
    return None


exercises.check_gmask_range(gmask_range)

# %% [markdown]
# **2.** (Think.) Why give sentences and documents their own blank tokens instead of one `[MASK]` for everything?
# What would a model trained on `glm-doc` (one blank for both levels) do with `[MASK]` at the end of a prompt?
#
# **3.** (Think.) The document level puts GLM's generation task in the same model as infilling. What does the
# token level lose when a fifth of the batches are spent on documents, and how did the paper's GLM-10B results
# suggest the trade is worth it?
