"""Tests for LoRA adapters (minglm/lora.py)."""

from __future__ import annotations

import numpy as np
import pytest

import minglm.functional as F
from minglm import finetune as FT
from minglm import generate as G
from minglm import lora
from minglm.model import GLM, GLMConfig
from minglm.tensor import no_grad
from minglm.testing import cached_and_recomputed
from minglm.tokenizer import CharTokenizer

TOK = CharTokenizer.from_texts(["abcdefghijklmnopqrstuvwxyz .,!?\n"])
CFG = dict(vocab_size=TOK.vocab_size, n_layer=2, n_head=2, d_model=32, max_len=48)


def model_and_input(seed: int = 0):
    model = GLM(GLMConfig(**CFG), np.random.default_rng(seed))
    model.eval()
    rng = np.random.default_rng(seed + 100)
    tokens = rng.integers(8, TOK.vocab_size, size=(2, 12))
    pos = np.tile(np.arange(12), (2, 1))
    block = np.zeros((2, 12), dtype=np.int64)
    block[:, 8:] = np.arange(1, 5)
    pos[:, 8:] = 3
    return model, (tokens, pos, block, np.array([8, 8]))


def logits(model, inputs) -> np.ndarray:
    with no_grad():
        return model(*inputs).numpy()


def randomize_b(model, seed: int = 7) -> None:
    rng = np.random.default_rng(seed)
    for m in lora.lora_layers(model).values():
        m.lora_B.data[...] = rng.standard_normal(m.lora_B.shape).astype(np.float32) * 0.05


def test_apply_freezes_the_base_and_counts_parameters(capsys):
    model, inputs = model_and_input()
    base = logits(model, inputs)
    names_before = [n for n, _ in model.named_parameters()]
    layers = lora.apply_lora(model, rank=4, alpha=8.0, rng=np.random.default_rng(0))
    C, r = 32, 4
    assert len(layers) == 4 * 2  # qkv, attention dense, both MLP projections, in each of the 2 blocks
    expected = 2 * r * ((C + 3 * C) + (C + C) + (C + 4 * C) + (4 * C + C))
    trainable = lora.trainable_parameters(model)
    assert sum(p.size for _, p in trainable) == expected
    assert all(n.endswith((".lora_A", ".lora_B")) for n, _ in trainable)
    # the base parameters keep their names, so a pretrained checkpoint still loads
    assert [n for n, _ in model.named_parameters() if "lora_" not in n] == names_before
    print(lora.lora_summary(model))
    assert f"{expected:,} trainable" in capsys.readouterr().out
    # B = 0 at the start: the adapted model is exactly the base model
    np.testing.assert_array_equal(logits(model, inputs), base)
    with pytest.raises(ValueError, match="already"):
        lora.apply_lora(model, rng=np.random.default_rng(0))


def test_only_adapters_get_gradients():
    model, inputs = model_and_input(1)
    lora.apply_lora(model, rank=2, alpha=4.0, rng=np.random.default_rng(0))
    randomize_b(model)
    model.train()
    loss = F.cross_entropy(model(*inputs), inputs[0])
    loss.backward()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.grad is not None and np.abs(p.grad).max() > 0, name
        else:
            assert p.grad is None, name


def test_merge_and_unmerge_are_exact():
    model, inputs = model_and_input(2)
    base_weights = {n: p.data.copy() for n, p in model.named_parameters()}
    lora.apply_lora(model, rank=4, alpha=8.0, rng=np.random.default_rng(0))
    randomize_b(model)
    adapted = logits(model, inputs)
    assert np.abs(adapted - logits(GLM(GLMConfig(**CFG), np.random.default_rng(2)), inputs)).max() > 1e-3
    lora.merge_lora(model)
    merged = logits(model, inputs)
    np.testing.assert_allclose(merged, adapted, atol=1e-5, rtol=0)
    w = model.layers[0].attention.query_key_value.weight.data
    assert np.abs(w - base_weights["layers.0.attention.query_key_value.weight"]).max() > 1e-4  # really merged
    lora.unmerge_lora(model)
    for n, p in model.named_parameters():
        if n in base_weights:
            np.testing.assert_allclose(p.data, base_weights[n], atol=1e-7, rtol=0, err_msg=n)
    np.testing.assert_allclose(logits(model, inputs), adapted, atol=1e-6, rtol=0)
    # removing the adapters (merged) leaves plain Linear layers with the same logits
    lora.remove_lora(model, merge=True)
    assert not lora.lora_layers(model)
    np.testing.assert_allclose(logits(model, inputs), adapted, atol=1e-5, rtol=0)


def test_save_and_load_adapters(tmp_path):
    model, inputs = model_and_input(3)
    lora.apply_lora(model, rank=3, alpha=6.0, rng=np.random.default_rng(0))
    randomize_b(model)
    adapted = logits(model, inputs)
    npz, meta = lora.save_lora(model, tmp_path / "adapters")
    assert npz.stat().st_size < 0.25 * sum(p.size * 4 for p in model.parameters())  # adapters only
    fresh, _ = model_and_input(3)  # the same base weights, no adapters
    lora.load_lora(fresh, npz)
    np.testing.assert_array_equal(logits(fresh, inputs), adapted)
    other, _ = model_and_input(3)
    lora.apply_lora(other, rank=5, alpha=6.0, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="shape"):
        lora.load_lora(other, meta)
    with pytest.raises(FileNotFoundError):
        lora.load_lora(fresh, tmp_path / "nothing")


@pytest.mark.parametrize("kind", ["fast", "cached"])
def test_generation_with_adapters_matches_recompute(kind):
    """LoRALinear overrides infer as well as forward, so both decoding paths see the adapters."""
    model, _ = model_and_input(4)
    lora.apply_lora(model, rank=2, alpha=4.0, rng=np.random.default_rng(0))
    randomize_b(model)
    r, got, ref = cached_and_recomputed(model, TOK, "ab [MASK] cd [MASK]", G.Sampling(greedy=True, max_new_tokens=4),
                                        kind=kind)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    lora.remove_lora(model, merge=True)  # the adapters folded into plain Linear layers: the same fills
    assert G.fill(model, TOK, "ab [MASK] cd [MASK]", G.Sampling(greedy=True, max_new_tokens=4)).fill_ids == r.fill_ids


def test_lora_finetuning_beats_zero_shot_on_a_synthetic_task():
    rng = np.random.default_rng(0)
    model, _ = model_and_input(5)
    scorer = FT.ClozeScorer(TOK, FT.ClozeTask("{text} is [MASK].", ["good", "bad"]), CFG["max_len"])

    def task(n):
        texts, labels = [], []
        for i in range(n):
            letters = np.array(list("abcde" if i % 2 == 0 else "vwxyz"))
            texts.append("".join(rng.choice(letters, size=6)))
            labels.append(i % 2)
        return scorer.encode(texts), labels

    train_ex, train_y = task(48)
    test_ex, test_y = task(40)
    zero = scorer.accuracy(model, test_ex, test_y)
    lora.apply_lora(model, rank=4, alpha=8.0, rng=np.random.default_rng(0))
    frozen = {n: p.data.copy() for n, p in model.named_parameters() if "lora_" not in n}
    FT.finetune(model, scorer, train_ex, train_y, steps=40, batch_size=8, lr=1e-2, rng=np.random.default_rng(1),
                weight_decay=0.0)
    tuned = scorer.accuracy(model, test_ex, test_y)
    assert tuned >= 0.9 and tuned > zero, (zero, tuned)
    for n, p in model.named_parameters():  # the base did not move
        if n in frozen:
            np.testing.assert_array_equal(p.data, frozen[n], err_msg=n)
