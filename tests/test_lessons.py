"""The lessons run, draw their plots, and their committed notebooks match their sources.

Each lesson source (lessons/NN_*.py, jupytext percent format) is read with jupytext and executed top to bottom
by a real Jupyter kernel (nbclient), in lessons/ as the working directory and in fast mode (MINGLM_FAST=1). The
environment's MPLBACKEND is removed first: the kernel must use its inline backend, so every figure is really
drawn and lands in the outputs as a PNG (with MPLBACKEND=Agg, plt.show() would draw nothing and drawing bugs
would pass).
"""

from __future__ import annotations

import importlib.util
import os
import re
import time
from pathlib import Path

import jupytext
import nbclient
import pytest

ROOT = Path(__file__).resolve().parents[1]
LESSONS = ROOT / "lessons"


def _load_build():
    spec = importlib.util.spec_from_file_location("minglm_lessons_build", LESSONS / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _load_build()
SOURCES = build.lesson_sources(LESSONS)


def test_there_are_lessons():
    names = [p.name for p in SOURCES]
    assert "01_autograd.py" in names and len(names) >= 3, names


@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
def test_committed_notebook_is_up_to_date(source):
    target = build.target_of(source)
    assert target.exists(), f"{target.name} is missing: run python lessons/build.py"
    assert target.read_text(encoding="utf-8") == build.build_notebook(source), (
        f"{target.name} is stale: run python lessons/build.py"
    )


def test_build_is_byte_stable_with_fixed_cell_ids():
    import nbformat

    text = build.build_notebook(SOURCES[0])
    assert build.build_notebook(SOURCES[0]) == text
    nb = nbformat.reads(text, as_version=4)
    assert [c.id for c in nb.cells] == [f"c{i:03d}" for i in range(len(nb.cells))]
    assert all(c.get("outputs", []) == [] and c.get("execution_count") is None for c in nb.cells)


def test_build_check_reports_a_stale_notebook(tmp_path, capsys):
    src = tmp_path / "01_example.py"
    src.write_text("# %% [markdown]\n# # Lesson 1\n\n# %%\nx = 1\n", encoding="utf-8")
    assert build.stale_notebooks(tmp_path) == [tmp_path / "01_example.ipynb"]  # missing counts as stale
    build.target_of(src).write_text(build.build_notebook(src), encoding="utf-8")
    assert build.stale_notebooks(tmp_path) == []
    src.write_text(src.read_text(encoding="utf-8") + "\n# %%\ny = 2\n", encoding="utf-8")
    assert build.stale_notebooks(tmp_path) == [tmp_path / "01_example.ipynb"]
    assert build.main(["--check"]) == 0  # the real lessons folder is up to date


def _lesson_structure(source):
    nb = jupytext.read(source)
    md = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    return nb, md


@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
def test_lesson_has_summary_and_exercises(source):
    nb, md = _lesson_structure(source)
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# Lesson"), source.name
    assert "## Summary" in md and "## Exercises" in md, source.name


# Claims the lessons' text makes about their own outputs; if the library changes under a lesson, these fail.
EXPECTED_OUTPUT = {
    "01_autograd": ["layer_norm passes: True", "upstream G = 1:      True", "caught: gradcheck(square)",
                    "upstream G random:  caught: gradcheck(softmax)", "df/da          | exact: False | approx: True"],
    "02_blank_infilling": ["paper positions 1: [1, 2, 3, 4, 5, 5, 5, 5, 3, 3]",
                           "paper positions 2: [0, 0, 0, 0, 0, 1, 2, 3, 1, 2]",
                           "   pos | 0 1      2 3      4     4 4     4     2     2"],
    "03_glm_model_and_training": ["max |step by step − model(...)| = 0.0"],
    "04_generation": ["same: True", "stopped because:"],
    "05_attention_without_the_matrix": ["same: True", "sep =   0: the kernel computes  56.2 %",
                                        "sep = 512: the kernel computes 100.0 %", "  o: max |twin - plain| = ",
                                        "const float alpha = expf(m[n] - m_ref);"],
}


def _check_claims(name: str, text: str) -> None:
    for claim in EXPECTED_OUTPUT.get(name, []):
        assert claim in text, f"{name}: the output no longer shows {claim!r}"
    if name == "03_glm_model_and_training":  # the trained model must beat the context-free unigram baseline
        m = re.search(r"validation loss ([0-9.]+)  vs  unigram ([0-9.]+)", text)
        assert m and float(m.group(1)) < float(m.group(2)), f"{name}: no learning visible in {m and m.group(0)}"


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.mark.slow
@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
def test_lesson_executes(source, monkeypatch, runs_dir):
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel must draw for real (inline backend)
    monkeypatch.setenv("MINGLM_FAST", "1")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.setenv("MINGLM_RUNS", str(runs_dir))  # lesson 4 trains into a temporary runs folder
    # The lesson models are tiny: BLAS threads add nothing there, and on a busy 2-core machine they thrash
    # (measured here: 615 ms a training step with 2 threads under load, 50 ms with 1).
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    nb = jupytext.read(source)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(LESSONS)}})
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    print(f"{source.name}: {seconds:.1f} s")

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    errors = [o for o in outputs if o.output_type == "error"]
    tagged = [c for c in nb.cells if "raises-exception" in c.metadata.get("tags", [])]
    assert len(errors) <= len(tagged), f"{source.name}: unexpected errors {[e.ename for e in errors]}"
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert images, f"{source.name} drew no figure: every lesson has at least one plot"
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    # The exercises are left for the student: every checker in a lesson must report an unfinished answer.
    n_checks = text.count("\n== ") + text.startswith("== ")
    assert text.count("no answer yet") == n_checks, f"{source.name}: an exercise cell holds an answer"
    assert "\nPASS\n" not in text, f"{source.name}: a solution leaked into the learner's path"
    _check_claims(source.stem, text)
    assert seconds < 120, f"{source.name} took {seconds:.0f} s in fast mode; keep each lesson well under a minute"
