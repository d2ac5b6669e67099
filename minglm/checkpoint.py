"""Checkpoints that survive a crash: ``step_N.npz`` (the arrays) + ``step_N.json`` (what they are), written atomically.

A checkpoint is a pair of files in one folder:
- ``step_N.npz``: every array (parameters, optimizer moments, ...) in NumPy's plain ``.npz`` format, read back with
  ``np.load(..., allow_pickle=False)`` so a file can never run code;
- ``step_N.json``: the step, the npz's file name and SHA-256, the name/shape/dtype of every array, and ``meta``
  (config, tokenizer, RNG state, data position, ... whatever the caller passes; it must be JSON).

Why it is crash-safe: each file is written to a temporary file *in the same folder*, flushed and fsync'ed, then
``os.replace``'d onto its final name (an atomic rename on POSIX). The JSON is written last and acts as the commit
record: a crash before it leaves no JSON (the pair is ignored), and a crash that leaves a JSON beside a different or
torn npz is caught by the SHA-256. ``load_checkpoint`` checks the hash, the array names, shapes and dtypes, and
(when asked) the config and vocabulary *before* returning anything, so a caller never half-loads a model. The record
must also agree with itself: its step with its file name and with ``meta["step"]`` (an edited step would resume at
the wrong point). No write ever goes through a symbolic link (``atomic_write`` refuses one): a link planted in a
run folder cannot redirect a write to a file elsewhere.

A model and its tokenizer are loaded from a run folder by ``minglm.runs.load_run``, built on ``load_checkpoint``.
Left out: sharded checkpoints, safetensors, async saving and cloud storage. Reference: NumPy's
``np.savez`` and ``np.load(allow_pickle=False)``, POSIX ``rename`` (atomic within one file system).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT = "minglm-checkpoint"
VERSION = 1
_NAME_RE = re.compile(r"^step_(\d+)\.json$")


class CheckpointError(ValueError):
    """A checkpoint is missing, torn, corrupt, or does not fit what the caller expects."""


@dataclass
class Checkpoint:
    """A verified checkpoint, fully in memory."""

    step: int
    arrays: dict[str, np.ndarray]
    meta: dict
    path: Path  # the step_N.json file
    info: dict = field(default_factory=dict)  # the whole JSON record


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    """Make the renames in ``path`` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write) -> Path:
    """Call ``write(file)`` on a temp file beside ``path``, fsync it, and rename it onto ``path`` atomically.

    A ``path`` that is a symbolic link is refused: writing through it would change a file somewhere else (a link
    planted in a run folder must never redirect a write). The rename replaces only the name in this folder.
    """
    path = Path(path)
    if path.is_symlink():
        raise ValueError(f"refusing to write {path}: it is a symbolic link (to {os.readlink(path)!r})")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a checkpoint is an ordinary readable file
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def write_json_atomic(path, obj, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (also used for config.json and summary.json)."""
    path = Path(path)
    data = (json.dumps(obj, indent=indent, ensure_ascii=False, allow_nan=False) + "\n").encode()
    atomic_write(path, lambda f: f.write(data))


def checkpoint_steps(directory) -> list[int]:
    """The steps that have a ``step_N.json`` in ``directory``, ascending (not verified)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    steps = [int(m.group(1)) for p in directory.iterdir() if (m := _NAME_RE.match(p.name))]
    return sorted(steps)


def save_checkpoint(directory, step: int, arrays: dict, meta: dict, keep: int | None = None) -> Path:
    """Write ``step_N.npz`` + ``step_N.json`` atomically into ``directory``; keep only the last ``keep`` (None: all).

    ``arrays`` maps names to arrays (NumPy; CuPy arrays are copied to the host); ``meta`` must be JSON-serialisable.
    Returns the path of the JSON record.
    """
    if not isinstance(step, int | np.integer) or step < 0:
        raise ValueError(f"save_checkpoint: step must be a non-negative int, got {step!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    host = {}
    for name, a in arrays.items():
        a = a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)
        if a.dtype == object:
            raise ValueError(f"save_checkpoint: array {name!r} has dtype object, which cannot be saved without pickle")
        host[name] = a
    try:  # fail before writing anything when the meta cannot be stored
        json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"save_checkpoint: meta must be JSON-serialisable without NaN/inf ({e})") from e
    step = int(step)
    npz_path = directory / f"step_{step}.npz"
    json_path = directory / f"step_{step}.json"
    atomic_write(npz_path, lambda f: np.savez(f, **host))
    record = {
        "format": FORMAT,
        "version": VERSION,
        "step": step,
        "npz": npz_path.name,
        "sha256": sha256_file(npz_path),
        "arrays": {k: {"shape": list(v.shape), "dtype": v.dtype.str} for k, v in host.items()},
        "meta": meta,
    }
    write_json_atomic(json_path, record, indent=None)  # the commit record: written last
    _fsync_dir(directory)
    if keep is not None:
        prune_checkpoints(directory, keep)
    return json_path


def prune_checkpoints(directory, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (the JSON first, so no record ever points at a missing npz)."""
    if keep < 1:
        raise ValueError(f"prune_checkpoints: keep must be >= 1, got {keep}")
    directory = Path(directory)
    for step in checkpoint_steps(directory)[:-keep]:
        for suffix in (".json", ".npz"):
            try:
                (directory / f"step_{step}{suffix}").unlink()
            except FileNotFoundError:
                pass
    # leftovers of a crash mid-write: temp files of ours that were never renamed
    for p in directory.glob(".step_*.tmp"):
        try:
            p.unlink()
        except OSError:
            pass


def _resolve(path_or_dir) -> Path:
    """A step_N.json path from a checkpoint folder (its newest valid one), a .json or a .npz path."""
    p = Path(path_or_dir)
    if p.is_dir():
        latest = latest_checkpoint(p)
        if latest is None:
            raise CheckpointError(f"load_checkpoint: no valid checkpoint in {p}")
        return latest
    if p.suffix == ".npz":
        p = p.with_suffix(".json")
    if not p.is_file():
        raise CheckpointError(f"load_checkpoint: {p} does not exist (a checkpoint is step_N.npz + step_N.json)")
    return p


def _read_record(json_path: Path) -> dict:
    try:
        record = json.loads(json_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"load_checkpoint: {json_path} is not a readable JSON record ({e})") from e
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(f"load_checkpoint: {json_path} is not a {FORMAT} record")
    if record.get("version") != VERSION:
        raise CheckpointError(f"load_checkpoint: {json_path} has version {record.get('version')}, expected {VERSION}")
    for key in ("step", "npz", "sha256", "arrays", "meta"):
        if key not in record:
            raise CheckpointError(f"load_checkpoint: {json_path} lacks the field {key!r}")
    # the record must agree with itself: an edited step would resume at the wrong point of the schedule and the data
    named = _NAME_RE.match(json_path.name)
    step = record["step"]
    if not isinstance(step, int) or isinstance(step, bool) or (named and int(named.group(1)) != step):
        raise CheckpointError(f"load_checkpoint: {json_path} records step {step!r}, its file name says "
                              f"{named.group(1) if named else '?'}")
    meta = record["meta"]
    if not isinstance(meta, dict) or not isinstance(record["arrays"], dict):
        raise CheckpointError(f"load_checkpoint: {json_path} has a meta or arrays field that is not an object")
    if "step" in meta and meta["step"] != step:
        raise CheckpointError(f"load_checkpoint: {json_path} records step {step} but its meta says step "
                              f"{meta['step']!r}")
    return record


def _check_digest(json_path: Path, record: dict, npz_path: Path, digest: str) -> None:
    if digest != record["sha256"]:
        raise CheckpointError(
            f"load_checkpoint: {npz_path} is corrupt or torn: SHA-256 {digest[:12]}… does not match the recorded "
            f"{record['sha256'][:12]}… in {json_path.name}"
        )


def _npz_path(json_path: Path, record: dict) -> Path:
    if not isinstance(record["npz"], str) or Path(record["npz"]).name != record["npz"]:
        raise CheckpointError(f"load_checkpoint: {json_path} names an npz outside its folder: {record['npz']!r}")
    npz_path = json_path.parent / record["npz"]
    if not npz_path.is_file():
        raise CheckpointError(f"load_checkpoint: {npz_path} is missing (named by {json_path.name})")
    return npz_path


def verify_checkpoint(json_path) -> dict:
    """Check that the npz named by ``json_path`` exists and has the recorded SHA-256; return the record."""
    json_path = Path(json_path)
    record = _read_record(json_path)
    npz_path = _npz_path(json_path, record)
    try:
        digest = sha256_file(npz_path)
    except OSError as e:  # removed or unreadable since the check above
        raise CheckpointError(f"load_checkpoint: cannot read {npz_path} ({e.strerror})") from e
    _check_digest(json_path, record, npz_path, digest)
    return record


def checkpoint_problems(directory) -> tuple[Path | None, list[str]]:
    """(the step_N.json of the newest checkpoint that verifies or None, why each newer one was skipped)."""
    skipped = []
    for step in reversed(checkpoint_steps(directory)):
        path = Path(directory) / f"step_{step}.json"
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            skipped.append(str(e).removeprefix("load_checkpoint: "))
            continue
        return path, skipped
    return None, skipped


def latest_checkpoint(directory) -> Path | None:
    """The step_N.json of the newest checkpoint in ``directory`` whose npz verifies, or None."""
    return checkpoint_problems(directory)[0]


def _check_expect(meta: dict, expect: dict, where: Path) -> None:
    for key, want in expect.items():
        got = meta.get(key)
        if got != want:
            if isinstance(want, dict) and isinstance(got, dict):
                diffs = [f"{k}: checkpoint {got.get(k)!r} vs expected {want.get(k)!r}"
                         for k in sorted(set(want) | set(got)) if got.get(k) != want.get(k)]
                detail = "; ".join(diffs[:6])
            else:
                detail = f"checkpoint {got!r} vs expected {want!r}"
            raise CheckpointError(f"load_checkpoint: {where.name} was saved with another {key} ({detail})")


def load_checkpoint(path_or_dir, expect: dict | None = None, expect_arrays: dict | None = None) -> Checkpoint:
    """Load and verify a checkpoint (a folder → its newest valid one, or a step_N.json / step_N.npz path).

    Checks, in order, before returning: the record, the SHA-256 of the npz, that the npz opens without pickle and
    holds exactly the recorded arrays with the recorded shapes and dtypes, that ``meta[key] == value`` for every item
    of ``expect`` (e.g. the model config and the vocabulary), and that ``expect_arrays`` (name -> shape) match. Any
    failure raises ``CheckpointError`` and nothing has been touched.
    """
    json_path = _resolve(path_or_dir)
    record = _read_record(json_path)
    npz_path = _npz_path(json_path, record)
    # one open file for the hash and the arrays: a writer that replaces the npz meanwhile (os.replace) cannot make
    # us verify one file and read another
    try:
        f = open(npz_path, "rb")  # noqa: SIM115 - closed by the with below
    except OSError as e:
        raise CheckpointError(f"load_checkpoint: cannot open {npz_path} ({e.strerror})") from e
    with f:
        h = hashlib.sha256()
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
        _check_digest(json_path, record, npz_path, h.hexdigest())
        f.seek(0)
        try:
            with np.load(f, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
            raise CheckpointError(f"load_checkpoint: cannot read {npz_path} ({type(e).__name__}: {e})") from e
    listed = record["arrays"]
    if set(arrays) != set(listed):
        missing, extra = sorted(set(listed) - set(arrays)), sorted(set(arrays) - set(listed))
        raise CheckpointError(f"load_checkpoint: {npz_path.name} arrays differ from the record "
                              f"(missing {missing[:5]}, unexpected {extra[:5]})")
    for k, a in arrays.items():
        if not isinstance(listed[k], dict) or list(a.shape) != listed[k].get("shape") \
                or a.dtype.str != listed[k].get("dtype"):
            raise CheckpointError(f"load_checkpoint: array {k!r} is {a.dtype.str} {list(a.shape)}, the record says "
                                  f"{listed[k]['dtype']} {listed[k]['shape']}")
    meta = record["meta"]
    if expect:
        _check_expect(meta, expect, json_path)
    if expect_arrays:
        for k, shape in expect_arrays.items():
            if k not in arrays:
                raise CheckpointError(f"load_checkpoint: {json_path.name} has no array {k!r}")
            if tuple(arrays[k].shape) != tuple(shape):
                raise CheckpointError(f"load_checkpoint: array {k!r} has shape {tuple(arrays[k].shape)} in "
                                      f"{json_path.name}, expected {tuple(shape)}")
    return Checkpoint(step=int(record["step"]), arrays=arrays, meta=meta, path=json_path, info=record)
