"""Parity with SwissArmyTransformer's GLM (a faithful stand-in for the official code, docs/parity.md), and the
name mappings of minglm/interop.py. The fixture was made by tests/fixtures/make_sat_fixture.py; only NumPy is needed."""

import json
from pathlib import Path

import numpy as np
import pytest

import minglm.functional as F
from minglm import interop, no_grad
from minglm.model import GLM, GLMConfig, KVCache

FIXTURE = Path(__file__).parent / "fixtures" / "glm_sat_parity.npz"


@pytest.fixture(scope="module")
def fixture():
    with np.load(FIXTURE, allow_pickle=False) as f:
        data = {k: f[k] for k in f.files}
    data["config"] = GLMConfig.from_dict(json.loads(str(data.pop("config_json"))))
    return data


def weights(data, prefix):
    return {k[len(prefix) + 1:]: v for k, v in data.items() if k.startswith(prefix + ":")}


def batch(data, name):
    return [data[f"{name}_{k}"] for k in ("tokens", "position_ids", "block_position_ids", "sep")]


def model_with(data, prefix):
    model = GLM(data["config"], np.random.default_rng(0))
    interop.load_state_dict(model, weights(data, prefix))  # official layout, strict
    return model


@pytest.mark.parametrize("case", ["fig2", "pad"])
def test_logits_match_sat(fixture, case):
    model = model_with(fixture, "sat")
    logits = model(*batch(fixture, case))
    assert logits.dtype == np.float32
    assert np.abs(logits.numpy() - fixture[f"{case}_logits"]).max() <= 1e-5


def test_cached_decoding_matches_sat(fixture):
    """Part A once with sep = 5, then Part B one token at a time with sep = 0 through the KV cache
    (docs/decoding.md)."""
    model = model_with(fixture, "sat")
    tokens, pos, block, _ = batch(fixture, "fig2")
    cache = KVCache(model, 1, 16)
    with no_grad():
        parts = [model(tokens[:, :5], pos[:, :5], block[:, :5], [5], cache=cache).numpy()]
        for t in range(5, 10):
            parts.append(model(tokens[:, t:t + 1], pos[:, t:t + 1], block[:, t:t + 1], [0], cache=cache).numpy())
    assert np.abs(np.concatenate(parts, axis=1) - fixture["fig2_logits"]).max() <= 1e-5


def test_loss_and_gradients_match_sat(fixture):
    model = model_with(fixture, "sat")
    logits = model(*batch(fixture, "pad"))
    loss = F.cross_entropy(logits, fixture["pad_targets"], fixture["pad_loss_mask"])
    assert abs(loss.item() - float(fixture["pad_loss"])) <= 1e-5
    loss.backward()
    grads = interop.convert_names({n: p.grad for n, p in model.named_parameters()}, "minglm", "official")
    expected = weights(fixture, "satgrad")
    assert grads.keys() == expected.keys()
    for name, g in grads.items():
        assert np.abs(g - expected[name]).max() <= 1e-5, name


@pytest.mark.parametrize("case", ["fig2", "pad"])
def test_minglm_init_exported_to_sat(fixture, case):
    """A minglm-initialised model, exported in the official layout and loaded by SAT (strict), gives our logits."""
    model = model_with(fixture, "minglm")
    assert np.abs(model(*batch(fixture, case)).numpy() - fixture[f"rev_{case}_logits"]).max() <= 1e-5


def test_name_round_trips(fixture):
    model = GLM(fixture["config"], np.random.default_rng(1))
    ours = model.state_dict()
    official = interop.export_state_dict(model, "official")
    assert set(official) == set(weights(fixture, "sat"))  # exactly the official names, no more, no less
    assert "word_embeddings.weight" in official
    assert "transformer.block_position_embeddings.weight" in official
    assert "transformer.layers.1.mlp.dense_4h_to_h.bias" in official
    sat = interop.convert_names(official, "official", "sat")
    assert "transformer.word_embeddings.weight" in sat
    assert "mixins.block_position_embedding.block_position_embeddings.weight" in sat
    for src in ("official", "sat"):
        layout_sd = official if src == "official" else sat
        assert interop.detect_layout(layout_sd) == src
        back = interop.convert_names(layout_sd, src, "minglm")
        assert back.keys() == ours.keys()
        assert all(np.array_equal(back[k], ours[k]) for k in ours)
    assert interop.detect_layout(ours) == "minglm"


def test_save_and_load_npz(tmp_path, fixture):
    cfg = fixture["config"]
    a, b = GLM(cfg, np.random.default_rng(1)), GLM(cfg, np.random.default_rng(2))
    for layout in ("official", "sat", "minglm"):
        path = interop.save(a, tmp_path / f"w_{layout}.npz", layout=layout)
        b.load_state_dict(GLM(cfg, np.random.default_rng(3)).state_dict())
        interop.load(b, path)
        assert all(np.array_equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    guessed = interop.config_from_state_dict(interop.load_npz(tmp_path / "w_sat.npz"), n_head=cfg.n_head)
    assert guessed == cfg


def test_errors_name_the_key(fixture):
    official = weights(fixture, "sat")
    with pytest.raises(KeyError, match="transformer.bogus"):
        interop.convert_names({"transformer.bogus": np.zeros(1)}, "official", "minglm")
    with pytest.raises(ValueError, match="layout"):
        interop.convert_names(official, "official", "hf")
    small = GLM(GLMConfig(vocab_size=32, n_layer=2, n_head=4, d_model=16, max_len=8), np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"position_embeddings\.weight.*\(17, 16\).*\(9, 16\)"):
        interop.load_state_dict(small, official)
    fewer = {k: v for k, v in official.items() if "layers.1." not in k}
    with pytest.raises(KeyError, match="missing"):
        interop.load_state_dict(model_with(fixture, "sat"), fewer)
    with pytest.raises(KeyError, match="block-position"):
        interop.detect_layout({"foo": np.zeros(1)})


def test_torch_converter(tmp_path, fixture):
    torch = pytest.importorskip("torch")
    official = weights(fixture, "sat")
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {k: torch.from_numpy(v) for k, v in official.items()}}, path)
    out = interop.torch_checkpoint_to_npz(path, tmp_path / "glm.npz")
    model = GLM(fixture["config"], np.random.default_rng(0))
    interop.load(model, out)
    assert np.abs(model(*batch(fixture, "fig2")).numpy() - fixture["fig2_logits"]).max() <= 1e-5
