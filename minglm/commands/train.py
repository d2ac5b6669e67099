"""``python -m minglm train``: a run folder around the ``Trainer`` (minglm/train.py), the main job of minglm.

With no arguments it trains the ``words`` config (one layer of tiny's width with 1-D RoPE, whole-word tokens and
blanks) on Shakespeare for a few CPU minutes. It writes the run folder ``runs/<name>/``: config.json, tokenizer.json,
log.jsonl (one JSON line per step), ckpt/step_N.npz + .json and summary.json, then plots/*.png through ``viz``. At
the end it prints held-out lines with the model's greedy fill beside the truth, and compares the validation loss
with a unigram baseline.

``--resume RUN`` continues a run exactly from its latest checkpoint (the Trainer restores the rng, the data position
and the log position), and the ``--inject-*`` flags corrupt the loss at chosen steps to watch the spike guard roll back.

What keeps a run folder sound (docs/robustness.md lists the faults tried):
- every input is checked before the run folder is created, so a refused command leaves nothing behind;
- one writer: the command holds the folder's lock (``minglm.runs.run_lock``) from creation or resume to the end;
- ``--resume`` takes the checkpoint as the truth: the model and training config come from it, config.json and
  tokenizer.json must agree, and it continues from the newest checkpoint that verifies and that log.jsonl covers
  (``--from step_N`` picks one), setting newer ones aside and saying so;
- a corpus path is recorded absolute, so a run resumes from any directory.
Every fault ends in one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np

import viz
from minglm.backend import device_xp
from minglm.checkpoint import CheckpointError, atomic_write, checkpoint_steps, load_checkpoint, write_json_atomic
from minglm.commands import error_line, fail
from minglm.config import TrainConfig, apply_overrides, field_types, load_config_source, make_train_config
from minglm.data.corpus import CORPUS_NAMES, encode_corpus, load_corpus
from minglm.data.loader import BlockLoader, iter_eval_batches
from minglm.fill_eval import candidate_lines, evaluate_fill, format_report
from minglm.model import GLM, GLMConfig
from minglm.optim import AdamW, CosineSchedule
from minglm.runs import (
    LOCK_NAME,
    RESUMABLE_FIELDS,
    RUN_PARTS,
    check_no_links,
    check_run,
    make_tokenizer,
    model_config_from,
    objective_overrides,
    read_json,
    read_tokenizer,
    resume_point,
    run_lock,
    run_meta,
    set_aside_newer,
)
from minglm.tensor import Tensor
from minglm.tokenizer import UNK_ID, tokenizer_record
from minglm.train import Trainer, TrainingDiverged, unigram_baseline

VAL_SEED = 1234  # the validation blanks are drawn from this fixed seed, independent of --seed

# --------------------------------------------------------------------------------------------------------------
# The end of a run: the fill benchmark (minglm/fill_eval.py) on held-out lines
# --------------------------------------------------------------------------------------------------------------


def end_of_run_fill_eval(model, tokenizer, corpus, cfg: TrainConfig, say=print) -> dict | None:
    """Score the model's greedy fills against the two counting baselines, print the table, and return it.

    The sizes are ``cfg.fill_words`` and ``cfg.fill_spans``, scaled down together when the validation documents
    have fewer usable lines (a small corpus of your own); None when there are none or both sizes are 0.
    """
    want = cfg.fill_words + cfg.fill_spans
    have = len(candidate_lines(corpus.val))
    if want == 0 or have == 0:
        return None
    scale = min(1.0, have / want)
    n_word, n_span = int(cfg.fill_words * scale), int(cfg.fill_spans * scale)
    model.eval()
    report = evaluate_fill(model, tokenizer, corpus.train, corpus.val, n_word=n_word, n_span=n_span,
                           n_examples=cfg.fill_lines)
    model.train()
    say(format_report(report))
    return report.to_dict()


# --------------------------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------------------------


DEFAULT_PRESET = "words"  # what `python -m minglm train` trains with no --config


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m minglm train",
        description="Train a GLM. With no arguments: the words config (tiny's size, whole-word tokens and blanks, "
                    "1-D RoPE) on Shakespeare (CPU, minutes); --config tiny is the character-level GLM.",
    )
    ap.add_argument("--config", default=None,
                    help="words (the default) | tiny | small | base | course | glm-130b | FILE.json (a run's "
                         "config.json works)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override one config field (train or model.<field>), repeatable, e.g. --set lr=1e-3")
    ap.add_argument("--steps", type=int, help="optimizer steps (default: the config's)")
    ap.add_argument("--out", default="runs", help="folder that holds run folders (default: runs)")
    ap.add_argument("--name", help="run folder name (default: <corpus>-<preset>-<objective>, numbered if taken)")
    ap.add_argument("--seed", type=int, help="seed of the one random generator")
    ap.add_argument("--device", choices=("auto", "cpu", "gpu"), help="where to train (default: the config's)")
    ap.add_argument("--resume", metavar="RUN", help="continue a run folder exactly from its latest checkpoint (the "
                                                    "newest that verifies and that its log.jsonl covers)")
    ap.add_argument("--from", dest="from_step", metavar="step_N",
                    help="with --resume: continue from this checkpoint (step_0: start the run again from scratch); "
                         "newer checkpoints are moved to ckpt/superseded/")
    ap.add_argument("--overwrite", action="store_true",
                    help="with --name: start again in a run folder that holds no checkpoint yet (a run killed "
                         "before its first one)")
    ap.add_argument("--corpus", help="shakespeare | tang | a folder of .txt files (one document each) | one .txt "
                                     "file (its blank-line-separated paragraphs are the documents)")
    ap.add_argument("--objective", help="glm-base | glm-10b | glm-doc | glm-130b | bert | gpt | prefix | t5")
    ap.add_argument("--eval-every", type=int, help="validate every N steps")
    ap.add_argument("--ckpt-every", type=int, help="checkpoint every N steps")
    ap.add_argument("--keep", type=int, help="keep the newest K checkpoints")
    ap.add_argument("--time-limit", type=float, help="stop (evaluate and save) after this many seconds of training")
    ap.add_argument("--stop-at", type=int, metavar="STEP",
                    help="stop after STEP without saving, as if the process died (to try --resume)")
    ap.add_argument("--inject-spike-at", default="", metavar="STEPS",
                    help="testing the guard: multiply the loss by 1000 at these steps (comma list, once each)")
    ap.add_argument("--inject-nan-at", default="", metavar="STEPS",
                    help="testing the guard: make the loss NaN at these steps (comma list, once each)")
    ap.add_argument("--quiet", action="store_true", help="print only the final summary")
    return ap


def _steps_list(text: str, flag: str) -> set[int]:
    try:
        return {int(s) for s in text.split(",") if s.strip()}
    except ValueError:
        raise ValueError(f"{flag}: expected a comma-separated list of steps, got {text!r}") from None


def make_fault_hook(spike_at: set[int], nan_at: set[int]):
    """A fault_hook that corrupts the loss once at each listed step (after a rollback the step number repeats)."""
    spike_at, nan_at = set(spike_at), set(nan_at)
    if not spike_at and not nan_at:
        return None

    def hook(step: int, loss: Tensor) -> Tensor:
        if step in spike_at:
            spike_at.discard(step)
            return loss * 1000.0
        if step in nan_at:
            nan_at.discard(step)
            return loss * float("nan")
        return loss

    return hook


def _from_step(text: str | None) -> int | None:
    if text is None:
        return None
    m = re.fullmatch(r"(?:step_)?(\d+)", text.strip())
    if m is None:
        raise ValueError(f"--from: expected step_N (a checkpoint of the run), got {text!r}")
    return int(m.group(1))


def _check_name(name: str) -> None:
    """A run name is one plain folder name: ``--name ../../x`` must not put a run outside ``--out``."""
    if not name or name in (".", "..") or Path(name).name != name or "/" in name or "\\" in name or "\0" in name:
        raise ValueError(f"--name: {name!r} must be a plain folder name (no / or ..); --out says where runs go")


def _device(name: str):
    """The array module of ``--device`` (or MINGLM_BACKEND under auto); a missing CuPy or GPU as a ValueError."""
    try:
        return device_xp(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name}: {e}") from None


def _make_run_dir(out: Path, name: str, numbered: bool) -> Path:
    """Create the run folder (``name``, or ``name-2``, ``name-3``, ... when ``numbered``); mkdir is the claim."""
    out.mkdir(parents=True, exist_ok=True)
    path, i = out / name, 2
    while True:
        try:
            path.mkdir()
            return path
        except FileExistsError:
            if not numbered:
                raise ValueError(f"--name: {path} exists; pick another name, --resume it, or --overwrite it if "
                                 f"it has no checkpoint yet") from None
            path, i = out / f"{name}-{i}", i + 1


def _clear_for_overwrite(run_dir: Path) -> None:
    """Empty a run folder for ``--overwrite`` (its lock held): only one without a checkpoint, only run files."""
    steps = checkpoint_steps(run_dir / "ckpt")
    if steps:
        raise ValueError(f"--overwrite: {run_dir} holds checkpoints up to step_{steps[-1]}; --resume it (or delete "
                         f"the folder yourself)")
    foreign = sorted(p.name for p in run_dir.iterdir()
                     if p.name not in RUN_PARTS and not (p.name.startswith(".") and p.name.endswith(".tmp")))
    if foreign:
        raise ValueError(f"--overwrite: {run_dir} does not look like a run folder (it holds {', '.join(foreign[:3])})")
    for p in run_dir.iterdir():
        if p.name == LOCK_NAME:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def _truncate_log(path: Path, n_lines: int) -> None:
    """Keep the first ``n_lines`` lines of log.jsonl (what the checkpoint had seen), atomically."""
    data = path.read_bytes() if path.is_file() else b""
    lines = data.split(b"\n")[:-1]  # complete lines only
    if len(lines) < n_lines:
        raise CheckpointError(f"resume: {path} has {len(lines)} lines, the checkpoint expects at least {n_lines}")
    keep = b"".join(line + b"\n" for line in lines[:n_lines])
    atomic_write(path, lambda f: f.write(keep))


def _resolve_resume(resume: str, out: str) -> Path:
    for cand in (Path(resume), Path(out) / resume):
        if (cand / "config.json").is_file() or (cand / "config.json").is_symlink():
            return cand
    raise ValueError(f"--resume: {resume!r} is not a run folder with a config.json (looked in . and {out}/)")


def _model_config(model: dict, train: TrainConfig, vocab_size: int, explicit_max_len: bool) -> GLMConfig:
    """The new run's model config: the preset's or file's, with vocab_size from the tokenizer, the training seq_len
    and a max_len that fits it (raised from the preset's, but an explicit one that is too small is an error)."""
    model = dict(model)
    model.setdefault("vocab_size", vocab_size)
    if not isinstance(model["vocab_size"], int) or model["vocab_size"] < vocab_size:
        raise ValueError(f"model.vocab_size={model['vocab_size']!r} is smaller than the tokenizer's {vocab_size}")
    model["seq_len"] = train.seq_len
    # Part B reuses the blanks' positions, but a long [gMASK] span can have block ids up to seq_len + 1
    need = train.seq_len + 1
    given = model.get("max_len")
    if explicit_max_len and isinstance(given, int) and given < need:
        raise ValueError(f"model.max_len={given} is below seq_len + 1 = {need} (block positions of a long span go "
                         f"up to seq_len + 1); set model.max_len={need} or more, or a shorter seq_len")
    if not explicit_max_len or not isinstance(given, int):
        model["max_len"] = max(given if isinstance(given, int) else 0, need)
    return model_config_from(model, "model config")


def _check_all_words(train: TrainConfig, model: GLMConfig) -> None:
    """``all_words`` leaves every word in Part A: only a model whose Part-B tokens cannot see their own slot, and
    whose Part-A tokens cannot pass a word on to a neighbour first (one layer, or Part A never transformed:
    ``raw_part_a``), is not handed the answers."""
    if train.all_words > 0 and not (model.hide_own_token and (model.n_layer == 1 or model.raw_part_a)):
        raise ValueError(f"TrainConfig.all_words={train.all_words} needs a model with hide_own_token=true and either "
                         f"n_layer=1 or raw_part_a=true (got hide_own_token={model.hide_own_token}, "
                         f"n_layer={model.n_layer}, raw_part_a={model.raw_part_a}): otherwise the words it asks for "
                         "are in plain view")


def _eval_modes(objective) -> list[str | None]:
    """The GLM modes to validate separately (those with a non-zero probability); [None] for the baselines."""
    if not hasattr(objective, "bert_prob"):
        return [None]
    doc = 1.0 - objective.bert_prob - objective.sentence_prob
    modes = [m for m, p in (("token", objective.bert_prob), ("sentence", objective.sentence_prob),
                            ("document", doc)) if p > 1e-9]
    return modes if len(modes) > 1 else [None]


def main(argv: list[str] | None = None) -> int:
    """``python -m minglm train [options]``; returns the exit code (2 for bad input and every fault of the run)."""
    t_main = time.perf_counter()
    args = build_parser().parse_args(argv)
    try:
        return _run(args, t_main)
    except (ValueError, CheckpointError, OSError, TrainingDiverged) as e:
        return fail(e)
    except MemoryError:
        return fail(MemoryError("out of memory: the model or batch is too large for this machine"))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _run(args, t_main: float) -> int:
    with contextlib.ExitStack() as held:  # the run folder's lock, from its creation or resume to the end
        return _train(args, t_main, held)


def _explicit_max_len(args) -> bool:
    """Whether the user chose model.max_len (--set, or the model section of a --config file)."""
    keys = {pair.split("=", 1)[0].strip().replace("-", "_") for pair in args.set}
    if keys & {"max_len", "model.max_len"}:
        return True
    if args.config and Path(args.config).is_file():
        model = read_json(args.config).get("model")
        return isinstance(model, dict) and "max_len" in model
    return False


def _flags(args) -> dict:
    """The TrainConfig fields given as flags (None: not given)."""
    return {"steps": args.steps, "seed": args.seed, "device": args.device, "corpus": args.corpus,
            "objective": args.objective, "eval_every": args.eval_every, "ckpt_every": args.ckpt_every,
            "keep": args.keep, "time_limit": args.time_limit}


def note(text: str) -> None:
    """What the user must hear even with --quiet: a checkpoint passed over, a changed budget, ..."""
    print(f"note: {text}", file=sys.stderr)


def _new_run_config(args) -> tuple[str | None, dict, TrainConfig]:
    """(preset, model dict, TrainConfig) of a new run: the preset or file, then --set, then the flags."""
    preset, model_dict, train_dict = load_config_source(args.config or DEFAULT_PRESET, GLMConfig.PRESETS)
    apply_overrides(model_dict, train_dict, args.set, field_types(GLMConfig))
    if os.environ.get("MINGLM_ATTENTION") and "attention" not in model_dict:  # the one place it is read
        model_dict["attention"] = os.environ["MINGLM_ATTENTION"].strip().lower()
    train_dict.update({k: v for k, v in _flags(args).items() if v is not None})
    cfg = make_train_config(train_dict)
    if cfg.corpus not in CORPUS_NAMES:  # recorded absolute, so that --resume works from any directory
        cfg.corpus = os.path.abspath(cfg.corpus)
    return preset, model_dict, cfg


def _resume_config(args, run_dir: Path, from_step: int | None):
    """(checkpoint or None for step 0, preset, GLMConfig, tokenizer, TrainConfig) of the run ``--resume`` continues.

    The model and training config come from the checkpoint (``check_run``: config.json and tokenizer.json must
    agree); the fields --resume may change come from config.json, then from the flags, and a change is announced.
    """
    blocked = [f for f in ("config", "corpus", "objective", "seed") if getattr(args, f) is not None] + \
        (["set"] if args.set else [])
    if blocked:
        raise ValueError(f"--resume continues a run with its saved config; drop --{', --'.join(blocked)}")
    record, notes = resume_point(run_dir, from_step)
    for line in notes:
        note(line)
    saved = read_json(run_dir / "config.json")
    saved_train = saved.get("train") if isinstance(saved.get("train"), dict) else {}
    ckpt = None
    if record is not None:
        ckpt = load_checkpoint(record)
        mcfg, tokenizer, saved = check_run(run_dir, ckpt)  # the checkpoint is the truth
        train_dict = dict(ckpt.meta.get("train_config") or saved_train)
        train_dict.update({k: saved_train[k] for k in RESUMABLE_FIELDS if k in saved_train})  # the budget now
    else:  # nothing trained yet: the run starts again from its config.json and tokenizer.json
        tokenizer = read_tokenizer(run_dir / "tokenizer.json")
        mcfg = model_config_from(saved.get("model"), f"{run_dir / 'config.json'} model")
        train_dict = dict(saved_train)
    train_dict.update({k: v for k, v in _flags(args).items() if v is not None})
    try:
        cfg = make_train_config(train_dict)
    except ValueError as e:
        raise ValueError(f"{run_dir / 'config.json'}: {e}") from e
    for key in RESUMABLE_FIELDS:
        if key in saved_train and saved_train[key] != getattr(cfg, key):
            why = "; the cosine schedule now ends there" if key == "steps" else ""
            note(f"--resume changes the run's {key} from {saved_train[key]!r} to {getattr(cfg, key)!r} "
                 f"(written to config.json{why})")
    if mcfg.seq_len not in (None, cfg.seq_len) or mcfg.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"{run_dir / 'config.json'}: the model (seq_len {mcfg.seq_len}, vocab_size "
                         f"{mcfg.vocab_size}) does not fit the training seq_len {cfg.seq_len} or the tokenizer's "
                         f"{tokenizer.vocab_size} ids")
    return ckpt, saved.get("preset"), mcfg, tokenizer, cfg


def _create_run_folder(args, name: str, tokenizer, config_record: dict, held: contextlib.ExitStack) -> Path:
    """Create (or, with --overwrite, empty) the new run's folder, take its lock, write its first files."""
    out = Path(args.out)
    if args.overwrite and (out / name).exists():
        run_dir = out / name
        check_no_links(run_dir)
        held.enter_context(run_lock(run_dir))
        _clear_for_overwrite(run_dir)
        note(f"--overwrite: started {run_dir} again (it held no checkpoint)")
    else:
        run_dir = _make_run_dir(out, name, numbered=not args.name)
        held.enter_context(run_lock(run_dir))
    try:
        write_json_atomic(run_dir / "tokenizer.json", tokenizer_record(tokenizer)[0], indent=None)
        atomic_write(run_dir / "log.jsonl", lambda f: None)
        write_json_atomic(run_dir / "config.json", config_record)
    except (OSError, ValueError):
        shutil.rmtree(run_dir, ignore_errors=True)  # a folder that could not be written is not left behind
        raise
    return run_dir


def _train(args, t_main: float, held: contextlib.ExitStack) -> int:
    verbose = not args.quiet
    say = print if verbose else (lambda *a, **k: None)

    # 1. every input, checked before anything is written ---------------------------------------------------------
    spike = _steps_list(args.inject_spike_at, "--inject-spike-at")
    nan = _steps_list(args.inject_nan_at, "--inject-nan-at")
    from_step = _from_step(args.from_step)
    if from_step is not None and not args.resume:
        raise ValueError("--from goes with --resume RUN")
    if args.overwrite and (args.resume or not args.name):
        raise ValueError("--overwrite goes with --name NAME (and not with --resume)")
    if args.name is not None:
        _check_name(args.name)
    if args.resume:
        run_dir = _resolve_resume(args.resume, args.out)
        check_no_links(run_dir)
        held.enter_context(run_lock(run_dir))  # before reading: another writer may be mid-checkpoint
        ckpt, preset, mcfg, tokenizer, cfg = _resume_config(args, run_dir, from_step)
    else:
        preset, model_dict, cfg = _new_run_config(args)
    xp = _device(cfg.device)

    # data and tokenizer
    corpus = load_corpus(cfg.corpus, val_fraction=cfg.val_fraction, seed=0)
    if not args.resume:
        tokenizer = make_tokenizer(cfg, corpus)
    train_ids, val_ids = encode_corpus(corpus, tokenizer)
    if not val_ids:
        raise ValueError(f"corpus {cfg.corpus!r} has no validation documents (val_fraction={cfg.val_fraction}; it "
                         f"needs at least two documents)")
    unknown = sum(int((ids == UNK_ID).sum()) for ids in train_ids + val_ids)
    if unknown:
        total = sum(map(len, train_ids + val_ids))
        print(f"warning: {unknown:,} of the corpus's {total:,} tokens are characters the tokenizer does not know; "
              f"they become [UNK]", file=sys.stderr)
    if not args.resume:
        mcfg = _model_config(model_dict, cfg, tokenizer.vocab_size, _explicit_max_len(args))
    _check_all_words(cfg, mcfg)

    # model, optimizer, loaders (the rng: model init, then data order, blanks and dropout)
    rng = np.random.default_rng(cfg.seed)
    model = GLM(mcfg, rng)
    if xp is not np:
        model.to("gpu")  # before the optimizer: it makes the parameters views of its flat buffer
    optimizer = AdamW(model, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay)
    schedule = CosineSchedule(cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
    data_kw = objective_overrides(cfg)
    loader = BlockLoader(train_ids, tokenizer, cfg.seq_len, cfg.batch_size, objective=cfg.objective,
                         line_windows=cfg.line_windows, **data_kw)
    val_batches = []
    for mode in _eval_modes(loader.objective):
        for b in iter_eval_batches(val_ids, tokenizer, cfg.seq_len, cfg.batch_size, objective=cfg.objective,
                                   seed=VAL_SEED, max_batches=cfg.eval_batches, mode=mode, **data_kw):
            val_batches.append((b.objective, b))
    meta = {**run_meta(mcfg, tokenizer), "train_config": cfg.to_dict()}
    expect = {"model_config": meta["model_config"], "vocab_sha256": meta["vocab_sha256"]}
    config_record = {"preset": preset, "model": mcfg.to_dict(), "train": cfg.to_dict()}

    # 2. the run folder: created (or taken over) only now, and locked ----------------------------------------------
    if not args.resume:
        name = args.name or f"{corpus.name}-{preset or 'custom'}-{cfg.objective}".replace("/", "_")
        run_dir = _create_run_folder(args, name, tokenizer, config_record, held)
    trainer = Trainer(model, optimizer, schedule, loader, rng, cfg, val_batches, ckpt_dir=run_dir / "ckpt",
                      log_path=run_dir / "log.jsonl", meta=meta, expect=expect,
                      fault_hook=make_fault_hook(spike, nan), verbose=verbose)
    if args.resume:
        if ckpt is not None:
            trainer.load_state(ckpt.arrays, ckpt.meta, full=True)
        moved = set_aside_newer(run_dir, trainer.step)
        if moved is not None:
            note(f"checkpoints newer than step {trainer.step} were moved to {moved} (kept, no longer used)")
        _truncate_log(run_dir / "log.jsonl", trainer.log_lines)
        write_json_atomic(run_dir / "config.json", config_record)
        say(f"resumed {run_dir} at step {trainer.step}")

    n_params = model.num_parameters()
    say(f"run {run_dir}: {n_params:,} parameters, vocab {tokenizer.vocab_size}, {cfg.objective} on {corpus.name} "
        f"({sum(map(len, train_ids)):,} train / {sum(map(len, val_ids)):,} val tokens), {cfg.steps} steps of "
        f"{cfg.batch_size}x{cfg.grad_accum} windows of {cfg.seq_len}, device {cfg.device}")
    t_train = time.perf_counter()
    try:
        reason = trainer.fit(until=args.stop_at)
        train_s = time.perf_counter() - t_train
        if reason == "until":
            say(f"stopped after step {trainer.step} (--stop-at); continue with --resume {run_dir}")
            return 0
        return _finish(run_dir, trainer, reason, train_s, t_main, corpus, tokenizer, train_ids, val_batches,
                       data_kw, n_params, say)
    except OSError as e:  # disk full, a folder made read-only, ...: the last checkpoint is intact
        raise OSError(e.errno, f"{error_line(e)} (while writing {run_dir}; its last checkpoint is intact, "
                               f"--resume continues from it)") from e
    except TrainingDiverged as e:
        raise TrainingDiverged(f"{e} The run stopped; its last checkpoint is intact.") from e


def _finish(run_dir, trainer, reason, train_s, t_main, corpus, tokenizer, train_ids, val_batches, data_kw, n_params,
            say) -> int:
    """The end of a run: final numbers, the unigram baseline, the fill benchmark, summary.json and the plots."""
    cfg = trainer.config

    final = trainer.last_eval if trainer.last_eval.get("step") == trainer.step else {
        "step": trainer.step, **trainer.evaluate()}
    base_loader = BlockLoader(train_ids, tokenizer, cfg.seq_len, cfg.batch_size, objective=cfg.objective, **data_kw)
    unigram = unigram_baseline(base_loader, val_batches, tokenizer.vocab_size)
    fill_report = end_of_run_fill_eval(trainer.model, tokenizer, corpus, cfg, say=say)
    steps_done = [r for r in trainer.records if "loss" in r]
    summary = {
        "run": str(run_dir), "steps": trainer.step, "stop_reason": reason, "rollbacks": trainer.rollbacks,
        "train_seconds": round(train_s, 2), "wall_seconds": round(time.perf_counter() - t_main, 2),
        "tokens_per_s": round(float(np.median([r["tokens_per_s"] for r in steps_done])), 1) if steps_done else None,
        "parameters": n_params, **{k: v for k, v in final.items() if k != "step"},
        "unigram_loss": unigram,
        "unigram_note": "unigram of Part-B target ids counted over 64 train batches (add-one smoothed), "
                        "scored on the same validation Part-B targets as val_loss",
        "val_over_unigram": final.get("val_loss", float("nan")) / unigram,
        "fill_eval": fill_report,
    }
    write_json_atomic(run_dir / "summary.json", summary)
    if cfg.plots:
        viz.save_run_plots(run_dir)  # a plot that fails is skipped with a warning, never the run
    val_loss = final.get("val_loss", float("nan"))
    fills = ""
    if fill_report:
        word = {name: fill_report["scores"][name]["word"]["exact"] for name in ("model", "n-gram")}
        fills = f"; one-word fills {100 * word['model']:.1f} % exact (n-gram {100 * word['n-gram']:.1f} %)"
    print(f"done: {trainer.step} steps in {train_s:.0f} s ({reason}); val loss {val_loss:.3f}"
          f" vs unigram {unigram:.3f} (ratio {summary['val_over_unigram']:.2f}){fills}; run folder {run_dir}")
    return 0
