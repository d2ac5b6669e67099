"""minglm's data pipeline: corpora, GLM blank infilling, span samplers, objectives, batches and the loader.

Read in this order: corpus.py (text) -> blank.py (one sample's Part A / Part B, docs/official-code.md §2.5) ->
samplers.py (which spans, §2.2-§2.4 there) -> objectives.py (GLM's mixture and the baselines) -> batch.py (padding,
the dense mask, `describe`) -> loader.py (framing §1, epochs, resumable state).

    >>> from minglm.data import load_corpus, encode_corpus, BlockLoader, describe
    >>> from minglm.tokenizer import CharTokenizer
    >>> corpus = load_corpus("shakespeare"); tok = CharTokenizer.from_texts(corpus.train)
    >>> train_ids, val_ids = encode_corpus(corpus, tok)
    >>> loader = BlockLoader(train_ids, tok, seq_len=128, batch_size=8, objective="glm-10b")
    >>> import numpy as np; batch = loader.next_batch(np.random.default_rng(0)); print(describe(batch, tok))
"""

from minglm.data.batch import Batch, collate, dense_mask, describe
from minglm.data.blank import PaperView, Sample, blank_infill, check_spans, gmask_prefix, paper_view
from minglm.data.corpus import Corpus, encode_corpus, load_corpus, read_text_file, strip_play_markdown
from minglm.data.loader import BlockLoader, frame_documents, iter_eval_batches, make_windows
from minglm.data.objectives import (
    BASELINES,
    GLM_PRESETS,
    OBJECTIVE_NAMES,
    BertObjective,
    GLMObjective,
    GPTObjective,
    PrefixLMObjective,
    T5Objective,
    make_objective,
)
from minglm.data.samplers import (
    TokenSpanSampler,
    choose_sentences,
    draw_gmask_bound,
    draw_span_lengths,
    place_spans,
    sample_spans,
    sentence_spans,
    split_documents,
    truncated_poisson_pmf,
)

__all__ = [
    "Batch", "collate", "dense_mask", "describe",
    "Sample", "PaperView", "blank_infill", "check_spans", "gmask_prefix", "paper_view",
    "Corpus", "load_corpus", "encode_corpus", "read_text_file", "strip_play_markdown",
    "BlockLoader", "frame_documents", "make_windows", "iter_eval_batches",
    "GLMObjective", "BertObjective", "GPTObjective", "PrefixLMObjective", "T5Objective", "make_objective",
    "GLM_PRESETS", "BASELINES", "OBJECTIVE_NAMES",
    "TokenSpanSampler", "truncated_poisson_pmf", "draw_span_lengths", "split_documents", "sample_spans",
    "place_spans", "sentence_spans", "choose_sentences", "draw_gmask_bound",
]
