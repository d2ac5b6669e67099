"""The loader: framing (docs/official-code.md §1), epochs, resumable state, determinism, every objective's Batch."""

import json

import numpy as np
import pytest

from minglm.data import (
    OBJECTIVE_NAMES,
    Batch,
    BlockLoader,
    dense_mask,
    frame_documents,
    iter_eval_batches,
    make_objective,
    make_windows,
)
from minglm.data.loader import MIN_LINE_WINDOW, cut_to_lines
from minglm.data.samplers import sentence_end_table
from minglm.tokenizer import CLS_ID, EOS_ID, MASK_ID, N_SPECIAL, SMASK_ID, BPETokenizer, CharTokenizer

ALPHABET = "abcdefghijklmnopqrstuvwxyz .,;!?\n"


def make_docs(n_docs=12, seed=0):
    rng = np.random.default_rng(seed)
    texts = ["".join(rng.choice(list(ALPHABET), size=int(rng.integers(150, 900)))) for _ in range(n_docs)]
    tok = CharTokenizer.from_texts([ALPHABET])
    return tok, [tok.encode_array(t) for t in texts]


def assert_batches_equal(a: Batch, b: Batch):
    assert a.objective == b.objective
    for k, v in a.to_dict().items():
        np.testing.assert_array_equal(v, b.to_dict()[k], err_msg=k)


def test_framing_and_windows():
    stream = frame_documents([np.array([10, 11]), np.array([12])])
    np.testing.assert_array_equal(stream, [CLS_ID, 10, 11, EOS_ID, CLS_ID, 12, EOS_ID])
    # every window starts with [CLS]: a document's own, or one put in front of a mid-document piece
    stream = frame_documents([np.arange(10, 17), np.arange(20, 22)])  # C 10..16 E C 20 21 E
    w = make_windows(stream, 4)
    np.testing.assert_array_equal(w, [[CLS_ID, 10, 11, 12], [CLS_ID, 13, 14, 15], [CLS_ID, 16, EOS_ID, CLS_ID],
                                      [CLS_ID, 20, 21, EOS_ID]])
    # no stream token is lost or repeated: drop the inserted [CLS] tokens and the windows give the stream back
    inserted = [False, True, True, True]  # the last one follows the [CLS] that ended the window before it
    rebuilt = np.concatenate([row[1:] if ins else row for row, ins in zip(w, inserted)])
    np.testing.assert_array_equal(rebuilt, stream)
    assert make_windows(np.arange(3), 8).shape == (1, 3)  # a corpus shorter than one window
    with pytest.raises(ValueError, match="no documents"):
        frame_documents([])


def test_sentence_windows_start_at_a_sentence_and_skip_nothing():
    # the official BlockDataset moves each cut to a sentence start; make_windows(is_end=...) starts every window
    # at one: right after a token that ends a sentence, or at a document's [CLS]
    tok, _ = make_docs()
    rng = np.random.default_rng(3)
    def lines():
        return "\n".join("".join(rng.choice(list("abc def"), size=int(rng.integers(5, 20)))) for _ in range(40))
    docs = [tok.encode_array(lines()) for _ in range(6)]  # sentences (lines) of 5-20 characters
    stream = frame_documents(docs)
    is_end = sentence_end_table(tok)
    w = make_windows(stream, 48, is_end=is_end)
    # find each window's piece in the stream: a window is [CLS] + stream[a : a + 47] (or stream[a : a + 48] at a
    # document's own [CLS]); its start a must be a sentence start, and consecutive pieces leave no gap
    starts, ends, pos = [], [], 0
    for row in w:
        for a in range(pos, len(stream)):
            body = row if stream[a] == CLS_ID else row[1:]
            if np.array_equal(stream[a: a + len(body)], body):
                break
        else:
            raise AssertionError("a window is not a piece of the stream")
        starts.append(a)
        ends.append(a + len(body))
        pos = a + 1
    for a in starts:
        assert stream[a] == CLS_ID or is_end[stream[a - 1]], f"window at {a} starts mid-sentence"
    assert all(b <= e for b, e in zip(starts[1:], ends[:-1])), "a stretch of text fell between two windows"
    assert len(w) >= len(make_windows(stream, 48))  # the overlap costs a few windows more, never fewer
    with pytest.raises(ValueError, match="window_start"):
        BlockLoader(docs, tok, 48, 4, window_start="paragraph")


def test_batch_contract_fields_and_dtypes():
    tok, docs = make_docs()
    loader = BlockLoader(docs, tok, seq_len=128, batch_size=4)
    b = loader.next_batch(np.random.default_rng(0))
    B, T = b.tokens.shape
    assert B == 4 and b.objective == "token"
    for name in ("tokens", "targets", "position_ids", "block_position_ids", "sep", "lengths"):
        assert getattr(b, name).dtype == np.int64, name
    assert b.loss_mask.dtype == np.float32 and b.sep.shape == (4,) and b.lengths.shape == (4,)
    assert T == b.lengths.max()
    assert np.all(b.position_ids < 128) and np.all(b.block_position_ids <= 128)


def test_epoch_visits_every_window_once():
    tok, docs = make_docs()
    loader = BlockLoader(docs, tok, seq_len=64, batch_size=5, objective="gpt")
    rng = np.random.default_rng(0)
    n = len(loader)
    seen = []
    while loader.epoch == 0:
        b = loader.next_batch(rng)
        seen += [tuple(r) for r in np.concatenate([b.tokens[:, :1], b.targets], axis=1)[:, :64].tolist()]
    first_epoch = seen[:n]
    windows = {tuple(w) for w in loader.windows.tolist()}
    assert len(set(first_epoch)) == n == len(windows)


def test_same_seed_same_batches_and_exact_resume():
    tok, docs = make_docs()
    a = BlockLoader(docs, tok, seq_len=96, batch_size=3, objective="glm-10b")
    rng_a = np.random.default_rng(7)
    for _ in range(5):
        a.next_batch(rng_a)
    state = json.loads(json.dumps(a.state_dict()))  # must survive JSON
    rng_state = rng_a.bit_generator.state
    expected = [a.next_batch(rng_a) for _ in range(8)]  # crosses an epoch boundary
    b = BlockLoader(docs, tok, seq_len=96, batch_size=3, objective="glm-10b")
    b.load_state_dict(state)
    rng_b = np.random.default_rng()
    rng_b.bit_generator.state = rng_state
    for e in expected:
        assert_batches_equal(e, b.next_batch(rng_b))
    assert a.epoch == b.epoch and a.state_dict() == b.state_dict()
    c = BlockLoader(docs, tok, seq_len=50, batch_size=3)
    with pytest.raises(ValueError, match="windows"):
        c.load_state_dict(state)


def test_cut_to_lines_keeps_whole_lines_and_closes_them():
    tok, _ = make_docs()
    nl = sentence_end_table(tok, "\n")
    ids = tok.encode_array("ab\ncdefgh\nij kl\nmn")  # breaks at 2, 9, 15 of the text
    window = np.concatenate([[CLS_ID], ids])  # ... so at 3, 10 and 16 of the window
    seen = set()
    for seed in range(40):
        cut = cut_to_lines(window, nl, np.random.default_rng(seed))
        assert cut[-1] == EOS_ID and len(cut) - 1 in (10, 16)  # a break at >= MIN_LINE_WINDOW, never the one at 3
        np.testing.assert_array_equal(cut[:-1], window[: len(cut) - 1])  # the lines before it, unchanged
        seen.add(len(cut) - 1)
    assert seen == {10, 16} and MIN_LINE_WINDOW == 6
    no_break = np.concatenate([[CLS_ID], tok.encode_array("abcdefghij")])
    np.testing.assert_array_equal(cut_to_lines(no_break, nl, np.random.default_rng(0)), no_break)


def test_line_windows_cut_a_share_of_the_batch_and_resume_exactly():
    tok, _ = make_docs()
    rng = np.random.default_rng(0)  # documents of short lines: every window holds line breaks past its start
    docs = [tok.encode_array("\n".join("".join(rng.choice(list("abcdefgh ,."), size=int(rng.integers(8, 20))))
                                       for _ in range(30))) for _ in range(6)]
    whole = BlockLoader(docs, tok, seq_len=64, batch_size=8)
    b0 = whole.next_batch(np.random.default_rng(3))
    cut = BlockLoader(docs, tok, seq_len=64, batch_size=8, line_windows=1.0)
    b1 = cut.next_batch(np.random.default_rng(3))
    for r in range(8):  # each Part A ends with <eos> after whole lines
        assert b1.tokens[r, b1.sep[r] - 1] == EOS_ID
    assert b1.lengths.mean() < b0.lengths.mean() - 10  # the lines are much shorter than the windows
    a = BlockLoader(docs, tok, seq_len=64, batch_size=8, line_windows=0.5)
    rng = np.random.default_rng(5)
    a.next_batch(rng)
    state, rng_state = a.state_dict(), rng.bit_generator.state
    expected = [a.next_batch(rng) for _ in range(3)]
    b = BlockLoader(docs, tok, seq_len=64, batch_size=8, line_windows=0.5)
    b.load_state_dict(state)
    rng_b = np.random.default_rng()
    rng_b.bit_generator.state = rng_state
    for e in expected:
        assert_batches_equal(e, b.next_batch(rng_b))
    with pytest.raises(ValueError, match="line_windows"):
        BlockLoader(docs, tok, seq_len=64, batch_size=8, line_windows=1.5)


def test_eval_batches_are_deterministic():
    tok, docs = make_docs()
    one = list(iter_eval_batches(docs, tok, 80, 4, objective="glm-10b", max_batches=3))
    two = list(iter_eval_batches(docs, tok, 80, 4, objective="glm-10b", max_batches=3))
    assert len(one) == 3
    for x, y in zip(one, two):
        assert_batches_equal(x, y)
    only_doc = list(iter_eval_batches(docs, tok, 80, 4, objective="glm-10b", mode="document", max_batches=2))
    assert {b.objective for b in only_doc} == {"document"}


@pytest.mark.parametrize("name", OBJECTIVE_NAMES)
def test_every_objective_gives_a_valid_batch(name):
    tok, docs = make_docs()
    loader = BlockLoader(docs, tok, seq_len=128, batch_size=4, objective=name)
    rng = np.random.default_rng(1)
    for _ in range(6):
        b = loader.next_batch(rng)
        B, T = b.tokens.shape
        assert b.loss_mask.sum() > 0
        real = np.arange(T)[None, :] < b.lengths[:, None]
        assert np.all(b.loss_mask[~real] == 0) and np.all(b.tokens[~real] == 0)
        assert np.all(b.sep <= b.lengths) and np.all(b.tokens < tok.vocab_size) and np.all(b.targets < tok.vocab_size)
        m = dense_mask(b)
        for r in range(B):  # Part A sees exactly Part A; a later query never sees a later key (no target leaks)
            sep = int(b.sep[r])
            assert np.all(m[r, :sep, :sep]) and not np.any(m[r, :sep, sep:])
            assert not np.any(np.triu(m[r], 1)[sep:])
        if name in ("gpt", "prefix") or name.startswith("glm") and b.objective != "bert":
            # targets are shifted: the input right after a loss position is never visible from it
            rows, cols = np.nonzero(b.loss_mask)
            nxt = np.minimum(cols + 1, T - 1)
            assert not np.any(m[rows, cols, nxt] & (nxt > cols))


def test_bert_objective():
    tok, docs = make_docs()
    obj = make_objective("bert", tok)
    w = np.concatenate([[CLS_ID], docs[0][:500], [EOS_ID]])
    b = obj.make_batch([w], np.random.default_rng(0))
    cand = int((w >= N_SPECIAL).sum())
    assert b.loss_mask.sum() == round(0.15 * cand)
    assert b.sep[0] == len(w)
    np.testing.assert_array_equal(b.targets[0], w)  # targets = original tokens (loss only where chosen)
    chosen = b.loss_mask[0] > 0
    changed = b.tokens[0] != w
    assert not np.any(changed & ~chosen)  # only chosen positions change
    assert (b.tokens[0][chosen] == MASK_ID).mean() > 0.6
    assert b.tokens[0][0] == CLS_ID and b.tokens[0][-1] == EOS_ID


def test_gpt_and_prefix_objectives():
    tok, docs = make_docs()
    w = np.concatenate([[CLS_ID], docs[0][:100]])
    g = make_objective("gpt", tok).make_batch([w], np.random.default_rng(0))
    np.testing.assert_array_equal(g.tokens[0], w[:-1])
    np.testing.assert_array_equal(g.targets[0], w[1:])
    assert g.sep[0] == 0 and g.loss_mask.sum() == len(w) - 1
    p = make_objective("prefix", tok).make_batch([w], np.random.default_rng(0))
    sep = int(p.sep[0])
    assert 1 <= sep <= len(w) - 2
    assert p.loss_mask.sum() == len(w) - sep  # loss on the rest, starting at the last prefix token
    assert p.loss_mask[0, sep - 1] == 1 and p.loss_mask[0, : sep - 1].sum() == 0


def test_t5_objective():
    tok, docs = make_docs()
    w = np.concatenate([[CLS_ID], docs[0][:300], [EOS_ID]])
    obj = make_objective("t5", tok)
    b = obj.make_batch([w], np.random.default_rng(0))
    r = b.row(0)
    sep = r.sep
    n_blanks = int((r.tokens[:sep] == MASK_ID).sum())
    assert r.tokens[sep] == tok.sop_id and (r.tokens[sep + 1 :] == tok.sop_id).sum() == 0
    assert (r.tokens[sep:] == MASK_ID).sum() == n_blanks - 1  # one sentinel between consecutive spans
    assert r.targets[-1] == tok.eop_id and (r.targets[sep:] == tok.eop_id).sum() == 1
    np.testing.assert_array_equal(r.position_ids[sep:], 0)
    np.testing.assert_array_equal(r.block_position_ids[sep:], np.arange(1, len(r.tokens) - sep + 1))
    # Part B targets, with the sentinels as separators, are the spans in text order
    pieces, cur = [], []
    for t in r.targets[sep:-1].tolist():
        if t == MASK_ID:
            pieces.append(cur)
            cur = []
        else:
            cur.append(t)
    pieces.append(cur)
    assert len(pieces) == n_blanks
    rebuilt, k = [], 0
    for t in r.tokens[:sep].tolist():
        if t == MASK_ID:
            rebuilt += pieces[k]
            k += 1
        else:
            rebuilt.append(t)
    assert rebuilt == w.tolist()


def test_objective_switches_and_errors():
    tok, docs = make_docs()
    with pytest.raises(ValueError, match="unknown objective"):
        make_objective("xlnet", tok)
    with pytest.raises(ValueError, match="unknown GLMObjective fields"):
        make_objective("glm-base", tok, shufle=False)
    with pytest.raises(ValueError, match="takes no fields"):
        make_objective("gpt", tok, shuffle=False)
    assert make_objective("bert", tok, mask_ratio=0.3).mask_ratio == 0.3
    loader = BlockLoader(docs, tok, 128, 2, objective="glm-base", shuffle=False, block_position=False)
    b = loader.next_batch(np.random.default_rng(0))
    for i in range(2):
        r = b.row(i)
        assert np.all(r.block_position_ids[r.sep :] == 1)
        pos = r.position_ids[r.sep :][r.tokens[r.sep :] == tok.sop_id]
        assert np.all(np.diff(pos) > 0)  # text order when not shuffled


def test_loader_with_bpe_tokenizer():
    rng = np.random.default_rng(0)
    words = ["the ", "king ", "queen. ", "sweet ", "love!\n", "night; "]
    texts = ["".join(rng.choice(words, size=300)) for _ in range(6)]
    bpe = BPETokenizer.train(texts, vocab_size=300)
    docs = [bpe.encode_array(t) for t in texts]
    loader = BlockLoader(docs, bpe, seq_len=128, batch_size=4, objective="glm-10b")
    for mode in ("token", "sentence", "document"):
        b = loader.next_batch(rng, mode=mode)
        assert b.objective == mode and b.loss_mask.sum() > 0 and b.tokens.max() < bpe.vocab_size
    assert SMASK_ID in loader.next_batch(rng, mode="sentence").tokens
