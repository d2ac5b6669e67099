"""Every reference in the repository can be followed from a clone of it.

Docstrings, lessons, help texts and the README cite the GLM paper, the official code, and the notes in docs/. A
citation of a file that is not in the repository (the engineers' own notes, a tracker's issue number) sends a
student nowhere, so this test reads every text file and fails on one. It also checks that every docs/ page and every
repository path that is cited exists.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUFFIXES = {".py", ".md", ".ipynb", ".txt", ".toml", ".cfg", ".cu", ".h", ".cpp", ".sh", ".yml", ".yaml", ".json"}
SKIP_DIRS = {".git", ".venv", "runs", "build", "dist", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis",
             ".ipynb_checkpoints", ".benchmarks", "course_model"}

# Names are assembled from pieces so that this file does not match itself.
OUTSIDE_NOTES = ["GLM-" + "REFERENCE", "PERFORMANCE" + ".md", "STYLE" + ".md", "DESIGN" + ".md", "PROBES" + ".md",
                 "TOOLING" + ".md", "../" + "shared", "/work/" + "shared"]
ISSUE = re.compile(r"\b" + "issue" + r"s?\s*#?\d+", re.IGNORECASE)
REPO_PATH = re.compile(r"\b((?:minglm|viz|lessons|tests|docs)/[\w/.-]*\w\.(?:py|md|cu|ipynb|npz))\b")


def text_files() -> list[Path]:
    out = []
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT)
        if any(part in SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts[:-1]):
            continue
        if path.is_file() and (path.suffix in SUFFIXES or rel.parts[0] == ".ci") and path.name != Path(__file__).name:
            out.append(path)
    return sorted(out)


def test_there_are_files_to_read():
    names = {p.relative_to(ROOT).as_posix() for p in text_files()}
    assert {"README.md", "minglm/model.py", "docs/mask.md", "lessons/01_autograd.py"} <= names


def test_nothing_cites_a_file_outside_the_repository():
    found = []
    for path in text_files():
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            hits = [name for name in OUTSIDE_NOTES if name in line] + ISSUE.findall(line)
            if hits:
                found.append(f"{path.relative_to(ROOT)}:{n}: {', '.join(hits)}")
    assert not found, ("cite the GLM paper, the official code (file and function) or a page of docs/ instead:\n"
                       + "\n".join(found[:40]))


def test_every_cited_repository_path_exists():
    missing = set()
    for path in text_files():
        for cited in REPO_PATH.findall(path.read_text(encoding="utf-8", errors="replace")):
            if not (ROOT / cited).exists():
                missing.add(f"{path.relative_to(ROOT)} cites {cited}")
    assert not missing, "\n".join(sorted(missing))
