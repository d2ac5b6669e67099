"""Loading a run folder (minglm/runs.py): the checkpoint is the truth, and a run folder that disagrees is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from minglm.checkpoint import CheckpointError, save_checkpoint
from minglm.model import GLM, GLMConfig
from minglm.runs import load_run, newest_run, resolve_run, save_run
from minglm.tokenizer import CharTokenizer

TOK = CharTokenizer.from_texts(["abcdefghijklmnopqrstuvwxyz .,!"])


def small_model(seed: int = 0) -> GLM:
    return GLM(GLMConfig(vocab_size=TOK.vocab_size, n_layer=1, n_head=4, d_model=32, max_len=32),
               np.random.default_rng(seed))


def test_save_and_load_round_trip(tmp_path):
    model = small_model(1)
    record = save_run(model, TOK, tmp_path / "run", step=7)
    assert record == tmp_path / "run" / "ckpt" / "step_7.json"
    for path in (tmp_path / "run", record, record.with_suffix(".npz")):
        loaded, tok = load_run(path)
        assert tok.vocab_size == TOK.vocab_size and loaded.config == model.config and not loaded.training
        for (k, a), (k2, b) in zip(model.named_parameters(), loaded.named_parameters()):
            assert k == k2 and np.array_equal(a.data, b.data)


def test_the_newest_checkpoint_that_verifies_is_loaded(tmp_path):
    run = tmp_path / "run"
    save_run(small_model(1), TOK, run, step=5)
    newer = small_model(2)
    arrays = {f"model/{k}": v for k, v in newer.state_dict().items()}
    save_checkpoint(run / "ckpt", 9, arrays, json.loads((run / "ckpt" / "step_5.json").read_text())["meta"])
    assert resolve_run(run) == (run, run / "ckpt" / "step_9.json")
    loaded, _ = load_run(run)
    np.testing.assert_array_equal(loaded.word_embeddings.weight.data, newer.word_embeddings.weight.data)
    (run / "ckpt" / "step_9.npz").write_bytes(b"torn")  # the newest is corrupt: the one before it is used
    assert resolve_run(run)[1].name == "step_5.json"


def test_an_edited_config_is_refused_in_one_line(tmp_path):
    """n_head 4 -> 8 would split the same weights into other heads and change every logit without an error."""
    run = tmp_path / "run"
    save_run(small_model(), TOK, run)
    saved = json.loads((run / "config.json").read_text())
    saved["model"]["n_head"] = 8
    (run / "config.json").write_text(json.dumps(saved))
    with pytest.raises(CheckpointError) as err:
        load_run(run)
    message = str(err.value)
    assert "\n" not in message and "n_head=8 (checkpoint: 4)" in message and "config.json" in message


def test_another_vocabulary_is_refused(tmp_path):
    run = tmp_path / "run"
    save_run(small_model(), TOK, run)
    CharTokenizer.from_texts(["abcdefghijklmnopqrstuvwxyz .,?"]).save(run / "tokenizer.json")  # "!" became "?"
    with pytest.raises(CheckpointError, match="tokenizer.json is not the vocabulary"):
        load_run(run)


def test_a_checkpoint_without_its_record_of_the_model_is_refused(tmp_path):
    run = tmp_path / "run"
    save_run(small_model(), TOK, run)
    arrays = {f"model/{k}": v for k, v in small_model().state_dict().items()}
    save_checkpoint(run / "ckpt", 3, arrays, meta={})
    with pytest.raises(CheckpointError, match="does not record its model_config"):
        load_run(run / "ckpt" / "step_3.npz")


def test_paths_that_are_not_runs(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such run folder or checkpoint"):
        load_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        load_run(tmp_path / "empty")
    (tmp_path / "empty" / "ckpt").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint that verifies"):
        load_run(tmp_path / "empty")


def test_newest_run(tmp_path):
    assert newest_run(tmp_path / "missing") is None
    save_run(small_model(), TOK, tmp_path / "a", step=1)
    save_run(small_model(), TOK, tmp_path / "b", step=1)
    (tmp_path / "not-a-run").mkdir()
    assert newest_run(tmp_path) == tmp_path / "b"
