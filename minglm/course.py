"""The course model: a trained GLM that ships inside the package, so a student sees real fills without training.

It is an ordinary run folder (config.json, tokenizer.json, ckpt/step_N.npz + .json: see minglm/runs.py) under
``minglm/course_model/``, loaded by ``load_run("course")`` with the same checks as any run, plus ``MANIFEST.json``:
the command that trained it, the git commit it was trained at, the SHA-256 of every file, and its fill-benchmark
table. ``python -m minglm bundle RUN`` writes such a folder from a finished run; ``verify_bundle`` checks it.

The checkpoint of the bundle holds the weights only (no optimizer state), which keeps it small enough to commit.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from minglm.checkpoint import CheckpointError, sha256_file, write_json_atomic
from minglm.runs import BUNDLED_RUNS, load_run, save_run

COURSE_NAME = "course"  # what a user types: python -m minglm fill course "..."
COURSE_DIR = BUNDLED_RUNS[COURSE_NAME]
MANIFEST = "MANIFEST.json"


def git_commit(where: Path) -> str | None:
    """The commit checked out at ``where`` (None outside a git work tree), with ``+dirty`` for local changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def make_bundle(run_dir, dest, command: str, fill_report: dict | None = None, commit: str | None = None) -> dict:
    """Write ``dest`` as a weights-only copy of ``run_dir``'s newest checkpoint with its manifest; returns it.

    ``command`` is recorded as given (the command that trained the run); ``fill_report`` is its fill benchmark
    (``FillReport.to_dict()``), stored so that the README's table can be checked against the bundle; ``commit`` is
    the git commit the run was trained at (None: the commit checked out where this package lives).
    """
    run_dir, dest = Path(run_dir), Path(dest)
    model, tokenizer = load_run(run_dir)
    record = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    steps = sorted(int(p.stem.split("_")[1]) for p in (run_dir / "ckpt").glob("step_*.json"))
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_run(model, tokenizer, tmp, step=steps[-1] if steps else 0)
    write_json_atomic(tmp / "config.json", record)  # the run's own config, training settings included
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    manifest = {
        "name": COURSE_NAME,
        "command": command,
        "git_commit": commit or git_commit(Path(__file__).resolve().parent),
        "source_run": run_dir.name,
        "files": {str(p.relative_to(tmp)): sha256_file(p) for p in files},
        "fill_eval": fill_report,
    }
    write_json_atomic(tmp / MANIFEST, manifest)
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return manifest


def verify_bundle(dest=COURSE_DIR) -> dict:
    """The manifest of ``dest`` after checking that every file it lists has its SHA-256 and nothing is missing."""
    dest = Path(dest)
    path = dest / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"verify_bundle: {dest} has no {MANIFEST}")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    for name, digest in manifest.get("files", {}).items():
        f = dest / name
        if not f.is_file():
            raise CheckpointError(f"verify_bundle: {f} is listed in {MANIFEST} but missing")
        if sha256_file(f) != digest:
            raise CheckpointError(f"verify_bundle: {f} does not have the SHA-256 its manifest records")
    return manifest
