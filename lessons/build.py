"""Build the lesson notebooks (.ipynb) from their jupytext ``py:percent`` sources, byte for byte reproducibly.

The ``.py`` files in this folder are the lessons; the ``.ipynb`` files next to them are generated for students who
open them in Jupyter. A build gives every cell a fixed id (``c000``, ``c001``, ...), no outputs, no execution
counts and a fixed notebook header, so building twice gives identical bytes and CI can tell when a committed
notebook is out of date with its source.

    python lessons/build.py           # rewrite every lessons/NN_*.ipynb
    python lessons/build.py --check   # exit 1 and name the stale notebooks, write nothing

Left out on purpose: executing the notebooks (tests/test_lessons.py does that) and the solutions folder, which is
not a lesson.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import jupytext
import nbformat

LESSONS_DIR = Path(__file__).resolve().parent
LESSON_NAME = re.compile(r"^\d\d_[a-z0-9_]+\.py$")  # 01_autograd.py, 02_blank_infilling.py, ...

# The same header for every notebook: the python3 kernel, and the pairing with the .py source for jupytext users.
NOTEBOOK_METADATA = {
    "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
    "jupytext": {"formats": "ipynb,py:percent"},
}


def lesson_sources(folder: Path = LESSONS_DIR) -> list[Path]:
    """The lesson sources in teaching order (their names start with a two-digit number)."""
    return sorted(p for p in folder.iterdir() if LESSON_NAME.match(p.name))


def build_notebook(source: Path) -> str:
    """The .ipynb text for one lesson source: stable cell ids, no outputs, a fixed header, a final newline."""
    text_nb = jupytext.read(source, fmt="py:percent")
    nb = nbformat.v4.new_notebook()
    nb.metadata = nbformat.from_dict(NOTEBOOK_METADATA)
    for i, cell in enumerate(text_nb.cells):
        tags = list(cell.metadata.get("tags", []))
        metadata = {"tags": tags} if tags else {}
        if cell.cell_type == "markdown":
            new = nbformat.v4.new_markdown_cell(cell.source, metadata=metadata)
        elif cell.cell_type == "code":
            new = nbformat.v4.new_code_cell(cell.source, metadata=metadata)
        else:
            new = nbformat.v4.new_raw_cell(cell.source, metadata=metadata)
        new.id = f"c{i:03d}"
        nb.cells.append(new)
    nbformat.validate(nb)
    return nbformat.writes(nb) + "\n"


def target_of(source: Path) -> Path:
    return source.with_suffix(".ipynb")


def stale_notebooks(folder: Path = LESSONS_DIR) -> list[Path]:
    """Notebooks that are missing or differ from what their source builds to."""
    stale = []
    for src in lesson_sources(folder):
        target = target_of(src)
        if not target.exists() or target.read_text(encoding="utf-8") != build_notebook(src):
            stale.append(target)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale notebooks (exit 1 if any)")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_notebooks()
        for path in stale:
            print(f"stale: {path.name} (run python lessons/build.py)")
        return 1 if stale else 0
    for src in lesson_sources():
        target = target_of(src)
        text = build_notebook(src)
        if not target.exists() or target.read_text(encoding="utf-8") != text:
            target.write_text(text, encoding="utf-8")
            print(f"wrote {target.name}")
        else:
            print(f"up to date: {target.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
