"""WordTokenizer: whole words with a byte fallback (minglm/tokenizer.py)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minglm.tokenizer import N_SPECIAL, SPECIAL_TOKENS, WordTokenizer, load_tokenizer

TEXT = "the king and the queen; the king is dead. Long live the king!\nThe queen weeps."


def test_train_keeps_the_most_frequent_pieces_and_falls_back_to_bytes():
    tok = WordTokenizer.train([TEXT], vocab_size=N_SPECIAL + 256 + 3)
    assert tok.pieces == [" king", " the", " queen"]  # the pieces of two or more bytes seen most often (2+ times)
    ids = tok.encode("the king weeps")
    assert tok.decode([ids[3]]) == " king" and len(ids) == 3 + 1 + len(" weeps")  # "the", " weeps": bytes
    assert ids[0] == N_SPECIAL + ord("t") and tok.decode(ids) == "the king weeps"
    assert tok.count_unknown("€ and 漢") == 0


def test_specials_typed_in_text_and_save_load(tmp_path):
    tok = WordTokenizer.train([TEXT], vocab_size=300)
    ids = tok.encode("the [MASK] is dead[gMASK]")
    assert tok.mask_id in ids and ids[-1] == tok.gmask_id
    tok.save(tmp_path / "t.json")
    back = load_tokenizer(tmp_path / "t.json")
    assert isinstance(back, WordTokenizer) and back.pieces == tok.pieces and back.encode(TEXT) == tok.encode(TEXT)
    (tmp_path / "bad.json").write_text('{"type": "word", "special_tokens": [], "pieces": []}')
    with pytest.raises(ValueError, match="not a minglm word tokenizer"):
        WordTokenizer.load(tmp_path / "bad.json")
    assert SPECIAL_TOKENS[0] == "[PAD]"


def test_bad_vocabularies_are_refused():
    with pytest.raises(ValueError, match="vocab_size must be"):
        WordTokenizer.train([TEXT], vocab_size=100)
    with pytest.raises(ValueError, match="distinct"):
        WordTokenizer([" the", " the"])


@settings(max_examples=50, deadline=None)
@given(st.text(max_size=60))
def test_round_trip_property(text):
    tok = WordTokenizer.train([TEXT], vocab_size=300)
    if any(m in text for m in ("[MASK]", "[sMASK]", "[gMASK]")):
        return
    assert tok.decode(tok.encode(text)) == text
