"""Run folders: the one way to load a trained model, to save one so the commands can load it, and to write one safely.

A run folder, as ``python -m minglm train`` writes it::

    runs/<name>/config.json          {"preset": ..., "model": {GLMConfig fields}, "train": {TrainConfig fields}}
    runs/<name>/tokenizer.json       the tokenizer (minglm/tokenizer.py)
    runs/<name>/ckpt/step_N.npz      the arrays: parameters under "model/<name>", optimizer state beside them
    runs/<name>/ckpt/step_N.json     the record of that npz (minglm/checkpoint.py) and its meta
    runs/<name>/log.jsonl, summary.json, plots/
    runs/<name>/run.lock             held (``fcntl.flock``) by the one process that writes the run; it names it

The checkpoint is the truth. Its meta records the model config it was trained with, the SHA-256 of the vocabulary
(``run_meta``) and, for a trained run, its training config; ``check_run`` builds the model config from that record,
checks it against the checkpoint's own array shapes (before anything is allocated), and then checks that
config.json and tokenizer.json still say the same thing. An edited config.json (say ``n_head`` 4 → 8) would
otherwise give the same weights another meaning: attention would split them into other heads and every logit would
change silently. Every command that reads a run goes through ``load_run`` or ``check_run``.

One writer per run folder: ``run_lock`` takes an exclusive ``flock`` on ``run.lock`` for as long as a command writes
the run (the kernel drops it when the process ends, even by ``kill -9``); a second writer gets a one-line
``RunBusy`` that names the process holding it. Readers take no lock: a checkpoint appears by an atomic rename, so a
reader sees the old one or the new one, never half of one. Nothing is written through a symbolic link
(``check_no_links``, ``checkpoint.atomic_write``).

``resume_point`` picks the checkpoint ``train --resume`` continues from: the newest one that verifies and that
log.jsonl covers (or the one ``--from step_N`` names), and says why newer ones were passed over.

What a new run is made of, from its TrainConfig: ``make_tokenizer`` (the tokenizer it learns from the corpus) and
``objective_overrides`` (the data settings its loaders take); ``train`` and ``bench data`` build runs' data with them.

Left out: loading a bare .npz without its JSON record (it cannot be verified; ``minglm.interop`` reads plain weight
files), run folders on remote storage, and locking on Windows (no ``fcntl``: one writer is then the user's care).
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from minglm.backend import device_xp
from minglm.checkpoint import (
    Checkpoint,
    CheckpointError,
    checkpoint_steps,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
    write_json_atomic,
)
from minglm.config import TrainConfig, check_types, make_train_config
from minglm.data.objectives import GLM_PRESETS
from minglm.model import GLM, GLMConfig
from minglm.tokenizer import BPETokenizer, CharTokenizer, WordTokenizer, load_tokenizer, tokenizer_record

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None

LOCK_NAME = "run.lock"
# the parts of a run folder that commands write; none may be a symbolic link
RUN_PARTS = ("config.json", "tokenizer.json", "log.jsonl", "summary.json", "ckpt", "plots", LOCK_NAME)
# TrainConfig fields that ``train --resume`` may change (its flags); every other field is fixed by the checkpoint
RESUMABLE_FIELDS = ("steps", "device", "eval_every", "ckpt_every", "keep", "time_limit")


class RunBusy(ValueError):
    """Another process holds the run folder's lock."""


# --------------------------------------------------------------------------------------------------------------
# Reading a run folder's files
# --------------------------------------------------------------------------------------------------------------


def read_json(path) -> dict:
    """The JSON object in ``path``; a one-line ValueError naming the file when it is missing, not JSON or not an
    object (instead of a bare ``JSONDecodeError`` that says neither)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def model_config_from(values, where: str) -> GLMConfig:
    """A GLMConfig from a dict read from a file, with every wrong type or value named in one line."""
    if not isinstance(values, dict):
        raise ValueError(f"{where}: the model config must be a JSON object, got {type(values).__name__}")
    check_types(values, GLMConfig, where)
    try:
        return GLMConfig.from_dict(values)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from e


def check_config_fits(config: GLMConfig, shapes: dict, where: str) -> None:
    """Refuse a model config whose sizes are not those of the checkpoint's arrays (name -> shape), before a model
    is built: a crafted ``d_model`` of 65,536 would otherwise allocate gigabytes before any shape is compared."""
    C, L = config.d_model, config.n_layer
    want = {"model/word_embeddings.weight": (config.vocab_size, C),
            "model/layers.0.attention.query_key_value.weight": (3 * C, C),
            "model/layers.0.mlp.dense_4h_to_h.weight": (C, config.ffn_size),
            f"model/layers.{L - 1}.input_layernorm.weight": (C,)}
    if config.position == "learned2d":
        want["model/position_embeddings.weight"] = (config.max_len + 1, C)
    for name, shape in want.items():
        got = shapes.get(name)
        if got is None or tuple(got) != shape:
            raise CheckpointError(f"{where}: the model config (d_model={C}, n_layer={L}, vocab_size="
                                  f"{config.vocab_size}, max_len={config.max_len}) does not fit the checkpoint's "
                                  f"arrays: {name.removeprefix('model/')} is {None if got is None else tuple(got)}, "
                                  f"the config needs {shape}")
    if f"model/layers.{L}.input_layernorm.weight" in shapes:
        raise CheckpointError(f"{where}: the checkpoint has more than n_layer={L} layers")


def _differences(saved: dict, truth: dict) -> str:
    keys = sorted(k for k in set(saved) | set(truth) if saved.get(k) != truth.get(k))
    return ", ".join(f"{k}={saved.get(k)!r} (checkpoint: {truth.get(k)!r})" for k in keys)


def check_run(run_dir, ckpt: Checkpoint) -> tuple[GLMConfig, object, dict]:
    """(model config, tokenizer, config.json) of a run folder, checked against one of its loaded checkpoints.

    The model config is the checkpoint's, and must fit its arrays; config.json's model section must equal it, and
    its train section must equal the training config the checkpoint recorded (but for ``RESUMABLE_FIELDS``);
    tokenizer.json must be the vocabulary the checkpoint recorded. Any difference is a one-line CheckpointError.
    """
    run_dir = Path(run_dir)
    where = f"{run_dir.name}/ckpt/{ckpt.path.name}"
    for key in ("model_config", "vocab_sha256"):
        if key not in ckpt.meta:
            raise CheckpointError(f"load_run: {where} does not record its {key}; it was not written by a minglm run")
    config = model_config_from(ckpt.meta["model_config"], f"{where} model_config")
    check_config_fits(config, {k: a.shape for k, a in ckpt.arrays.items()}, f"load_run: {where}")

    for need in ("config.json", "tokenizer.json"):
        if not (run_dir / need).is_file():
            raise FileNotFoundError(f"load_run: the run folder {str(run_dir)!r} has no {need}")
    saved = read_json(run_dir / "config.json")
    saved_config = model_config_from(saved.get("model", {}), f"{run_dir / 'config.json'} model").to_dict()
    if saved_config != config.to_dict():
        raise CheckpointError(f"load_run: {run_dir / 'config.json'} disagrees with {where}: "
                              f"{_differences(saved_config, config.to_dict())}; the checkpoint is what was trained")
    if isinstance(ckpt.meta.get("train_config"), dict):
        try:
            saved_train = make_train_config(saved.get("train") or {}).to_dict()
        except (TypeError, ValueError) as e:
            raise ValueError(f"{run_dir / 'config.json'} train: {e}") from e
        try:
            trained = make_train_config(ckpt.meta["train_config"]).to_dict()
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"load_run: {where} records an invalid train_config ({e})") from e
        for key in RESUMABLE_FIELDS:
            saved_train.pop(key)
            trained.pop(key)
        if saved_train != trained:
            raise CheckpointError(f"load_run: {run_dir / 'config.json'} disagrees with {where}: "
                                  f"{_differences(saved_train, trained)}; the checkpoint is what was trained")
    tokenizer = read_tokenizer(run_dir / "tokenizer.json")
    if tokenizer_record(tokenizer)[1] != ckpt.meta["vocab_sha256"]:
        raise CheckpointError(f"load_run: {run_dir / 'tokenizer.json'} is not the vocabulary {where} was trained with")
    return config, tokenizer, saved


def read_tokenizer(path):
    """``load_tokenizer`` with every fault of the file (not JSON, wrong types, unknown type) as one ValueError."""
    try:
        return load_tokenizer(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    except (AttributeError, KeyError, TypeError, ValueError, IndexError) as e:
        raise ValueError(f"{path} is not a valid tokenizer file ({type(e).__name__}: {e})") from None


def make_tokenizer(cfg: TrainConfig, corpus):
    """A new run's tokenizer: every character of the corpus, or byte-level BPE or whole words learned on the train
    documents."""
    if cfg.tokenizer == "bpe":
        return BPETokenizer.train(corpus.train, vocab_size=cfg.bpe_vocab)
    if cfg.tokenizer == "word":
        return WordTokenizer.train(corpus.train, vocab_size=cfg.bpe_vocab)
    return CharTokenizer.from_texts(corpus.docs)


def objective_overrides(cfg: TrainConfig) -> dict:
    """Data settings from the config that the loader and the objective take (mask_ratio: the GLM mixtures and BERT
    only; window_start: every objective). ``line_windows`` is not among them: only the training loader cuts windows
    to lines, while validation and the unigram baseline read whole windows, comparable between runs. ``all_words``
    is: it changes what the model is asked, so validation asks the same."""
    windows = {"window_start": cfg.window_start}
    if cfg.objective in GLM_PRESETS:
        return {"mask_ratio": cfg.mask_ratio, "span_unit": cfg.span_unit, "span_lambda": cfg.span_lambda,
                "all_words": cfg.all_words, **windows}
    if cfg.span_unit != "token" or cfg.span_lambda != TrainConfig.span_lambda or cfg.all_words:
        raise ValueError("TrainConfig.span_unit, span_lambda and all_words apply to the glm-* objectives only")
    if cfg.objective == "bert":
        return {"mask_ratio": cfg.mask_ratio, **windows}
    if cfg.mask_ratio != TrainConfig.mask_ratio:
        raise ValueError(f"TrainConfig.mask_ratio does not apply to the {cfg.objective!r} objective")
    return windows


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
    check_no_links(run_dir)
    write_json_atomic(run_dir / "config.json", {"preset": None, "model": model.config.to_dict(), "train": {}})
    write_json_atomic(run_dir / "tokenizer.json", tokenizer_record(tokenizer)[0], indent=None)
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


def load_run(path, device: str = "cpu") -> tuple[GLM, object]:
    """(model, tokenizer) of a run folder (its newest valid checkpoint) or of one checkpoint, in eval mode.

    Built on ``checkpoint.load_checkpoint``, which verifies the SHA-256, the array names, shapes and dtypes, and on
    ``check_run``: the model config comes from the checkpoint's record and must fit its arrays; config.json and
    tokenizer.json must agree with it, else a ``CheckpointError`` (a ValueError) in one line says what differs.
    ``device``: "cpu", "gpu" or "auto".
    """
    for attempt in range(3):
        run_dir, record = resolve_run(path)
        try:
            ckpt = load_checkpoint(record)
            break
        except CheckpointError:
            # a writer pruned or replaced the checkpoint between choosing and reading it: choose again
            if attempt == 2 or not Path(path).is_dir():
                raise
    config, tokenizer, _ = check_run(run_dir, ckpt)
    where = f"{run_dir.name}/ckpt/{ckpt.path.name}"
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


def verify_run(path) -> Path:
    """The run folder of ``path`` after ``check_run`` against its newest checkpoint, for commands that read its
    config.json or tokenizer.json without building the model (plots). A run with no checkpoint yet has nothing to
    be checked against and is returned as it is."""
    p = Path(path)
    if p.is_dir() and not checkpoint_steps(p / "ckpt"):
        return p
    run_dir, record = resolve_run(path)
    check_run(run_dir, load_checkpoint(record))
    return run_dir


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


# --------------------------------------------------------------------------------------------------------------
# Writing a run folder: one writer, no symbolic links, a resume point the log agrees with
# --------------------------------------------------------------------------------------------------------------


def check_no_links(run_dir) -> None:
    """Refuse a run folder that is, or whose written parts are, symbolic links: a write would land elsewhere."""
    run_dir = Path(run_dir)
    for p in (run_dir, *(run_dir / part for part in RUN_PARTS)):
        if p.is_symlink():
            raise ValueError(f"{p} is a symbolic link (to {os.readlink(p)!r}); refusing to write through it")


def _holder_text() -> str:
    prog = "minglm" if sys.argv and sys.argv[0].endswith("__main__.py") else Path(sys.argv[0] if sys.argv else "").name
    command = " ".join([prog, *sys.argv[1:]])[:120]
    return f"process {os.getpid()} (`{command}`, since {time.strftime('%Y-%m-%d %H:%M:%S')})"


@contextmanager
def run_lock(run_dir):
    """Hold the run folder's exclusive lock for the ``with`` block, or raise ``RunBusy`` naming who holds it.

    ``fcntl.flock`` on ``run.lock``: the kernel releases it when the file is closed or the process dies (a crash
    or ``kill -9`` never leaves a stale lock). The file keeps the holder's pid and command line for the message.
    """
    path = Path(run_dir) / LOCK_NAME
    if fcntl is None:  # no flock on this platform
        yield path
        return
    check_no_links(run_dir)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 400, 0).decode("utf-8", "replace").strip() or "another process"
            raise RunBusy(f"{run_dir} is being written by {holder}; one writer per run folder: wait for it to end "
                          f"or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, (_holder_text() + "\n").encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock


def _log_lines(run_dir: Path) -> list[bytes]:
    """The complete lines of log.jsonl (a torn last line, without its newline, is not one)."""
    path = run_dir / "log.jsonl"
    data = path.read_bytes() if path.is_file() else b""
    return data.split(b"\n")[:-1]


def log_covers(lines: list[bytes], meta: dict) -> str | None:
    """Why log.jsonl (its complete ``lines``) does not hold what a checkpoint's meta expects, or None when it does:
    at least ``log_lines`` lines, the last of them the record of the checkpoint's own step (not a rollback)."""
    n, step = meta.get("log_lines"), meta.get("step")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        return f"its meta has no valid log_lines ({n!r})"
    if len(lines) < n:
        return f"it expects {n} log lines, log.jsonl has {len(lines)}"
    if n == 0:
        return None if step == 0 else f"it expects no log line at step {step}"
    try:
        last = json.loads(lines[n - 1])
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"log line {n} is not JSON"
    if not isinstance(last, dict) or last.get("step") != step or last.get("event") == "rollback":
        got = last.get("step") if isinstance(last, dict) else last
        return f"it expects log line {n} to be step {step}, log.jsonl has step {got!r} there"
    return None


def resume_point(run_dir, from_step: int | None = None) -> tuple[Path | None, list[str]]:
    """(the step_N.json that ``train --resume`` continues from, or None for step 0; notes on what was passed over).

    Without ``from_step``: the newest checkpoint that verifies and that log.jsonl covers (``log_covers``). A run
    with no checkpoint at all (killed before its first) starts again at step 0. ``from_step`` names one checkpoint
    (0 with no step_0 checkpoint: start again at step 0). A CheckpointError in one line when nothing fits.
    """
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "ckpt"
    steps = checkpoint_steps(ckpt_dir)
    lines = _log_lines(run_dir)
    if from_step is not None:
        if from_step == 0 and 0 not in steps:
            return None, []
        if from_step not in steps:
            raise CheckpointError(f"--from step_{from_step}: no such checkpoint in {ckpt_dir} (it has "
                                  f"{', '.join(f'step_{s}' for s in steps) or 'none'})")
        candidates = [from_step]
    else:
        candidates = list(reversed(steps))
        if not steps:
            return None, [f"{ckpt_dir} holds no checkpoint yet: starting again from step 0"]
    notes = []
    for step in candidates:
        path = ckpt_dir / f"step_{step}.json"
        try:
            why = log_covers(lines, verify_checkpoint(path)["meta"])
        except CheckpointError as e:
            why = str(e).removeprefix("load_checkpoint: ")
        if why is None:
            return path, notes
        notes.append(f"passed over {path.name}: {why}")
    raise CheckpointError(f"--resume: no checkpoint of {run_dir} can be continued from ({'; '.join(notes)}); "
                          f"--from step_0 starts the run again")


def set_aside_newer(run_dir, step: int) -> Path | None:
    """Move the checkpoints newer than ``step`` into ``ckpt/superseded/<time>/`` (kept, never deleted), so that
    neither a later resume nor a rollback mistakes them for part of the run that continues from ``step``."""
    ckpt_dir = Path(run_dir) / "ckpt"
    newer = [s for s in checkpoint_steps(ckpt_dir) if s > step]
    if not newer:
        return None
    dest = ckpt_dir / "superseded" / time.strftime("%Y%m%d-%H%M%S")
    dest.mkdir(parents=True, exist_ok=True)
    for s in newer:
        for suffix in (".json", ".npz"):  # the record first: no record ever names a missing npz
            src = ckpt_dir / f"step_{s}{suffix}"
            if src.exists():
                os.replace(src, dest / src.name)
    return dest
