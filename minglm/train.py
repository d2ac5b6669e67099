"""Training GLM: the ``Trainer`` loop, the main job of minglm.

One optimizer step (``Trainer.train_step``): draw ``grad_accum`` micro-batches, run the model, compute GLM's loss
(mean cross-entropy over the Part-B targets, docs/official-code.md §4), backpropagate each loss scaled by 1/grad_accum,
check the loss (the spike guard below), clip the global gradient norm at 1.0 and take an AdamW step at the
scheduled learning rate (warmup, then cosine to 10 %). Around it ``Trainer.fit`` evaluates on fixed validation
batches, writes one JSON line per step to ``log.jsonl``, saves atomic checkpoints and shows a progress bar.

Exact resume: a checkpoint holds the parameters, the optimizer moments and step count, the state of the one
``numpy.random.Generator`` (``rng.bit_generator.state``), the data loader's position, the spike guard's recent losses
and how many log lines had been written. ``--resume RUN`` restores all of it and truncates the log to that line, so
the resumed run writes the same numbers, bit for bit, as a run that was never interrupted.

Spike guard: before the update is applied, the loss is tested against the running median of the last
``spike_window`` accepted losses (before any is accepted: ln(vocab_size), the loss of a uniform guess). A rollback
is triggered by
- a loss that is NaN or inf, at any step;
- a gross spike, more than ``spike_gross`` (10) × the median, at any step from step 1 on: early losses fall by a few
  times at most, so this never fires on honest progress but catches a blow-up at once;
- after ``spike_warmup`` steps, any loss more than ``spike_factor`` (3) × the median (the fine test, off while the
  loss is still falling fast).
A rollback sends the parameters and the optimizer back to the last checkpoint (or the initial state), the step
counter too, while the data position and the rng go on, so the offending batches are skipped. A
``{"event": "rollback"}`` line records it; past ``max_rollbacks`` the run stops with ``TrainingDiverged``.

log.jsonl is appended one whole line per write (never through a symbolic link), and fsync'ed before every
checkpoint, so a checkpoint never counts log lines that a crash could lose.

The command that builds a run folder around this loop is ``python -m minglm train`` (minglm/commands/train.py).
Left out: distributed training, mixed precision, learning-rate finders.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm import tqdm  # plain tqdm: tqdm.auto needs ipywidgets in Jupyter, and warns without it

from minglm.backend import get_xp, to_device, to_numpy
from minglm.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from minglm.config import TrainConfig
from minglm.model import GLM, glm_loss
from minglm.optim import AdamW
from minglm.tensor import no_grad

BASELINE_SEED = 4321  # the train batches the unigram baseline counts come from their own generator

# what a checkpoint's meta must hold for the Trainer to continue from it
STATE_KEYS = ("step", "optim", "rng", "loader", "guard", "log_lines", "tokens_seen")


class TrainingDiverged(RuntimeError):
    """More rollbacks than ``max_rollbacks``: the run stopped (its last checkpoint is intact)."""

# --------------------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------------------


def _batch_to(batch, xp):
    """The batch with its arrays on the backend ``xp`` (a no-op on the CPU)."""
    if xp is np:
        return batch
    for name in ("tokens", "targets", "loss_mask", "position_ids", "block_position_ids", "sep"):
        setattr(batch, name, to_device(getattr(batch, name), xp))
    return batch


def masked_token_stats(logits, targets, loss_mask) -> tuple[float, int, int]:
    """(sum of cross-entropy, number of targets, number of argmax hits) over the positions with loss_mask > 0.

    ``logits`` (B, T, V) array, ``targets`` (B, T) ints, ``loss_mask`` (B, T). Only the masked rows are normalised,
    so evaluation costs a fraction of a full log-softmax.
    """
    xp = get_xp(logits)
    sel = loss_mask > 0  # (B, T) bool
    z = logits[sel]  # (n, V)
    y = targets[sel]  # (n,)
    if z.shape[0] == 0:
        return 0.0, 0, 0
    zmax = z.max(axis=-1, keepdims=True)  # (n, 1)
    lse = xp.log(xp.exp(z - zmax).sum(axis=-1)) + zmax[:, 0]  # (n,)
    ce = lse - z[xp.arange(z.shape[0]), y]  # (n,)
    hits = int((z.argmax(axis=-1) == y).sum())
    return float(ce.sum(dtype=xp.float64)), int(z.shape[0]), hits


def _progress_disabled() -> bool:
    """Quiet when stdout is not a terminal (logs, CI, tests) or when TQDM_DISABLE is set."""
    if os.environ.get("TQDM_DISABLE", "").strip().lower() in ("1", "true", "yes"):
        return True
    try:
        return not sys.stdout.isatty()
    except (AttributeError, ValueError):
        return True


# --------------------------------------------------------------------------------------------------------------
# The Trainer
# --------------------------------------------------------------------------------------------------------------


class Trainer:
    """Owns one run's moving parts: model, optimizer, schedule, training loader and the rng.

    ``val_batches`` is a list of (objective name, Batch), built once so every evaluation sees the same data.
    ``ckpt_dir`` / ``log_path`` may be None (then checkpoints live only in memory and nothing is logged to disk).
    ``meta`` goes into every checkpoint (config, tokenizer, vocabulary fingerprint); ``expect`` is what a checkpoint
    must match to be loaded (e.g. ``{"model_config": ..., "vocab_sha256": ...}``).
    ``fault_hook(step, loss) -> loss`` may replace the loss Tensor of the step about to be taken (tests inject
    spikes with it).
    """

    def __init__(self, model: GLM, optimizer: AdamW, schedule: Callable[[int], float], loader, rng: np.random.Generator,
                 config: TrainConfig, val_batches=(), ckpt_dir=None, log_path=None, meta: dict | None = None,
                 expect: dict | None = None, fault_hook: Callable | None = None, verbose: bool = True):
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"Trainer: rng must be a numpy.random.Generator, got {type(rng).__name__}")
        self.model, self.optimizer, self.schedule, self.loader, self.rng = model, optimizer, schedule, loader, rng
        self.config = config
        self.val_batches = list(val_batches)
        self.ckpt_dir = Path(ckpt_dir) if ckpt_dir is not None else None
        self.log_path = Path(log_path) if log_path is not None else None
        self.meta = dict(meta or {})
        self.expect = dict(expect or {})
        self.fault_hook = fault_hook
        self.verbose = verbose
        self.xp = get_xp(optimizer.flat)
        self.step = 0  # optimizer updates done so far
        self.history: list[float] = []  # recent accepted losses, for the spike guard's median
        self.rollbacks = 0
        self.log_lines = 0  # lines written to log.jsonl so far (saved in checkpoints; resume truncates to it)
        self.tokens_seen = 0
        self.records: list[dict] = []  # every record logged by this process (handy in notebooks and tests)
        self.last_eval: dict = {}
        self.stop_reason = ""
        self._memory_ckpt: tuple[dict, dict] | None = None  # the fallback rollback target when no file exists
        self._bar = None

    # --- logging --------------------------------------------------------------------------------------------------
    def log(self, record: dict) -> None:
        """Append one JSON line to log.jsonl (and to ``self.records``)."""
        self.records.append(record)
        if self.log_path is not None:
            line = (json.dumps(record, allow_nan=True) + "\n").encode()
            # O_NOFOLLOW: a log.jsonl that is a symbolic link is an error, never a write into its target
            fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
            try:
                os.write(fd, line)  # one write of the whole line
            finally:
                os.close(fd)
        self.log_lines += 1

    def _sync_log(self) -> None:
        """fsync log.jsonl, so that the lines a checkpoint counts are on disk before the checkpoint is."""
        if self.log_path is not None and self.log_path.exists():
            fd = os.open(self.log_path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def say(self, text: str) -> None:
        if not self.verbose:
            return
        if self._bar is not None and not self._bar.disable:
            self._bar.write(text)
        else:
            print(text, flush=True)

    # --- one step -------------------------------------------------------------------------------------------------
    def _spike_reason(self, loss: float) -> str | None:
        """Why this loss must not be applied, or None when it looks fine (the rules: the module docstring)."""
        cfg = self.config
        if not math.isfinite(loss):
            return f"loss is {loss}"
        recent = self.history[-cfg.spike_window:]
        if recent:
            median, what = float(np.median(recent)), f"the median of the last {len(recent)} losses"
        else:
            median, what = math.log(self.model.config.vocab_size), "ln(vocab_size): no loss accepted yet"
        if cfg.spike_gross > 0 and loss > cfg.spike_gross * median:
            return f"loss {loss:.4g} > {cfg.spike_gross:g} x {median:.4g}, {what}"
        if cfg.spike_factor > 0 and self.step >= cfg.spike_warmup and len(recent) >= min(10, cfg.spike_window):
            if loss > cfg.spike_factor * median:
                return f"loss {loss:.4g} > {cfg.spike_factor:g} x {median:.4g}, {what}"
        return None

    def train_step(self) -> dict:
        """One optimizer step (``grad_accum`` micro-batches). Returns the logged record (a step or a rollback)."""
        cfg = self.config
        t0 = time.perf_counter()
        lr = float(self.schedule(self.step))
        self.model.train()
        self.optimizer.zero_grad()
        per_objective: dict[str, list[float]] = {}
        losses, n_tokens, reason = [], 0, None
        for _ in range(cfg.grad_accum):
            batch = _batch_to(self.loader.next_batch(self.rng), self.xp)
            n_tokens += int(np.asarray(to_numpy(batch.lengths)).sum())
            loss = glm_loss(self.model, batch, rng=self.rng)
            if self.fault_hook is not None:
                loss = self.fault_hook(self.step + 1, loss)
            value = float(loss.item())
            losses.append(value)
            per_objective.setdefault(batch.objective, []).append(value)
            if not math.isfinite(value):
                break  # no backward through a NaN; the guard below rolls back
            (loss * (1.0 / cfg.grad_accum) if cfg.grad_accum > 1 else loss).backward()
        self.tokens_seen += n_tokens
        mean_loss = sum(losses) / len(losses)
        reason = self._spike_reason(mean_loss)
        grad_norm = float("nan")
        if reason is None:
            grad_norm = self.optimizer.clip_grad_norm(cfg.clip)
            if not math.isfinite(grad_norm):
                reason = f"gradient norm is {grad_norm}"
        if reason is not None:
            return self.rollback(reason, mean_loss)
        self.optimizer.step(lr)
        self.optimizer.zero_grad()  # frees the gradient arrays
        self.step += 1
        self.history.append(mean_loss)
        del self.history[: -self.config.spike_window]
        dt = time.perf_counter() - t0
        record = {"step": self.step, "loss": mean_loss, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": round(n_tokens / dt, 1)}
        for name, vals in sorted(per_objective.items()):
            record[f"loss_{name}"] = sum(vals) / len(vals)
        return record

    # --- evaluation -----------------------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """Validation loss per objective, overall loss and argmax accuracy on Part-B targets (fixed batches)."""
        if not self.val_batches:
            return {}
        was_training = self.model.training
        self.model.eval()
        sums: dict[str, list[float]] = {}
        try:
            with no_grad():
                for name, batch in self.val_batches:
                    b = _batch_to(batch, self.xp)
                    logits = self.model(b.tokens, b.position_ids, b.block_position_ids, b.sep).data  # (B, T, V)
                    ce, n, hits = masked_token_stats(logits, b.targets, b.loss_mask)
                    acc = sums.setdefault(name, [0.0, 0, 0])
                    acc[0] += ce
                    acc[1] += n
                    acc[2] += hits
        finally:
            self.model.train(was_training)
        total_ce = sum(v[0] for v in sums.values())
        total_n = sum(v[1] for v in sums.values())
        total_hits = sum(v[2] for v in sums.values())
        out = {"val_loss": total_ce / max(total_n, 1)}
        for name, (ce, n, _) in sorted(sums.items()):
            out[f"val_loss_{name}"] = ce / max(n, 1)
        out["val_acc"] = total_hits / max(total_n, 1)
        self.last_eval = {"step": self.step, **out}
        return out

    # --- state: checkpoints, resume, rollback ---------------------------------------------------------------------
    def state(self) -> tuple[dict, dict]:
        """(arrays, meta) that a checkpoint stores: everything needed to continue exactly from this step."""
        arrays = {f"model/{k}": v for k, v in self.model.state_dict().items()}
        opt = self.optimizer.state_dict()
        arrays["optim/m"], arrays["optim/v"] = opt.pop("m"), opt.pop("v")
        meta = {
            **self.meta,
            "step": self.step,
            "optim": opt,
            "rng": self.rng.bit_generator.state,
            "loader": self.loader.state_dict(),
            "guard": {"history": list(self.history), "rollbacks": self.rollbacks},
            "log_lines": self.log_lines,
            "tokens_seen": self.tokens_seen,
        }
        return arrays, meta

    def save(self) -> Path | None:
        """Write a checkpoint of the current step (atomic; keeps the newest ``keep``). Without a folder: in memory."""
        arrays, meta = self.state()
        if self.ckpt_dir is None:
            self._memory_ckpt = (arrays, meta)
            return None
        self._sync_log()
        return save_checkpoint(self.ckpt_dir, self.step, arrays, meta, keep=self.config.keep)

    def expected_arrays(self) -> dict[str, tuple]:
        shapes = {f"model/{n}": tuple(p.shape) for n, p in self.model.named_parameters()}
        shapes["optim/m"] = shapes["optim/v"] = (self.optimizer.num_elements,)
        return shapes

    def load_state(self, arrays: dict, meta: dict, full: bool = True) -> None:
        """Restore a state from ``state()`` or a checkpoint. Everything is checked before anything changes.

        ``full``: also the rng, the data position and the log position (resume); otherwise only the weights,
        the optimizer, the step and the guard's history (rollback: data and rng go on, skipping the bad batches).
        """
        missing = [k for k in STATE_KEYS if k not in meta]
        if missing:
            raise CheckpointError(f"Trainer: the checkpoint's meta lacks {', '.join(missing)}; it cannot be "
                                  f"continued from (it was not written by the Trainer, or it was edited)")
        for key, want in self.expect.items():
            if meta.get(key) != want:
                raise CheckpointError(f"Trainer: the checkpoint was saved with another {key}")
        for name, shape in self.expected_arrays().items():
            if name not in arrays or tuple(arrays[name].shape) != shape:
                got = None if name not in arrays else tuple(arrays[name].shape)
                raise CheckpointError(f"Trainer: checkpoint array {name!r} has shape {got}, the model needs {shape}")
        try:
            opt = dict(meta["optim"], m=arrays["optim/m"], v=arrays["optim/v"])
            layout = [[n, list(s)] for n, s in opt.get("layout", [])]
            step, log_lines, tokens_seen = int(meta["step"]), int(meta["log_lines"]), int(meta["tokens_seen"])
            history = [float(x) for x in meta["guard"]["history"]]
            rollbacks = int(meta["guard"]["rollbacks"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"Trainer: the checkpoint's meta is malformed ({type(e).__name__}: {e})") from e
        if layout != self.optimizer.layout():
            raise CheckpointError("Trainer: the checkpoint's optimizer state is for another parameter layout")
        model_state = {k[len("model/"):]: v for k, v in arrays.items() if k.startswith("model/")}
        self.model.load_state_dict(model_state, strict=True)  # copies in place: the optimizer's views stay valid
        self.optimizer.load_state_dict(opt)
        self.step = step
        self.history = history
        if full:
            try:
                self.rng.bit_generator.state = meta["rng"]
            except (KeyError, TypeError, ValueError) as e:
                raise CheckpointError(f"Trainer: the checkpoint's rng state is malformed ({e})") from e
            try:
                self.loader.load_state_dict(meta["loader"])  # its ValueError says when the data changed
            except (KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"Trainer: the checkpoint's loader state is malformed ({e})") from e
            self.rollbacks = rollbacks
            self.log_lines = log_lines
            self.tokens_seen = tokens_seen

    def load_checkpoint(self, path_or_dir, full: bool = True) -> int:
        """Verify and load a checkpoint file or folder (its newest valid one); returns its step."""
        ckpt = load_checkpoint(path_or_dir, expect=self.expect, expect_arrays=self.expected_arrays())
        self.load_state(ckpt.arrays, ckpt.meta, full=full)
        return ckpt.step

    def rollback(self, reason: str, bad_loss: float) -> dict:
        """Go back to the last checkpoint (or the initial state), keep the data moving, log the event."""
        self.optimizer.zero_grad()
        self.rollbacks += 1
        if self.rollbacks > self.config.max_rollbacks:
            raise TrainingDiverged(f"Trainer: {self.rollbacks} rollbacks (max_rollbacks={self.config.max_rollbacks}); "
                               f"the last at step {self.step + 1}: {reason}. Lower the learning rate?")
        bad_step = self.step + 1
        path = latest_checkpoint(self.ckpt_dir) if self.ckpt_dir is not None else None
        rollbacks = self.rollbacks
        if path is not None:
            restored = self.load_checkpoint(path, full=False)
        elif self._memory_ckpt is not None:
            self.load_state(*self._memory_ckpt, full=False)
            restored = self.step
        else:
            raise RuntimeError("Trainer: a rollback needs a checkpoint or the initial state (call fit())")
        self.rollbacks = rollbacks
        record = {"step": bad_step, "event": "rollback", "reason": reason, "bad_loss": bad_loss,
                  "restored_step": restored}
        self.say(f"rollback at step {bad_step}: {reason}; restored step {restored}, skipping its batches")
        return record

    # --- the loop ---------------------------------------------------------------------------------------------------
    def _eval_due(self) -> bool:
        every = self.config.eval_every
        return (every and self.step % every == 0) or self.step == self.config.steps

    def _ckpt_due(self) -> bool:
        every = self.config.ckpt_every
        return (every and self.step % every == 0) or self.step == self.config.steps

    def fit(self, until: int | None = None) -> str:
        """Train up to ``config.steps`` (or ``until``, which simulates an interruption: no checkpoint is written
        then). Returns why it stopped: "completed", "until", "time_limit". Ctrl-C propagates (no checkpoint)."""
        cfg = self.config
        stop = cfg.steps if until is None else min(until, cfg.steps)
        has_file = self.ckpt_dir is not None and latest_checkpoint(self.ckpt_dir) is not None
        if not has_file:  # the rollback target before the first checkpoint: the state we start from
            arrays, meta = self.state()
            self._memory_ckpt = (arrays, meta)
        t_start = time.perf_counter()
        self._bar = tqdm(total=cfg.steps, initial=self.step, disable=_progress_disabled(), dynamic_ncols=True,
                         unit="step", file=sys.stderr)
        self.stop_reason = "completed"
        try:
            while self.step < stop:
                record = self.train_step()
                if record.get("event") == "rollback":
                    self.log(record)
                    self._bar.n = self.step
                    self._bar.refresh()
                    continue
                if self._eval_due():
                    record.update(self.evaluate())
                self.log(record)
                if self._ckpt_due():
                    self.save()
                self._bar.update(self.step - self._bar.n)
                self._bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                      refresh=False)
                if "val_loss" in record:
                    self.say(f"step {self.step:5d}/{cfg.steps} | loss {record['loss']:.3f} | "
                             f"val {record['val_loss']:.3f} | acc {record['val_acc']:.3f} | lr {record['lr']:.2e} | "
                             f"{record['tokens_per_s']:.0f} tok/s | {time.perf_counter() - t_start:.0f} s")
                if cfg.time_limit and time.perf_counter() - t_start > cfg.time_limit and self.step < stop:
                    self.stop_reason = "time_limit"
                    self.say(f"time limit of {cfg.time_limit:g} s reached at step {self.step}: evaluating and saving")
                    extra = {"step": self.step, "event": "time_limit"}
                    if "val_loss" not in record:
                        extra.update(self.evaluate())
                    self.log(extra)
                    self.save()
                    break
            else:
                if until is not None and self.step < cfg.steps:
                    self.stop_reason = "until"
        except KeyboardInterrupt:
            # no checkpoint here: Ctrl-C may land in the middle of an update, and a half-applied step would break
            # exact resume. The last checkpoint is intact, and --resume continues from it.
            self.stop_reason = "interrupted"
            self.say(f"interrupted during step {self.step + 1}; --resume continues from the last checkpoint")
            raise
        finally:
            self._bar.close()
            self._bar = None
        return self.stop_reason


# --------------------------------------------------------------------------------------------------------------
# A baseline to beat
# --------------------------------------------------------------------------------------------------------------


def unigram_baseline(train_loader, val_batches, vocab_size: int, n_batches: int = 64) -> float:
    """Cross-entropy of a unigram model on the validation Part-B targets.

    The unigram is the frequency of every id among the Part-B targets of ``n_batches`` training batches (drawn
    with their own generator, add-one smoothed), so it knows how often ``<eop>`` ends a span: the strongest
    context-free guess. The model must beat it by a wide margin to have learned anything from context.
    """
    rng = np.random.default_rng(BASELINE_SEED)
    counts = np.zeros(vocab_size, dtype=np.float64)
    for _ in range(n_batches):
        b = train_loader.next_batch(rng)
        counts += np.bincount(to_numpy(b.targets)[to_numpy(b.loss_mask) > 0], minlength=vocab_size)[:vocab_size]
    logp = np.log((counts + 1.0) / (counts.sum() + vocab_size))
    total, n = 0.0, 0
    for _, b in val_batches:
        y = to_numpy(b.targets)[to_numpy(b.loss_mask) > 0]
        total -= float(logp[y].sum())
        n += len(y)
    return total / max(n, 1)
