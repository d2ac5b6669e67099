"""Settings are explicit: the attention path is a field of the model config, passed down to every attention call;
the environment (MINGLM_ATTENTION) only gives the train command its default, once, and lands in the run's config."""

from __future__ import annotations

import json

import numpy as np
import pytest

import minglm.functional as F
from minglm.commands.train import main as train_main
from minglm.model import GLM, GLMConfig


def test_the_config_field_is_validated_and_omitted_at_its_default():
    with pytest.raises(ValueError, match="GLMConfig.attention must be one of auto, plain, flash"):
        GLMConfig(attention="fastest")
    assert "attention" not in GLMConfig().to_dict()  # old checkpoints and configs read as before
    assert GLMConfig.from_dict(GLMConfig(attention="plain").to_dict()).attention == "plain"


def test_every_layer_passes_the_configured_path_down(monkeypatch):
    seen = []
    real = F.scaled_dot_product_attention

    def spy(*args, impl="auto", **kwargs):
        seen.append(impl)
        return real(*args, impl=impl, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = GLM(GLMConfig(vocab_size=16, n_layer=2, n_head=2, d_model=8, max_len=8, attention="plain"),
                np.random.default_rng(0))
    monkeypatch.setenv("MINGLM_ATTENTION", "flash")  # read by nothing here
    model(np.zeros((1, 4), np.int64), np.arange(4)[None], np.zeros((1, 4), np.int64), [2])
    assert seen == ["plain", "plain"]


def test_the_environment_sets_the_train_commands_default_once(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("to be or not to be, that is the question.\n" * 40)
    (tmp_path / "b.txt").write_text("now is the winter of our discontent.\n" * 40)
    args = ["--corpus", str(tmp_path), "--out", str(tmp_path / "runs"), "--steps", "1", "--quiet",
            "--set", "model.n_layer=1", "--set", "model.d_model=16", "--set", "model.n_head=2", "--set", "seq_len=16",
            "--set", "batch_size=2", "--set", "eval_batches=1", "--set", "fill_lines=0", "--set", "plots=false"]
    monkeypatch.setenv("MINGLM_ATTENTION", "plain")
    assert train_main([*args, "--name", "from-env"]) == 0
    assert json.loads((tmp_path / "runs" / "from-env" / "config.json").read_text())["model"]["attention"] == "plain"
    assert train_main([*args, "--name", "explicit", "--set", "model.attention=flash"]) == 0  # --set wins
    assert json.loads((tmp_path / "runs" / "explicit" / "config.json").read_text())["model"]["attention"] == "flash"
