"""The trainer and `python -m minglm train`: smoke run, exact resume, rollback on spikes, overfitting one batch,
refusing bad configs and foreign or corrupt checkpoints. Everything uses a 1-layer model on a small generated corpus."""

import json
import shutil

import numpy as np
import pytest

from minglm.checkpoint import CheckpointError
from minglm.commands.train import main
from minglm.config import TrainConfig
from minglm.runs import load_run
from minglm.train import Trainer, _progress_disabled

WORDS = ("the king queen lord lady good night sweet love death fair heart sword crown blood honour gentle noble "
         "speak come go hath doth thou thee my your our what why where when never ever more").split()


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """Four small documents of fake verse, lines of 3-11 words."""
    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for i in range(4):
        lines = []
        for _ in range(60):
            words = rng.choice(WORDS, size=int(rng.integers(3, 12)))
            lines.append(" ".join(words).capitalize() + ".")
        (d / f"doc{i}.txt").write_text("\n".join(lines) + "\n")
    return d


def small_args(corpus_dir, out, name, steps=6, *extra):
    return ["--config", "tiny", "--corpus", str(corpus_dir), "--out", str(out), "--name", name,
            "--steps", str(steps), "--set", "model.n_layer=1", "--set", "model.d_model=32", "--set", "model.n_head=2",
            "--set", "seq_len=32", "--set", "batch_size=4", "--set", "warmup=2", "--set", "eval_batches=2",
            "--set", "fill_lines=2", "--set", "plots=false", "--eval-every", "3", "--ckpt-every", "3", "--quiet",
            *extra]


def read_log(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def without_timing(records):
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]


def test_the_default_run_is_the_words_recipe(corpus_dir, tmp_path):
    # no --config: whole-word tokens, blanks over whole words, windows from a sentence start, 1-D RoPE
    args = ["--corpus", str(corpus_dir), "--out", str(tmp_path), "--name", "w", "--steps", "2",
            "--set", "model.n_layer=1", "--set", "model.d_model=32", "--set", "model.n_head=2",
            "--set", "batch_size=2", "--set", "eval_batches=1", "--set", "fill_lines=2", "--set", "fill_words=4",
            "--set", "fill_spans=2", "--set", "plots=false", "--quiet"]
    assert main(args) == 0
    config = json.loads((tmp_path / "w" / "config.json").read_text())
    assert config["preset"] == "words" and config["model"]["position"] == "rope1d"
    train = config["train"]
    assert (train["tokenizer"], train["span_unit"], train["window_start"], train["seq_len"], train["bpe_vocab"]) == (
        "word", "known_word", "sentence", 32, 2048)
    assert json.loads((tmp_path / "w" / "tokenizer.json").read_text())["type"] == "word"
    assert "fill_eval" in json.loads((tmp_path / "w" / "summary.json").read_text())


def test_cli_smoke_run_writes_the_run_folder(corpus_dir, tmp_path):
    assert main(small_args(corpus_dir, tmp_path, "smoke")) == 0
    run = tmp_path / "smoke"
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["n_layer"] == 1 and config["train"]["seq_len"] == 32 and config["preset"] == "tiny"
    assert json.loads((run / "tokenizer.json").read_text())["type"] == "char"
    log = read_log(run)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    for r in log:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "loss_token"} <= set(r)
        assert np.isfinite(r["loss"]) and r["lr"] > 0 and r["grad_norm"] > 0
    for r in (log[2], log[5]):  # eval every 3 steps
        assert {"val_loss", "val_loss_token", "val_acc"} <= set(r)
        assert 0.0 <= r["val_acc"] <= 1.0
    assert "val_loss" not in log[0]
    assert sorted(p.name for p in (run / "ckpt").iterdir()) == ["step_3.json", "step_3.npz", "step_6.json",
                                                                 "step_6.npz"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["stop_reason"] == "completed" and summary["rollbacks"] == 0
    assert summary["unigram_loss"] > 0 and summary["val_loss"] == log[5]["val_loss"]
    fills = summary["fill_eval"]  # the fill benchmark, scaled to the usable lines of this small corpus
    assert len(fills["examples"]) == 2 and all("[MASK]" in f["text"] for f in fills["examples"])
    assert set(fills["scores"]) == {"model", "n-gram", "most frequent"} and 1 <= fills["rank"] <= 3
    assert fills["n_word"] > fills["n_span"] > 0 and fills["scores"]["model"]["word"]["n"] == fills["n_word"]
    # the fill command loads the run folder this wrote
    model, tokenizer = load_run(run)
    assert model.config.d_model == 32 and tokenizer.vocab_size == config["model"]["vocab_size"]


def test_resume_continues_bit_for_bit(corpus_dir, tmp_path):
    assert main(small_args(corpus_dir, tmp_path, "whole", 8)) == 0
    # the same run, killed after step 7 (its last checkpoint is step 6), then resumed
    assert main(small_args(corpus_dir, tmp_path, "cut", 8, "--stop-at", "7")) == 0
    assert [r["step"] for r in read_log(tmp_path / "cut")] == list(range(1, 8))
    assert main(["--resume", str(tmp_path / "cut"), "--quiet"]) == 0
    whole, cut = read_log(tmp_path / "whole"), read_log(tmp_path / "cut")
    assert [r["step"] for r in cut] == list(range(1, 9))  # step 7 was redone, not logged twice
    assert without_timing(cut) == without_timing(whole)  # losses, lrs, grad norms, val metrics: bit for bit
    w = json.loads((tmp_path / "whole" / "summary.json").read_text())
    c = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert w["val_loss"] == c["val_loss"] and w["fill_eval"]["examples"] == c["fill_eval"]["examples"]


def test_rollback_on_injected_nan_and_spike(corpus_dir, tmp_path):
    args = small_args(corpus_dir, tmp_path, "spiky", 7, "--inject-nan-at", "2", "--inject-spike-at", "5",
                      "--set", "spike_window=3", "--set", "spike_warmup=0")
    assert main(args) == 0
    log = read_log(tmp_path / "spiky")
    events = [r for r in log if r.get("event") == "rollback"]
    assert [(e["step"], e["restored_step"]) for e in events] == [(2, 0), (5, 3)]
    assert "nan" in events[0]["reason"] and "median" in events[1]["reason"]
    steps = [r["step"] for r in log if "event" not in r]
    assert steps == [1, 1, 2, 3, 4, 4, 5, 6, 7]  # each rollback goes back to the last checkpoint
    first, redo = log[0], log[2]
    assert first["lr"] == redo["lr"]  # the schedule went back with the step counter
    assert first["loss"] != redo["loss"]  # but the data went on: the offending batches are skipped
    assert all(np.isfinite(r["loss"]) and r["loss"] < 10 for r in log if "event" not in r)
    summary = json.loads((tmp_path / "spiky" / "summary.json").read_text())
    assert summary["rollbacks"] == 2 and summary["steps"] == 7


def test_too_many_rollbacks_stop_the_run_in_one_line(corpus_dir, tmp_path, capsys):
    args = small_args(corpus_dir, tmp_path, "doomed", 6, "--inject-nan-at", "1,2,3", "--set", "max_rollbacks=2")
    assert main(args) == 2  # was a traceback
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "3 rollbacks (max_rollbacks=2)" in err[0] and "intact" in err[0]


def test_bad_config_is_refused_with_the_field_name(corpus_dir, tmp_path, capsys):
    base = small_args(corpus_dir, tmp_path, "bad")
    assert main([*base, "--set", "nosuchfield=1"]) == 2
    assert "nosuchfield" in capsys.readouterr().err
    assert main([*base, "--set", "lr=fast"]) == 2
    assert "lr" in capsys.readouterr().err
    assert main([*base, "--set", "model.n_head=3"]) == 2
    assert "n_head" in capsys.readouterr().err
    assert main([*base, "--set", "batch_size=0"]) == 2
    assert "batch_size" in capsys.readouterr().err
    assert main([*base, "--config", str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # nothing was written for a refused config


def test_a_checkpoint_from_another_config_is_refused(corpus_dir, tmp_path, capsys):
    assert main(small_args(corpus_dir, tmp_path, "a", 3)) == 0
    assert main(small_args(corpus_dir, tmp_path, "b", 3, "--set", "model.d_model=16", "--stop-at", "1")) == 0
    (tmp_path / "b" / "ckpt").mkdir(exist_ok=True)
    for f in (tmp_path / "a" / "ckpt").iterdir():
        shutil.copy(f, tmp_path / "b" / "ckpt" / f.name)
    shutil.copy(tmp_path / "a" / "log.jsonl", tmp_path / "b" / "log.jsonl")
    assert main(["--resume", str(tmp_path / "b"), "--quiet"]) == 2
    assert "disagrees with b/ckpt/step_3.json: d_model=16 (checkpoint: 32)" in capsys.readouterr().err


# --- the Trainer API directly -------------------------------------------------------------------------------------


def make_trainer(corpus_dir, tmp_path, **cfg_overrides):
    from minglm.data.corpus import encode_corpus, load_corpus
    from minglm.data.loader import BlockLoader, iter_eval_batches
    from minglm.model import GLM, GLMConfig
    from minglm.optim import AdamW, CosineSchedule
    from minglm.tokenizer import CharTokenizer

    cfg = TrainConfig(**{"seq_len": 32, "batch_size": 4, "steps": 6, "warmup": 2, "ckpt_every": 3, "eval_every": 3,
                         **cfg_overrides})
    corpus = load_corpus(corpus_dir)
    tok = CharTokenizer.from_texts(corpus.docs)
    train_ids, val_ids = encode_corpus(corpus, tok)
    rng = np.random.default_rng(0)
    mcfg = GLMConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=32, max_len=33)
    model = GLM(mcfg, rng)
    opt = AdamW(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
    loader = BlockLoader(train_ids, tok, cfg.seq_len, cfg.batch_size)
    val = [(b.objective, b) for b in iter_eval_batches(val_ids, tok, 32, 4, max_batches=2)]
    expect = {"model_config": mcfg.to_dict(), "vocab_sha256": "abc"}
    return Trainer(model, opt, CosineSchedule(cfg.lr, cfg.warmup, cfg.steps), loader, rng, cfg, val,
                   ckpt_dir=tmp_path / "ckpt", meta=expect, expect=expect, verbose=False)


def tiny_trainer(corpus_dir, fault_hook=None, **cfg_overrides):
    """A 1-layer 16-wide model on windows of 16, checkpoints in memory: about 5 ms a step."""
    from minglm.data.corpus import encode_corpus, load_corpus
    from minglm.data.loader import BlockLoader
    from minglm.model import GLM, GLMConfig
    from minglm.optim import AdamW, CosineSchedule
    from minglm.tokenizer import CharTokenizer

    cfg = TrainConfig(**{"seq_len": 16, "batch_size": 2, "warmup": 2, "eval_every": 0, **cfg_overrides})
    corpus = load_corpus(corpus_dir)
    tok = CharTokenizer.from_texts(corpus.docs)
    rng = np.random.default_rng(0)
    model = GLM(GLMConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=16, max_len=17), rng)
    opt = AdamW(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
    loader = BlockLoader(encode_corpus(corpus, tok)[0], tok, cfg.seq_len, cfg.batch_size)
    return Trainer(model, opt, CosineSchedule(cfg.lr, cfg.warmup, cfg.steps), loader, rng, cfg,
                   fault_hook=fault_hook, verbose=False)


def times_at(factors: dict):
    """A fault hook that multiplies the loss of each listed step by its factor, once."""
    def hook(step, loss):
        return loss * factors.pop(step) if step in factors else loss
    return hook


def test_spike_guard_catches_a_gross_spike_from_step_1(corpus_dir):
    """With the default spike_warmup=200 a ×1000 loss at step 80 went into the update: now a loss above 10 × the
    running median (ln(vocab) before the first step) is rolled back at any step, and so are NaN and inf."""
    trainer = tiny_trainer(corpus_dir, times_at({1: 1000.0, 2: float("inf"), 80: 1000.0}), steps=81, ckpt_every=20)
    assert trainer.config.spike_warmup == 200 and trainer.fit() == "completed"
    events = [(r["step"], r["restored_step"]) for r in trainer.records if r.get("event") == "rollback"]
    assert events == [(1, 0), (2, 0), (80, 60)]
    reasons = [r["reason"] for r in trainer.records if r.get("event") == "rollback"]
    assert "ln(vocab_size)" in reasons[0] and "inf" in reasons[1] and "10 x" in reasons[2]
    assert all(r["loss"] < 10 for r in trainer.records if "event" not in r)  # no spike reached an update


def test_spike_guard_is_lenient_before_warmup_and_strict_after(corpus_dir):
    """A ×4 loss before spike_warmup is let through (early losses fall fast); after it, 3 × the median is a spike."""
    trainer = tiny_trainer(corpus_dir, times_at({3: 4.0, 30: 4.0}), steps=31, spike_warmup=10)
    assert trainer.fit() == "completed"
    events = [r for r in trainer.records if r.get("event") == "rollback"]
    assert [e["step"] for e in events] == [30] and "3 x" in events[0]["reason"]


def test_corrupt_or_foreign_checkpoint_leaves_the_model_untouched(corpus_dir, tmp_path):
    trainer = make_trainer(corpus_dir, tmp_path)
    assert trainer.fit() == "completed"
    before = trainer.model.state_dict()
    m_before = trainer.optimizer.m.copy()
    npz = tmp_path / "ckpt" / "step_3.npz"
    data = bytearray(npz.read_bytes())
    data[100] ^= 0xFF
    npz.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        trainer.load_checkpoint(tmp_path / "ckpt" / "step_3.json")
    trainer.expect["vocab_sha256"] = "another vocabulary"
    with pytest.raises(CheckpointError, match="vocab_sha256"):
        trainer.load_checkpoint(tmp_path / "ckpt" / "step_6.json")
    for name, arr in trainer.model.state_dict().items():
        np.testing.assert_array_equal(arr, before[name])
    np.testing.assert_array_equal(trainer.optimizer.m, m_before)
    assert trainer.step == 6


def test_trainer_with_gradient_accumulation_and_memory_checkpoints(corpus_dir, tmp_path):
    trainer = make_trainer(corpus_dir, tmp_path, grad_accum=2)
    trainer.ckpt_dir = None  # checkpoints in memory only
    assert trainer.fit() == "completed"
    steps = [r for r in trainer.records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert trainer.tokens_seen > 0 and trainer.optimizer.t == 6


def test_overfits_one_batch(corpus_dir, tmp_path):
    from minglm.data.corpus import encode_corpus, load_corpus
    from minglm.data.loader import BlockLoader
    from minglm.model import GLM, GLMConfig, glm_loss
    from minglm.optim import AdamW
    from minglm.tokenizer import CharTokenizer

    corpus = load_corpus(corpus_dir)
    tok = CharTokenizer.from_texts(corpus.docs)
    rng = np.random.default_rng(0)
    batch = BlockLoader(encode_corpus(corpus, tok)[0], tok, 32, 4).next_batch(rng)
    model = GLM(GLMConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=32, max_len=33), rng)
    opt = AdamW(model, lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(300):  # usually done in about 100 steps
        opt.zero_grad()
        loss = glm_loss(model, batch)
        loss.backward()
        opt.clip_grad_norm(1.0)
        opt.step()
        losses.append(loss.item())
        if losses[-1] < 0.02:
            break
    assert losses[0] > 3.0
    assert losses[-1] < 0.02, losses[-10:]


def test_progress_bar_is_quiet_without_a_terminal(monkeypatch):
    assert _progress_disabled()  # pytest captures stdout: not a terminal
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert _progress_disabled()


def test_typed_overrides():
    from minglm.config import apply_overrides, field_types, parse_value
    from minglm.model import GLMConfig

    model, train = {}, {}
    apply_overrides(model, train, ["lr=2e-3", "steps=12", "plots=off", "model.d_model=48", "train.corpus=x.txt",
                                   "model.seq_len=none"], field_types(GLMConfig))
    assert train == {"lr": 2e-3, "steps": 12, "plots": False, "corpus": "x.txt"}
    assert model == {"d_model": 48, "seq_len": None}
    assert type(train["steps"]) is int and type(train["lr"]) is float
    with pytest.raises(ValueError, match="steps"):
        parse_value("1.5", int, "--set train.steps")
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides({}, {}, ["lr"], field_types(GLMConfig))
    with pytest.raises(ValueError, match="model.d_model"):  # the error lists the known fields
        apply_overrides({}, {}, ["train.d_model=3"], field_types(GLMConfig))


def test_resume_refuses_a_new_config(corpus_dir, tmp_path, capsys):
    assert main(small_args(corpus_dir, tmp_path, "r", 3)) == 0
    assert main(["--resume", str(tmp_path / "r"), "--set", "lr=1", "--quiet"]) == 2
    assert "--set" in capsys.readouterr().err
    assert main(["--resume", str(tmp_path / "nope"), "--quiet"]) == 2
    assert "not a run folder" in capsys.readouterr().err
