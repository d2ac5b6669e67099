"""Run folders: the one way to load a trained model, and to save one so the commands can load it.

A run folder, as ``python -m minglm train`` writes it::

    runs/<name>/config.json          {"preset": ..., "model": {GLMConfig fields}, "train": {TrainConfig fields}}
    runs/<name>/tokenizer.json       the tokenizer (minglm/tokenizer.py)
    runs/<name>/ckpt/step_N.npz      the arrays: parameters under "model/<name>", optimizer state beside them
    runs/<name>/ckpt/step_N.json     the record of that npz (minglm/checkpoint.py) and its meta
    runs/<name>/log.jsonl, summary.json, plots/

The checkpoint is the truth. Its meta records the model config it was trained with and the SHA-256 of the
vocabulary (``run_meta``); ``load_run`` builds the model from that record and then checks that config.json and
tokenizer.json still say the same thing. An edited config.json (say ``n_head`` 4 → 8) would otherwise give the same
weights another meaning: attention would split them into other heads and every logit would change silently.

Left out: loading a bare .npz without its JSON record (it cannot be verified; ``minglm.interop`` reads plain weight
files), and run folders on remote storage.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from minglm.backend import device_xp
from minglm.checkpoint import (
    CheckpointError,
    checkpoint_steps,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    write_json_atomic,
)
from minglm.model import GLM, GLMConfig
from minglm.tokenizer import load_tokenizer, tokenizer_record


def run_meta(config: GLMConfig, tokenizer) -> dict:
    """What every checkpoint of a run records about its model and vocabulary; ``load_run`` checks against it."""
    tok_json, vocab_sha = tokenizer_record(tokenizer)
    return {"model_config": config.to_dict(), "vocab_sha256": vocab_sha, "vocab_size": tokenizer.vocab_size,
            "tokenizer": tok_json}


def save_run(model: GLM, tokenizer, run_dir, step: int = 0) -> Path:
    """Write ``model`` and ``tokenizer`` as a run folder that ``load_run`` and every command can read (for a model
    trained in a notebook, or a test). Returns the checkpoint's JSON record."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / "config.json", {"preset": None, "model": model.config.to_dict(), "train": {}})
    tokenizer.save(run_dir / "tokenizer.json")
    arrays = {f"model/{k}": v for k, v in model.state_dict().items()}
    return save_checkpoint(run_dir / "ckpt", step, arrays, run_meta(model.config, tokenizer))


# Runs that come with minglm, by the name a user types (when no folder of that name exists here).
BUNDLED_RUNS = {"course": Path(__file__).resolve().parent / "course_model"}


def resolve_run(path) -> tuple[Path, Path]:
    """(run folder, checkpoint record step_N.json) for a run folder (its newest valid checkpoint), one checkpoint
    (``ckpt/step_N.npz`` or ``.json``), or the name of a bundled run (``course``: see minglm/course.py)."""
    p = Path(path)
    if not p.exists() and str(path) in BUNDLED_RUNS:
        p = BUNDLED_RUNS[str(path)]
        if not p.is_dir():
            raise FileNotFoundError(f"load_run: the bundled {path!r} model is missing from {p}; reinstall minglm")
    if not p.exists():
        raise FileNotFoundError(f"load_run: no such run folder or checkpoint: {str(path)!r}")
    if p.is_dir():
        if not (p / "ckpt").is_dir():
            raise FileNotFoundError(f"load_run: {str(path)!r} is not a run folder (it has no ckpt/ folder)")
        record = latest_checkpoint(p / "ckpt")
        if record is None:
            raise FileNotFoundError(f"load_run: {p / 'ckpt'} holds no checkpoint that verifies (step_N.npz + .json)")
        return p, record
    if p.suffix not in (".npz", ".json"):
        raise FileNotFoundError(f"load_run: {str(path)!r} is neither a run folder nor a checkpoint step_N.npz")
    return p.parent.parent, p.with_suffix(".json")


def _differences(saved: dict, truth: dict) -> str:
    keys = sorted(k for k in set(saved) | set(truth) if saved.get(k) != truth.get(k))
    return ", ".join(f"{k}={saved.get(k)!r} (checkpoint: {truth.get(k)!r})" for k in keys)


def load_run(path, device: str = "cpu") -> tuple[GLM, object]:
    """(model, tokenizer) of a run folder (its newest valid checkpoint) or of one checkpoint, in eval mode.

    Built on ``checkpoint.load_checkpoint``, which verifies the SHA-256, the array names, shapes and dtypes. The
    model config comes from the checkpoint's record; config.json and tokenizer.json must agree with it, else a
    ``CheckpointError`` (a ValueError) in one line says what differs. ``device``: "cpu", "gpu" or "auto".
    """
    run_dir, record = resolve_run(path)
    ckpt = load_checkpoint(record)
    where = f"{ckpt.path.parent.parent.name}/ckpt/{ckpt.path.name}"
    for key in ("model_config", "vocab_sha256"):
        if key not in ckpt.meta:
            raise CheckpointError(f"load_run: {where} does not record its {key}; it was not written by a minglm run")
    config = GLMConfig.from_dict(ckpt.meta["model_config"])

    for need in ("config.json", "tokenizer.json"):
        if not (run_dir / need).is_file():
            raise FileNotFoundError(f"load_run: the run folder {str(run_dir)!r} has no {need}")
    saved = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    try:
        saved_config = GLMConfig.from_dict(saved.get("model", {})).to_dict()
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"load_run: {run_dir / 'config.json'} has an invalid model config ({e})") from e
    if saved_config != config.to_dict():
        raise CheckpointError(f"load_run: {run_dir / 'config.json'} disagrees with {where}: "
                              f"{_differences(saved_config, config.to_dict())}; the checkpoint is what was trained")
    tokenizer = load_tokenizer(run_dir / "tokenizer.json")
    if tokenizer_record(tokenizer)[1] != ckpt.meta["vocab_sha256"]:
        raise CheckpointError(f"load_run: {run_dir / 'tokenizer.json'} is not the vocabulary {where} was trained with")

    model = GLM(config, np.random.default_rng(0))
    state = {k[len("model/"):]: v for k, v in ckpt.arrays.items() if k.startswith("model/")}
    try:
        model.load_state_dict(state, strict=True)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"load_run: {where} does not fit its own model config ({e})") from e
    model.eval()
    if device_xp(device) is not np:
        model.to("gpu")
    return model, tokenizer


def newest_run(out="runs") -> Path | None:
    """The run folder under ``out`` whose newest checkpoint was written last, or None when there is none."""
    out = Path(out)
    if not out.is_dir():
        return None
    found = []
    for run in out.iterdir():
        steps = checkpoint_steps(run / "ckpt")
        if steps and (run / "tokenizer.json").is_file():
            found.append(((run / "ckpt" / f"step_{steps[-1]}.json").stat().st_mtime, run))
    return max(found)[1] if found else None
