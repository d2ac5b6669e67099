"""Tokenizer tests: fixed special ids, round trips (Unicode included), unknown characters, BPE, save/load."""

import json
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minglm.tokenizer import (
    SPECIAL_TOKENS,
    BPETokenizer,
    CharTokenizer,
    load_tokenizer,
)

unicode_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=200)


def test_special_ids_are_fixed():
    tok = CharTokenizer.from_texts(["hello world"])
    assert SPECIAL_TOKENS == ["[PAD]", "[CLS]", "[MASK]", "[sMASK]", "[gMASK]", "<sop>", "<eop>", "[UNK]"]
    assert (tok.pad_id, tok.eos_id, tok.cls_id, tok.mask_id, tok.smask_id, tok.gmask_id, tok.sop_id, tok.eop_id,
            tok.unk_id) == (0, 0, 1, 2, 3, 4, 5, 6, 7)
    assert tok.vocab_size == 8 + len(set("hello world"))
    assert tok.encode(" dehlorw") == list(range(8, 16))  # characters sorted, from 8


def test_char_round_trip_with_chinese_and_specials():
    text = "床前明月光，疑是地上霜。\nTo be, or not to be"
    tok = CharTokenizer.from_texts([text])
    assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("床前[MASK]光[sMASK][gMASK]")
    assert ids[2] == tok.mask_id and ids[4:] == [tok.smask_id, tok.gmask_id]
    assert tok.decode(ids) == "床前[MASK]光[sMASK][gMASK]"
    assert tok.decode(ids, skip_special=True) == "床前光"


def test_unknown_characters_are_counted():
    tok = CharTokenizer.from_texts(["abc"])
    ids = tok.encode("abxc😀")
    assert ids == [8, 9, tok.unk_id, 10, tok.unk_id]
    assert tok.last_unknown == 2 and tok.count_unknown("xyz a") == 4
    assert tok.encode("") == [] and tok.last_unknown == 0
    with pytest.raises(ValueError, match="ids must be in"):
        tok.decode([999])
    with pytest.raises(ValueError, match="str"):
        tok.encode(b"bytes")


@settings(max_examples=100, deadline=None)
@given(text=unicode_text)
def test_char_round_trip_property(text):
    tok = CharTokenizer.from_texts([text])
    assert tok.decode(tok.encode(text)) == text
    assert tok.last_unknown == 0


def test_char_save_load(tmp_path):
    tok = CharTokenizer.from_texts(["héllo 世界\n"])
    tok.save(tmp_path / "tok.json")
    back = CharTokenizer.load(tmp_path / "tok.json")
    assert back.id_to_token == tok.id_to_token
    assert isinstance(load_tokenizer(tmp_path / "tok.json"), CharTokenizer)
    (tmp_path / "bad.json").write_text(json.dumps({"type": "char", "special_tokens": ["x"], "chars": []}))
    with pytest.raises(ValueError, match="not a minglm"):
        CharTokenizer.load(tmp_path / "bad.json")


def test_char_encode_is_fast():
    text = "The quick brown fox jumps over the lazy dog.\n" * 20000  # 900 k chars
    tok = CharTokenizer.from_texts([text])
    t = time.process_time()
    ids = tok.encode_array(text)
    assert time.process_time() - t < 0.5
    assert ids.dtype == np.int32 and len(ids) == len(text)


def _english(n_words, seed=0):
    rng = np.random.default_rng(seed)
    words = ["the", "king", "queen", "thee", "thou", "art", "love", "lord", "sweet", "night", "death", "hath",
             "shall", "what", "mine", "eyes", "heart", "good", "honour", "fair", "speak", "come", "away"]
    seps = [" ", " ", " ", ", ", ".\n", "; ", "! "]
    out = []
    for w, s in zip(rng.choice(words, n_words), rng.choice(seps, n_words)):
        out.append(w + s)
    return "".join(out)


def test_bpe_train_encode_decode_save_load(tmp_path):
    text = _english(5000)
    bpe = BPETokenizer.train(text, vocab_size=400)
    assert 264 < bpe.vocab_size <= 400
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert len(ids) < len(text.encode()) / 2.5  # merges compress the repetitive text a lot
    assert bpe.encode("the king[MASK]")[-1] == bpe.mask_id
    s = "über 世界 😀 tab\tnul\x00end  _under_score_ 42"
    assert bpe.decode(bpe.encode(s)) == s  # unseen bytes still round-trip
    bpe.save(tmp_path / "bpe.json")
    back = load_tokenizer(tmp_path / "bpe.json")
    assert isinstance(back, BPETokenizer) and back.merges == bpe.merges
    assert back.encode(text[:500]) == bpe.encode(text[:500])


def test_bpe_matches_a_plain_reference_encoder():
    text = _english(800, seed=1) + "aaaa aaaaa abab ababab"
    bpe = BPETokenizer.train(text, vocab_size=330, min_frequency=1)

    def reference(word):  # textbook BPE: repeatedly merge the lowest-rank pair present
        ids = [b + 8 for b in word.encode()]
        ranks = {m: r for r, m in enumerate(bpe.merges)}
        while True:
            pairs = [(ranks.get((a, b), 10**9), i) for i, (a, b) in enumerate(zip(ids, ids[1:]))]
            if not pairs or min(pairs)[0] == 10**9:
                return ids
            r, i = min(pairs)
            ids = ids[:i] + [264 + r] + ids[i + 2 :]

    from minglm.tokenizer import _PRETOKEN_RE

    words = _PRETOKEN_RE.findall(text)
    assert "".join(words) == text
    assert bpe.encode(text) == [t for w in words for t in reference(w)]


@settings(max_examples=50, deadline=None)
@given(text=unicode_text)
def test_bpe_round_trip_property(text):
    bpe = BPETokenizer.train(_english(200) + text, vocab_size=300, min_frequency=1)
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_training_speed_1mb():
    text = _english(180_000)[:1_000_000]
    t = time.process_time()
    bpe = BPETokenizer.train(text, vocab_size=1000, min_frequency=1)
    assert time.process_time() - t < 6.0  # CPU seconds; target 3 s on one core, slack for a slow CI machine
    assert bpe.decode(bpe.encode(text[:20000])) == text[:20000]


def test_merge_pair_is_one_bpe_merge_left_to_right():
    from minglm.tokenizer import merge_pair

    assert merge_pair([1, 2, 1, 2, 3], (1, 2), 9) == [9, 9, 3]
    assert merge_pair([5, 5, 5], (5, 5), 7) == [7, 5]  # non-overlapping, from the left
    assert merge_pair([4], (4, 4), 1) == [4]
