"""Runs that nothing can corrupt: the faults of docs/robustness.md, each tried as a user would meet it.

One writer per run folder, the checkpoint as the truth for every command, no write outside the run folder, resume
that survives accidents, one-line errors with exit code 2, and nothing left behind by a refused command. Every run is
a 1-layer, 16-wide model trained for a few steps on a small generated corpus (about 0.1 s a run); one base run is
trained per module and copied for each test that damages it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minglm.backend import gpu_available
from minglm.commands import main as cli
from minglm.runs import load_run

ROOT = Path(__file__).resolve().parent.parent
WORDS = "the king queen lord lady good night sweet love death fair heart sword crown".split()
TINY = ["--config", "tiny", "--set", "model.n_layer=1", "--set", "model.d_model=16", "--set", "model.n_head=2",
        "--set", "seq_len=16",
        "--set", "batch_size=2", "--set", "eval_batches=1", "--set", "fill_words=0", "--set", "fill_spans=0",
        "--set", "plots=false", "--eval-every", "2", "--ckpt-every", "2", "--quiet"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for i in range(4):
        (d / f"doc{i}.txt").write_text("\n".join(" ".join(rng.choice(WORDS, 6)) for _ in range(40)) + "\n")
    return d


def train(corpus, out, name, steps=4, *extra) -> int:
    return cli(["train", "--corpus", str(corpus), "--out", str(out), "--name", name, "--steps", str(steps), *TINY,
                *extra])


@pytest.fixture(scope="module")
def base_run(corpus, tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4 (copy it before damaging it)."""
    out = tmp_path_factory.mktemp("base")
    assert train(corpus, out, "base") == 0
    return out / "base"


@pytest.fixture
def run(base_run, tmp_path) -> Path:
    shutil.copytree(base_run, tmp_path / "run")
    return tmp_path / "run"


def one_line(capsys, *needles) -> str:
    """The one line the command printed on stderr (notes aside), which must contain every needle."""
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and not ln.startswith("note:")]
    assert len(err) == 1, err
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


def log_steps(run_dir: Path) -> list:
    return [json.loads(ln)["step"] for ln in (run_dir / "log.jsonl").read_text().splitlines()]


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


# --- 1. one writer per run folder --------------------------------------------------------------------------------


def test_a_second_writer_is_refused_and_named_and_a_killed_one_leaves_no_lock(run, capsys):
    """Two `train --resume` of one run both exited 0 and interleaved log.jsonl; now the second is refused."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from minglm.runs import run_lock\n"
                               "with run_lock(sys.argv[1]):\n print('held', flush=True); time.sleep(60)", str(run)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = (run / "log.jsonl").read_bytes()
        assert cli(["train", "--resume", str(run), "--steps", "6", "--quiet"]) == 2
        one_line(capsys, f"is being written by process {holder.pid}", "one writer per run folder")
        assert (run / "log.jsonl").read_bytes() == before
        model, _ = load_run(run)  # a reader needs no lock
        assert model.config.d_model == 16
    finally:
        holder.send_signal(signal.SIGKILL)  # a crash: the kernel drops the lock
        holder.wait()
    assert cli(["train", "--resume", str(run), "--steps", "6", "--quiet"]) == 0
    assert log_steps(run) == [1, 2, 3, 4, 5, 6]


# --- 2. the checkpoint is the truth for every command -------------------------------------------------------------


def test_every_reader_refuses_a_config_or_vocabulary_that_disagrees_with_the_checkpoint(run, tmp_path, capsys):
    edit_json(run / "config.json", lambda c: c["model"].update(n_head=4))
    commands = [["fill", str(run), "the [MASK] king"], ["export", str(run), "--out", str(tmp_path / "w.npz")],
                ["eval", "fill", str(run)], ["plot", "attention", "--run", str(run), "--out", str(tmp_path / "a.png")],
                ["finetune", "--run", str(run), "--steps", "1"]]
    for argv in commands:
        assert cli(argv) == 2, argv
        one_line(capsys, "disagrees with run/ckpt/step_4.json: n_head=4 (checkpoint: 2)")
    edit_json(run / "config.json", lambda c: c["model"].update(n_head=2))
    tok = json.loads((run / "tokenizer.json").read_text())
    tok["chars"][-1] = "\u2603"  # one vocabulary character changed
    (run / "tokenizer.json").write_text(json.dumps(tok))
    for argv in commands[:3]:
        assert cli(argv) == 2, argv
        one_line(capsys, "tokenizer.json is not the vocabulary")


def test_an_edited_training_config_cannot_point_a_command_at_another_corpus(run, tmp_path, capsys):
    other = tmp_path / "elsewhere"
    other.mkdir()
    edit_json(run / "config.json", lambda c: c["train"].update(corpus=str(other)))
    for argv in (["train", "--resume", str(run), "--quiet"], ["plot", "mask", "--run", str(run), "--out",
                                                             str(tmp_path / "m.png")], ["eval", "fill", str(run)]):
        assert cli(argv) == 2, argv
        one_line(capsys, "config.json disagrees", "corpus=")


def test_the_checkpoint_meta_is_cross_checked(run, capsys):
    """meta.step = 999 was accepted; meta.log_lines = 3 silently cut the log. Now both are passed over, aloud."""
    edit_json(run / "ckpt" / "step_4.json", lambda r: r["meta"].update(step=999))
    assert cli(["train", "--resume", str(run), "--steps", "6", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "passed over step_4.json" in err and "meta says step 999" in err
    assert log_steps(run) == [1, 2, 3, 4, 5, 6]  # resumed from step 2
    edit_json(run / "ckpt" / "step_6.json", lambda r: r["meta"].update(log_lines=5))
    assert cli(["train", "--resume", str(run), "--steps", "6", "--quiet"]) == 0
    assert "passed over step_6.json: it expects log line 5 to be step 6, log.jsonl has step 5 there" in \
        capsys.readouterr().err
    assert log_steps(run) == [1, 2, 3, 4, 5, 6]  # nothing was deleted
    edit_json(run / "ckpt" / "step_6.json", lambda r: r["meta"].update(log_lines=5))  # (it was written again)
    assert cli(["train", "--resume", str(run), "--from", "step_6", "--quiet"]) == 2
    one_line(capsys, "passed over step_6.json")


def test_a_missing_meta_key_is_one_line(run, capsys):
    edit_json(run / "ckpt" / "step_4.json", lambda r: r["meta"].pop("rng"))
    assert cli(["train", "--resume", str(run), "--steps", "6", "--quiet"]) == 2
    one_line(capsys, "meta lacks rng")


# --- 3. no write outside the run folder ---------------------------------------------------------------------------


def test_no_command_writes_through_a_planted_symlink(run, tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (run / "glm_official.npz").symlink_to(victim)
    assert cli(["export", str(run)]) == 2
    one_line(capsys, "glm_official.npz", "symbolic link")
    (run / "plots").symlink_to(tmp_path)
    assert cli(["plot", "run", "--run", str(run)]) == 2
    one_line(capsys, "plots", "symbolic link")
    assert cli(["train", "--resume", str(run), "--steps", "6", "--quiet"]) == 2
    one_line(capsys, "plots", "symbolic link")
    (run / "plots").unlink()
    (run / "log.jsonl").rename(run / "log.real")
    (run / "log.jsonl").symlink_to(victim)
    assert cli(["train", "--resume", str(run), "--steps", "6", "--quiet"]) == 2
    one_line(capsys, "log.jsonl", "symbolic link")
    assert victim.read_text() == "precious"


def test_a_run_name_cannot_leave_out(corpus, tmp_path, capsys):
    out = tmp_path / "a" / "runs"
    assert train(corpus, out, "../../escaped") == 2
    one_line(capsys, "--name", "plain folder name")
    assert not (tmp_path / "escaped").exists() and not out.exists()


def test_a_crafted_model_size_is_refused_before_anything_is_allocated(run, capsys):
    """d_model 65,536 in config.json and in the checkpoint's own record: refused against the arrays' shapes."""
    big = lambda c: c.update(d_model=65536, n_head=2)  # noqa: E731
    edit_json(run / "config.json", lambda c: big(c["model"]))
    for step in (2, 4):
        edit_json(run / "ckpt" / f"step_{step}.json", lambda r: big(r["meta"]["model_config"]))
    assert cli(["fill", str(run), "the [MASK]"]) == 2
    one_line(capsys, "d_model=65536", "does not fit the checkpoint's arrays", "word_embeddings.weight")
    assert cli(["train", "--resume", str(run), "--quiet"]) == 2
    one_line(capsys, "does not fit the checkpoint's arrays")


# --- 4. resume that survives real accidents -------------------------------------------------------------------------


def test_a_corrupt_newest_checkpoint_falls_back_and_says_so(run, capsys):
    (run / "ckpt" / "step_4.npz").write_bytes(b"torn")
    assert cli(["train", "--resume", str(run), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "passed over step_4.json" in err and "corrupt or torn" in err and "moved to" in err
    assert log_steps(run) == [1, 2, 3, 4]
    assert (run / "ckpt" / "step_4.npz").stat().st_size > 100  # written again by the resumed run


def test_resume_from_a_chosen_checkpoint(run, capsys):
    assert cli(["train", "--resume", str(run), "--from", "step_2", "--quiet"]) == 0
    assert "checkpoints newer than step 2 were moved to" in capsys.readouterr().err
    assert log_steps(run) == [1, 2, 3, 4] and len(list((run / "ckpt" / "superseded").rglob("step_4.*"))) == 2
    assert cli(["train", "--resume", str(run), "--from", "step_7", "--quiet"]) == 2
    one_line(capsys, "--from step_7: no such checkpoint")


def test_a_short_log_resumes_from_the_newest_checkpoint_it_covers(run, capsys):
    lines = (run / "log.jsonl").read_text().splitlines(keepends=True)
    (run / "log.jsonl").write_text("".join(lines[:3]) + lines[3][:10])  # lost its tail, the last line torn
    assert cli(["train", "--resume", str(run), "--quiet"]) == 0
    assert "passed over step_4.json: it expects 4 log lines, log.jsonl has 3" in capsys.readouterr().err
    assert log_steps(run) == [1, 2, 3, 4]


def test_resume_works_from_another_directory(corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(corpus.parent)
    assert train(Path(corpus.name), tmp_path, "r", 4, "--stop-at", "3") == 0  # a relative corpus path
    assert json.loads((tmp_path / "r" / "config.json").read_text())["train"]["corpus"] == str(corpus)
    monkeypatch.chdir(tmp_path)
    assert cli(["train", "--resume", "r", "--quiet"]) == 0
    assert log_steps(tmp_path / "r") == [1, 2, 3, 4]


def test_a_run_killed_before_its_first_checkpoint_can_be_resumed_or_overwritten(corpus, tmp_path, capsys):
    assert train(corpus, tmp_path, "early", 4, "--stop-at", "1") == 0  # no checkpoint yet (every 2 steps)
    assert train(corpus, tmp_path, "early") == 2
    one_line(capsys, "exists", "--overwrite")
    assert cli(["train", "--resume", str(tmp_path / "early"), "--quiet"]) == 0
    assert "starting again from step 0" in capsys.readouterr().err
    assert log_steps(tmp_path / "early") == [1, 2, 3, 4]
    assert train(corpus, tmp_path, "late", 4, "--stop-at", "1") == 0
    assert train(corpus, tmp_path, "late", 4, "--overwrite") == 0
    assert log_steps(tmp_path / "late") == [1, 2, 3, 4]
    assert train(corpus, tmp_path, "late", 4, "--overwrite") == 2  # it has checkpoints now
    one_line(capsys, "holds checkpoints up to step_4")


def test_a_new_step_budget_is_announced(run, capsys):
    assert cli(["train", "--resume", str(run), "--steps", "6", "--quiet"]) == 0
    assert "--resume changes the run's steps from 4 to 6" in capsys.readouterr().err
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 6


# --- 5. --corpus FILE.txt -------------------------------------------------------------------------------------------


def test_one_text_file_is_a_corpus(tmp_path):
    f = tmp_path / "sonnet.txt"
    f.write_text("\n\n".join(f"Shall I compare thee to a summer's day {i}?\nThou art more lovely." for i in range(8)))
    assert train(f, tmp_path, "one-file") == 0


# --- 6. one line and exit code 2 for every fault --------------------------------------------------------------------


def test_disk_full_and_a_read_only_folder(corpus, run, tmp_path, monkeypatch, capsys):
    real_savez = np.savez

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "savez", full)
    assert cli(["train", "--resume", str(run), "--steps", "6", "--quiet"]) == 2
    one_line(capsys, "No space left on device", "its last checkpoint is intact")
    monkeypatch.setattr(np, "savez", real_savez)
    real_mkdir = Path.mkdir

    def read_only(self, *a, **k):
        if "ro" in self.parts:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", read_only)
    assert train(corpus, tmp_path / "ro", "x") == 2
    one_line(capsys, "Permission denied", str(tmp_path / "ro"))


@pytest.mark.skipif(gpu_available(), reason="this machine has a usable GPU")
def test_no_gpu_is_one_line_and_leaves_nothing(corpus, tmp_path, monkeypatch, capsys):
    assert train(corpus, tmp_path, "g", 4, "--device", "gpu") == 2
    one_line(capsys, "--device gpu", "CuPy")
    monkeypatch.setenv("MINGLM_BACKEND", "cupy")
    assert train(corpus, tmp_path, "g") == 2
    one_line(capsys, "CuPy")
    assert not (tmp_path / "g").exists()


def test_bad_values_in_config_and_tokenizer_files(run, tmp_path, capsys):
    saved = (run / "config.json").read_text()
    edit_json(run / "config.json", lambda c: c["train"].update(lr="abc"))
    assert cli(["train", "--resume", str(run), "--quiet"]) == 2
    one_line(capsys, "lr must be a finite number", "'abc'")
    assert cli(["train", "--config", str(run / "config.json"), "--out", str(tmp_path), "--quiet"]) == 2
    one_line(capsys, "lr must be a finite number")
    (run / "config.json").write_text(saved[:-5])
    for argv in (["fill", str(run), "the [MASK]"], ["train", "--resume", str(run), "--quiet"]):
        assert cli(argv) == 2
        one_line(capsys, "config.json is not valid JSON")
    (run / "config.json").write_text(saved)
    edit_json(run / "tokenizer.json", lambda t: t.update(chars=5))
    assert cli(["fill", str(run), "the [MASK]"]) == 2
    one_line(capsys, "tokenizer.json is not a valid tokenizer file")
    (run / "tokenizer.json").write_text("[1, 2")
    assert cli(["train", "--resume", str(run), "--quiet"]) == 2
    one_line(capsys, "tokenizer.json is not valid JSON")


def test_export_sample_and_finetune_errors_are_one_line(tmp_path, capsys):
    assert cli(["export", str(tmp_path / "nope")]) == 2
    one_line(capsys, "no such run folder")
    assert cli(["sample", "--corpus", str(tmp_path / "nope")]) == 2
    one_line(capsys, "no such file or folder")
    (tmp_path / "a.txt").write_text("To be, or not to be, that is the question.\n\nWhether 'tis nobler.\n")
    assert cli(["sample", "--corpus", str(tmp_path / "a.txt"), "--seq-len", "2"]) == 2
    one_line(capsys, "seq_len")
    for argv, needle in ((["--n-train", "0"], "--n-train must be at least 3"),
                         (["--pattern", "{text} or {text}? [MASK]"], "exactly once")):
        assert cli(["finetune", "--out", str(tmp_path / "runs"), *argv]) == 2
        one_line(capsys, needle)
    assert not (tmp_path / "runs").exists()  # refused before a quick pretraining run


def test_non_finite_settings_name_the_field(corpus, tmp_path, capsys):
    for pair in ("lr=inf", "clip=nan", "time_limit=nan"):
        assert train(corpus, tmp_path, "nf", 4, "--set", pair) == 2
        one_line(capsys, f"TrainConfig.{pair.split('=')[0]} must be a finite number")
    assert train(corpus, tmp_path, "nf", 4, "--set", "line_windows=1.5") == 2
    one_line(capsys, "TrainConfig.line_windows must be in [0, 1]")
    assert not (tmp_path / "nf").exists()


def test_plot_run_that_writes_nothing_fails(run, capsys):
    (run / "log.jsonl").unlink()
    (run / "tokenizer.json").write_text("{}")
    shutil.rmtree(run / "ckpt")
    with pytest.warns(UserWarning):
        assert cli(["plot", "run", "--run", str(run)]) == 2
    one_line(capsys, "wrote no picture")


# --- 7. nothing is left behind by a refused command ------------------------------------------------------------------


@pytest.mark.parametrize("extra, needle", [
    (["--objective", "nonsense"], "nonsense"),
    (["--inject-spike-at", "x"], "--inject-spike-at"),
    (["--set", "max_len=16"], "max_len=16 is below seq_len + 1 = 17"),
    (["--from", "step_2"], "--from goes with --resume"),
])
def test_a_refused_command_leaves_nothing(corpus, tmp_path, capsys, extra, needle):
    assert train(corpus, tmp_path / "out", "refused", 4, *extra) == 2
    one_line(capsys, needle)
    assert not (tmp_path / "out").exists()


# --- 9. text the tokenizer cannot encode ---------------------------------------------------------------------------


def test_train_counts_the_characters_that_become_unk(run, tmp_path, capsys):
    corpus = tmp_path / "grown"
    shutil.copytree(Path(json.loads((run / "config.json").read_text())["train"]["corpus"]), corpus)
    for path in (run / "config.json", *(run / "ckpt").glob("step_*.json")):  # the same run on a grown corpus
        edit_json(path, lambda r: (r.get("train") or r["meta"]["train_config"]).update(corpus=str(corpus)))
    text = (corpus / "doc0.txt").read_text()
    (corpus / "doc0.txt").write_text("Ωμέγα☃" + text[6:])  # as many characters as before: the same windows
    assert cli(["train", "--resume", str(run), "--steps", "6", "--quiet"]) == 0
    warning = one_line(capsys, "warning: 6 of the corpus's", "[UNK]")  # 5 Greek letters and a snowman
    assert "tokens are characters the tokenizer does not know" in warning
