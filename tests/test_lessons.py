"""The lessons run, draw their plots, and their committed notebooks match their sources.

Each lesson source (lessons/NN_*.py, jupytext percent format) is read with jupytext and executed top to bottom
by a real Jupyter kernel (nbclient), in lessons/ as the working directory and in fast mode (MINGLM_FAST=1). The
environment's MPLBACKEND is removed first: the kernel must use its inline backend, so every figure is really
drawn and lands in the outputs as a PNG (with MPLBACKEND=Agg, plt.show() would draw nothing and drawing bugs
would pass). The exercises are left open, as a student finds them: each checker must report NOT DONE and the
notebook must still run to the end. All lessons together must fit the course's budget of 10 minutes on 2 cores.
Every "(Think.)" exercise has a model answer in lessons/solutions/think.md.
"""

from __future__ import annotations

import importlib.util
import os
import re
import time
from pathlib import Path

import jupytext
import nbclient
import nbclient.exceptions
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
    assert "01_autograd.py" in names and len(names) >= 12, names
    numbers = [int(n[:2]) for n in names]
    assert numbers == list(range(1, len(names) + 1)), f"lessons are numbered 01, 02, ... without gaps: {names}"


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
def test_lesson_has_goals_summary_and_exercises(source):
    nb, md = _lesson_structure(source)
    number = int(source.name[:2])
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith(f"# Lesson {number} "), source.name
    assert "**Learning goals.**" in md and "## Summary" in md and "## Exercises" in md, source.name
    exercises = re.findall(r"^\*\*(\d)\.\*\*", md.split("## Exercises")[1], flags=re.MULTILINE)
    assert 2 <= len(exercises) <= 4, f"{source.name}: {len(exercises)} exercises (2-4 wanted)"


THINK_ANSWERS = LESSONS / "solutions" / "think.md"


def _open_exercises(source) -> list[int]:
    """The numbers of a lesson's exercises that no checker grades: those not followed by a code cell that calls
    ``exercises.check_...`` (the ones a teacher needs a model answer for)."""
    nb = jupytext.read(source)
    cells = nb.cells
    start = next(i for i, c in enumerate(cells) if c.cell_type == "markdown" and "## Exercises" in c.source)
    open_ones = []
    for i in range(start, len(cells)):
        if cells[i].cell_type != "markdown":
            continue
        numbers = [int(n) for n in re.findall(r"^\*\*(\d)\.\*\*", cells[i].source, flags=re.MULTILINE)]
        checked = i + 1 < len(cells) and cells[i + 1].cell_type == "code" and "exercises.check_" in cells[i + 1].source
        open_ones += numbers[:-1] if checked else numbers
    return open_ones


def test_every_open_exercise_has_a_model_answer():
    """A teacher finds a model answer for each exercise without a checker, under "## Lesson N" / "### Exercise M"."""
    text = THINK_ANSWERS.read_text(encoding="utf-8")
    missing = []
    for source in SOURCES:
        number = int(source.name[:2])
        section = re.search(rf"^## Lesson {number}\b(.*?)(?=^## Lesson |\Z)", text, flags=re.MULTILINE | re.DOTALL)
        for k in _open_exercises(source):
            if section is None or not re.search(rf"^### Exercise {k}\b", section.group(1), flags=re.MULTILINE):
                missing.append(f"lesson {number}, exercise {k}")
    assert not missing, f"{THINK_ANSWERS.name} has no model answer for: {', '.join(missing)}"


# Claims the lessons' text makes about their own outputs; if the library changes under a lesson, these fail.
EXPECTED_OUTPUT = {
    "01_autograd": ["layer_norm passes: True", "upstream G = 1:      True", "caught: gradcheck(square)",
                    "upstream G random:  caught: gradcheck(softmax)", "df/da          | exact: False | approx: True"],
    "02_tokenization": ["merge  0:", "are unknown:", "tokens per character"],
    "03_blank_infilling": ["paper positions 1: [1, 2, 3, 4, 5, 5, 5, 5, 3, 3]",
                           "paper positions 2: [0, 0, 0, 0, 0, 1, 2, 3, 1, 2]",
                           "   pos | 0 1      2 3      4     4 4     4     2     2"],
    "04_attention_and_the_block": ["max |one call − head by head| = 0.0", "max |Block(x) − the two lines| = 0.0"],
    "05_glm_model_and_training": ["max |step by step − model(...)| = 0.0", "mask_ratio 0.5:"],
    "06_training_recipe": ["bit for bit the same: True", "same weights at step 30: True", "rollback at step 32",
                           "GLM's 15 % blanks        largest gradient norm after step 10:"],
    "07_generation": ["same: True", "stopped because:"],
    "08_objectives_compared": ["positions carry a loss | LM loss"],
    "09_multitask_glm": ["[sMASK]", "[gMASK]"],
    "10_finetuning_as_cloze": ["zero-shot", "LoRA: ", "prefix tuning: "],
    "11_attention_without_the_matrix": ["same: True", "sep =   0: the kernel computes  56.2 %",
                                        "sep = 512: the kernel computes 100.0 %", "  o: max |twin - plain| = ",
                                        "const float alpha = expf(m[n] - m_ref);"],
    "12_what_glm130b_changed": ["(distance 3): score", "| GLM-130B (all on) |"],
    "13_beyond_one_machine": ["largest difference of the logits after the round trip: 0.0", "to read it back: SAT"],
}


def _check_claims(name: str, text: str) -> None:
    for claim in EXPECTED_OUTPUT.get(name, []):
        assert claim in text, f"{name}: the output no longer shows {claim!r}"
    if name == "05_glm_model_and_training":  # the trained model must beat the context-free unigram baseline
        m = re.search(r"validation loss ([0-9.]+)  vs  unigram ([0-9.]+)", text)
        assert m and float(m.group(1)) < float(m.group(2)), f"{name}: no learning visible in {m and m.group(0)}"
    if name == "06_training_recipe":  # the spike the lesson explains is there at GLM's 15 %, and gone at lr 2e-3
        spikes = dict(re.findall(r"^(.{24}) largest gradient norm after step 10: +([0-9.]+)", text, re.MULTILINE))
        assert float(spikes["GLM's 15 % blanks       "]) > 5 * float(spikes["15 %, peak lr 2e-3      "]), spikes
    if name == "08_objectives_compared":  # GPT learns from nearly every position, BERT from about 15 %
        share = dict(re.findall(r"^ *([a-z0-9-]+): *([0-9.]+)% of positions", text, re.MULTILINE))
        assert float(share["gpt"]) > 90 and float(share["bert"]) < 25, share
        infill = dict(re.findall(r"^ *([a-z0-9-]+): .*infilling loss ([0-9.]+)", text, re.MULTILINE))
        assert min(infill, key=lambda k: float(infill[k])) == "glm-base", infill  # GLM fills blanks best
    if name == "13_beyond_one_machine":
        m = re.search(r"all-reduced against the whole batch: ([0-9.e+-]+)", text)
        assert m and float(m.group(1)) < 1e-5, m and m.group(0)


# Every lesson in fast mode, all together, on 2 cores (the course's budget; measured and printed by the test).
TOTAL_BUDGET_S = 600.0
LESSON_LIMIT_S = 120.0  # one lesson in fast mode; each takes 5-30 s on 2 cores
TIMES: dict[str, float] = {}


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.mark.slow
@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
def test_lesson_executes(source, monkeypatch, runs_dir):
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel must draw for real (inline backend)
    monkeypatch.setenv("MINGLM_FAST", "1")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.setenv("MINGLM_RUNS", str(runs_dir))  # lessons 7, 9, 10, 13 train (once) into a temporary folder
    # The lesson models are tiny: BLAS threads add nothing there, and on a busy 2-core machine they thrash
    # (measured here: 615 ms a training step with 2 threads under load, 50 ms with 1).
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    nb, seconds = _execute(source)
    TIMES[source.stem] = seconds
    print(f"{source.name}: {seconds:.1f} s")

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    errors = [o for o in outputs if o.output_type == "error"]
    tagged = [c for c in nb.cells if "raises-exception" in c.metadata.get("tags", [])]
    assert len(errors) <= len(tagged), f"{source.name}: unexpected errors {[e.ename for e in errors]}"
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert images, f"{source.name} drew no figure: every lesson has at least one plot"
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    # The exercises are left for the student: every checker in a lesson must report an unfinished answer, and print
    # nothing but its verdict (no echoed True/False/Result under it: no execute_result at all).
    n_checks = text.count("\n== ") + text.startswith("== ")
    assert n_checks == nb_source_checks(nb), f"{source.name}: a checker did not run"
    assert text.count("NOT DONE (no answer yet") == n_checks, f"{source.name}: an exercise cell holds an answer"
    assert "\nPASS\n" not in text, f"{source.name}: a solution leaked into the learner's path"
    results = [o for o in outputs if o.output_type == "execute_result"]
    assert not [r for r in results if "text/plain" in r.get("data", {}) and "image/png" not in r["data"]], (
        f"{source.name}: a cell echoes a value under its output: {[r['data']['text/plain'] for r in results][:3]}")
    _check_claims(source.stem, text)
    assert seconds < LESSON_LIMIT_S, (f"{source.name} took {seconds:.0f} s in fast mode; keep each lesson well under "
                                      f"a minute")


CELL_TIMEOUT = 180  # seconds a cell may run: every fast-mode lesson takes well under a minute in all


def _execute(source: Path):
    """(executed notebook, seconds). A kernel that stops answering is restarted once with a fresh kernel, and the
    time reported is the run that finished, so the budget tests still measure the lesson. nbclient sometimes waits
    on an idle kernel: it raised (a dead kernel, a cell timeout) on lesson 3 in two CI runs, and in one run of eight
    of lesson 3 alone it sat ~180 s (the cell timeout) and then went on without an error, so a first run over the
    lesson's limit counts as a stall too: a lesson that is really slow is slow again and fails."""
    for attempt in (1, 2):
        nb = jupytext.read(source)
        client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                                         resources={"metadata": {"path": str(LESSONS)}})
        start = time.perf_counter()
        try:
            client.execute()
        except (nbclient.exceptions.CellTimeoutError, nbclient.exceptions.DeadKernelError, RuntimeError):
            if attempt == 2:
                raise
            print(f"{source.name}: the kernel stopped answering; running the lesson again with a fresh kernel")
            continue
        seconds = time.perf_counter() - start
        if attempt == 1 and seconds >= LESSON_LIMIT_S:
            print(f"{source.name}: {seconds:.0f} s, over the {LESSON_LIMIT_S:.0f}-s limit (a stalled kernel?); "
                  f"running the lesson again with a fresh kernel")
            continue
        return nb, seconds


def nb_source_checks(nb) -> int:
    """How many checker calls (``exercises.check_...(``) the lesson's code cells make."""
    return sum(len(re.findall(r"^exercises\.check_(?!grad\b)\w+\(", c.source, flags=re.MULTILINE))
               for c in nb.cells if c.cell_type == "code")


@pytest.mark.slow
def test_all_lessons_fit_the_budget():
    """Every lesson in fast mode, one after another, in at most 10 minutes on 2 cores (when they all ran above)."""
    if len(TIMES) < len(SOURCES):
        pytest.skip(f"only {len(TIMES)} of {len(SOURCES)} lessons ran in this session")
    total = sum(TIMES.values())
    print("lesson times: " + ", ".join(f"{k[:2]} {v:.0f} s" for k, v in TIMES.items()) + f"; total {total:.0f} s")
    assert total <= TOTAL_BUDGET_S, f"the lessons took {total:.0f} s in fast mode (budget {TOTAL_BUDGET_S:.0f} s)"
