"""The course model: bundling a run (weights only, manifest with SHA-256s and the fill table), loading it by
name with the same checks as any run, and the preset that trains it (no bundle is committed yet)."""

import json

import numpy as np
import pytest

from minglm import course, runs
from minglm.checkpoint import CheckpointError
from minglm.model import GLM, GLMConfig
from minglm.tokenizer import CharTokenizer

TOK = CharTokenizer.from_texts(["abcdefghijklmnopqrstuvwxyz .,!"])


@pytest.fixture
def run_dir(tmp_path):
    model = GLM(GLMConfig(vocab_size=TOK.vocab_size, n_layer=1, n_head=2, d_model=16, max_len=32),
                np.random.default_rng(0))
    runs.save_run(model, TOK, tmp_path / "run", step=7)
    return tmp_path / "run", model


def test_bundle_round_trip_and_tamper_detection(run_dir, tmp_path):
    src, model = run_dir
    manifest = course.make_bundle(src, tmp_path / "bundle", "python -m minglm train --config tiny",
                                  {"rank": 1})
    assert manifest["command"] == "python -m minglm train --config tiny" and manifest["fill_eval"] == {"rank": 1}
    assert set(manifest["files"]) == {"config.json", "tokenizer.json", "ckpt/step_7.npz", "ckpt/step_7.json"}
    assert course.verify_bundle(tmp_path / "bundle")["files"] == manifest["files"]
    named = course.make_bundle(src, tmp_path / "bundle2", "python -m minglm train", commit="0123abc")
    assert named["git_commit"] == "0123abc"  # a run trained outside this checkout names its own commit
    loaded, tok = runs.load_run(tmp_path / "bundle")
    for (name, a), (_, b) in zip(sorted(model.state_dict().items()), sorted(loaded.state_dict().items())):
        np.testing.assert_array_equal(a, b, err_msg=name)
    # a changed file is caught by the manifest, and by load_run's own checks
    cfg = tmp_path / "bundle" / "config.json"
    record = json.loads(cfg.read_text())
    record["model"]["n_head"] = 4
    cfg.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="SHA-256"):
        course.verify_bundle(tmp_path / "bundle")
    with pytest.raises(CheckpointError, match="n_head"):
        runs.load_run(tmp_path / "bundle")


def test_the_name_course_is_a_bundled_run_with_a_clear_error_while_missing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no folder called "course" here
    monkeypatch.setitem(runs.BUNDLED_RUNS, "course", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="bundled 'course' model is missing"):
        runs.resolve_run("course")


def test_course_preset_fits_the_size_budget():
    from minglm.config import TRAIN_PRESETS

    train = TRAIN_PRESETS["course"]
    cfg = GLMConfig.preset("course", vocab_size=train["bpe_vocab"], max_len=train["seq_len"] + 1)
    model = GLM(cfg, np.random.default_rng(0))
    assert model.num_parameters() * 4 < 15_000_000  # float32 weights under 15 MB, the bundle's budget
    assert train["tokenizer"] == "word" and train["span_unit"] == "known_word" and train["time_limit"] <= 3300
