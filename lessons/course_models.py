"""The trained models of the course, each loaded through one function, so that a lesson never trains its own copy.

- ``course_model()`` is the GLM that lessons 7 and 10 read, fill blanks with and fine-tune. When minglm ships its
  pretrained course model (``load_run("course")``, minglm/course.py), that is it. Until then, or when the bundle is
  missing, a small model is trained here once with ``python -m minglm train`` (fast mode: 2 layers, 300 steps, well
  under a minute on 2 cores; ``MINGLM_FAST=0``: the tiny preset's few-minute run) and kept under ``RUNS``.
- ``lesson_run(name, objective, ...)`` trains (once) and loads any other small run a lesson needs, such as lesson 9's
  model on GLM's multi-task mixture.

``RUNS`` is ``$MINGLM_RUNS`` or ``runs/`` next to the lessons; a run that is already there is loaded, not retrained.
This file is not a lesson: it is the one place where the lessons decide which model they read.
"""

from __future__ import annotations

import os
from pathlib import Path

from minglm.commands import train as train_command
from minglm.runs import load_run

FAST = os.environ.get("MINGLM_FAST", "1") == "1"
RUNS = Path(os.environ.get("MINGLM_RUNS", "runs"))

# fast mode: about 150 k parameters, 64-token windows; a few hundred steps show the mechanics, not good English
FAST_MODEL = ["--set", "model.n_layer=2", "--set", "model.d_model=64", "--set", "model.n_head=4",
              "--set", "seq_len=64", "--set", "lr=5e-3", "--set", "warmup=20"]
QUIET = ["--quiet", "--set", "fill_words=0", "--set", "fill_spans=0", "--set", "eval_batches=2",
         "--set", "plots=false"]


def lesson_run(name: str, objective: str = "glm-base", steps: int = 300, extra: tuple[str, ...] = ()):
    """(model, tokenizer, run folder) of ``RUNS/name``, trained now with ``objective`` when it is not there yet.

    The tiny preset (character-level, learned positions) in every mode: in fast mode cut to 2 layers of width 64 and
    ``steps`` steps; otherwise the preset's own run (a few minutes). ``extra``: more ``python -m minglm train``
    arguments.
    """
    run = RUNS / name
    if not (run / "ckpt").is_dir():
        # the tiny preset: characters and GLM's own spans, as the lessons describe (the command's default may differ)
        args = ["--config", "tiny", "--out", str(RUNS), "--name", name, "--objective", objective, *QUIET, *extra]
        if FAST:
            args += ["--steps", str(steps), *FAST_MODEL]
        if train_command.main(args) != 0:
            raise RuntimeError(f"lesson_run: training {name} failed (python -m minglm train {' '.join(args)})")
    model, tokenizer = load_run(run)
    return model, tokenizer, run


def course_model():
    """(model, tokenizer, where it came from): the bundled course model when minglm ships one, else a small GLM
    trained here once on Shakespeare with GLM-Base's blank infilling (see the module docstring)."""
    try:
        model, tokenizer = load_run("course")
        return model, tokenizer, "course"
    except FileNotFoundError:
        pass
    return lesson_run("lesson-course-fast" if FAST else "lesson-course-tiny", "glm-base")
