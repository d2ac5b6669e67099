"""Training GLM: the ``Trainer`` loop and ``python -m minglm train``, the main job of minglm.

One optimizer step (``Trainer.train_step``): draw ``grad_accum`` micro-batches, run the model, compute GLM's loss
(mean cross-entropy over the Part-B targets, GLM-REFERENCE.md §5), backpropagate each loss scaled by 1/grad_accum,
check the loss (the spike guard below), clip the global gradient norm at 1.0 and take an AdamW step at the
scheduled learning rate (warmup, then cosine to 10 %). Around it ``Trainer.fit`` evaluates on fixed validation
batches, writes one JSON line per step to ``log.jsonl``, saves atomic checkpoints and shows a progress bar.

Exact resume: a checkpoint holds the parameters, the optimizer moments and step count, the state of the one
``numpy.random.Generator`` (``rng.bit_generator.state``), the data loader's position, the spike guard's recent losses
and how many log lines had been written. ``--resume RUN`` restores all of it and truncates the log to that line, so
the resumed run writes the same numbers, bit for bit, as a run that was never interrupted.

Spike guard: before the update is applied, a loss that is NaN/inf, or more than ``spike_factor`` × the median of the
last ``spike_window`` accepted losses (after ``spike_warmup`` steps), triggers a rollback: the parameters and the
optimizer go back to the last checkpoint (or the initial state), the step counter too, while the data position and
the rng go on, so the offending batches are skipped. A ``{"event": "rollback"}`` line records it.

``python -m minglm train`` with no arguments trains the tiny config on character-level Shakespeare for a few CPU
minutes, then prints held-out lines with the model's greedy fill beside the truth and compares the validation loss
with a unigram baseline (``summary.json``). Left out: distributed training, mixed precision, learning-rate finders.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from minglm.backend import device_xp, get_xp, to_device, to_numpy
from minglm.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint, write_json_atomic
from minglm.config import TrainConfig, apply_overrides, field_types, load_config_source, make_train_config
from minglm.model import GLM, GLMConfig, glm_loss
from minglm.optim import AdamW, CosineSchedule
from minglm.tensor import Tensor, no_grad

VAL_SEED = 1234  # the validation blanks are drawn from this fixed seed, independent of --seed
BASELINE_SEED = 4321  # the train batches the unigram baseline counts come from their own generator

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


def tokenizer_record(tokenizer) -> tuple[dict, str]:
    """The tokenizer's own JSON (as a dict) and its SHA-256 fingerprint (of the canonical JSON)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokenizer.json"
        tokenizer.save(path)
        data = json.loads(path.read_text(encoding="utf-8"))
    canon = json.dumps(data, sort_keys=True, ensure_ascii=False).encode()
    return data, hashlib.sha256(canon).hexdigest()


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
        self.log_lines += 1
        if self.log_path is not None:
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, allow_nan=True) + "\n")

    def say(self, text: str) -> None:
        if not self.verbose:
            return
        if self._bar is not None and not self._bar.disable:
            self._bar.write(text)
        else:
            print(text, flush=True)

    # --- one step -------------------------------------------------------------------------------------------------
    def _spike_reason(self, loss: float) -> str | None:
        """Why this loss must not be applied, or None when it looks fine."""
        cfg = self.config
        if not math.isfinite(loss):
            return f"loss is {loss}"
        if cfg.spike_factor > 0 and self.step >= cfg.spike_warmup and len(self.history) >= min(10, cfg.spike_window):
            median = float(np.median(self.history[-cfg.spike_window:]))
            if loss > cfg.spike_factor * median:
                return f"loss {loss:.4g} > {cfg.spike_factor:g} x median {median:.4g} of the last {cfg.spike_window}"
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
        for key, want in self.expect.items():
            if meta.get(key) != want:
                raise CheckpointError(f"Trainer: the checkpoint was saved with another {key}")
        for name, shape in self.expected_arrays().items():
            if name not in arrays or tuple(arrays[name].shape) != shape:
                got = None if name not in arrays else tuple(arrays[name].shape)
                raise CheckpointError(f"Trainer: checkpoint array {name!r} has shape {got}, the model needs {shape}")
        opt = dict(meta["optim"], m=arrays["optim/m"], v=arrays["optim/v"])
        if [[n, list(s)] for n, s in opt.get("layout", [])] != self.optimizer.layout():
            raise CheckpointError("Trainer: the checkpoint's optimizer state is for another parameter layout")
        model_state = {k[len("model/"):]: v for k, v in arrays.items() if k.startswith("model/")}
        self.model.load_state_dict(model_state, strict=True)  # copies in place: the optimizer's views stay valid
        self.optimizer.load_state_dict(opt)
        self.step = int(meta["step"])
        self.history = [float(x) for x in meta["guard"]["history"]]
        if full:
            self.rng.bit_generator.state = meta["rng"]
            self.loader.load_state_dict(meta["loader"])
            self.rollbacks = int(meta["guard"]["rollbacks"])
            self.log_lines = int(meta["log_lines"])
            self.tokens_seen = int(meta["tokens_seen"])

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
            raise RuntimeError(f"Trainer: {self.rollbacks} rollbacks (max_rollbacks={self.config.max_rollbacks}); "
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
        from tqdm import tqdm  # plain tqdm: tqdm.auto needs ipywidgets in Jupyter, and warns without it

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
# The end of a run: unigram baseline and held-out fills
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


def heldout_lines(docs: list[str], n: int, rng: np.random.Generator, max_chars: int = 90) -> list[tuple[str, str]]:
    """``n`` (text with one word replaced by [MASK], the word) pairs from validation lines of at most ``max_chars``
    characters (and at least half that), so that a line fits the positions the model was trained on."""
    lines = [ln.strip() for d in docs for ln in d.splitlines()]
    lo = max_chars // 2
    lines = [ln for ln in lines if lo <= len(ln) <= max_chars and "[" not in ln
             and sum(c.isalpha() for c in ln) >= 0.6 * lo]
    out = []
    if not lines or n == 0:
        return out
    for i in rng.permutation(len(lines))[: 4 * n]:
        line = lines[int(i)]
        words = [m for m in re.finditer(r"[A-Za-z']{3,9}", line) if m.start() > 0]
        if not words:
            continue
        w = words[int(rng.integers(len(words)))]
        out.append((line[: w.start()] + "[MASK]" + line[w.end():], w.group()))
        if len(out) == n:
            break
    return out


def show_fills(model, tokenizer, pairs, say=print, max_new: int = 12) -> list[dict]:
    """Fill each held-out line greedily (at most ``max_new`` tokens) and print the fill beside the truth."""
    # The decoder lives one layer up (minglm/generate.py); the main job borrows it for its closing demonstration.
    from minglm.generate import Sampling, fill

    model.eval()
    rows = []
    for text, truth in pairs:
        got = fill(model, tokenizer, text, Sampling(greedy=True, max_len=max_new)).fills[0]
        rows.append({"text": text, "truth": truth, "fill": got})
    model.train()
    if rows:
        say("held-out lines: [MASK] filled greedily by the model  (fill | truth)")
        for r in rows:
            mark = "=" if r["fill"] == r["truth"] else " "
            say(f"  {r['text']}\n      model {r['fill']!r:14} {mark} truth {r['truth']!r}")
    return rows


# --------------------------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m minglm train",
        description="Train a GLM. With no arguments: the tiny config on character-level Shakespeare (CPU, minutes).",
    )
    ap.add_argument("--config", default=None, help="tiny | small | base | FILE.json (a run's config.json works)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override one config field (train or model.<field>), repeatable, e.g. --set lr=1e-3")
    ap.add_argument("--steps", type=int, help="optimizer steps (default: the config's)")
    ap.add_argument("--out", default="runs", help="folder that holds run folders (default: runs)")
    ap.add_argument("--name", help="run folder name (default: <corpus>-<preset>-<objective>, numbered if taken)")
    ap.add_argument("--seed", type=int, help="seed of the one random generator")
    ap.add_argument("--device", choices=("auto", "cpu", "gpu"), help="where to train (default: the config's)")
    ap.add_argument("--resume", metavar="RUN", help="continue a run folder exactly from its latest checkpoint")
    ap.add_argument("--corpus", help="shakespeare | tang | a .txt file or folder of them")
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


def _unique_run_dir(out: Path, name: str) -> Path:
    path, i = out / name, 2
    while path.exists():
        path, i = out / f"{name}-{i}", i + 1
    return path


def _truncate_log(path: Path, n_lines: int) -> None:
    """Keep the first ``n_lines`` lines of log.jsonl (what the checkpoint had seen), atomically."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True) if path.exists() else []
    if len(lines) < n_lines:
        raise CheckpointError(f"resume: {path} has {len(lines)} lines, the checkpoint expects at least {n_lines}")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".log.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.writelines(lines[:n_lines])
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _resolve_resume(resume: str, out: str) -> Path:
    for cand in (Path(resume), Path(out) / resume):
        if (cand / "config.json").is_file():
            return cand
    raise ValueError(f"--resume: {resume!r} is not a run folder with a config.json (looked in . and {out}/)")


def _model_config(preset: str | None, model: dict, train: TrainConfig, vocab_size: int) -> GLMConfig:
    model = dict(model)
    model.setdefault("vocab_size", vocab_size)
    if model["vocab_size"] < vocab_size:
        raise ValueError(f"model.vocab_size={model['vocab_size']} is smaller than the tokenizer's {vocab_size}")
    model["seq_len"] = train.seq_len
    # Part B reuses the blanks' positions, but a long [gMASK] span can have block ids up to seq_len + 1
    model["max_len"] = max(int(model.get("max_len") or 0), train.seq_len + 1)
    try:
        return GLMConfig.from_dict(model)
    except TypeError as e:
        raise ValueError(f"model config: {e}") from e


def _objective_overrides(cfg: TrainConfig) -> dict:
    """Data settings from the config that the objective takes (mask_ratio: the GLM mixtures and BERT only)."""
    from minglm.data.objectives import GLM_PRESETS

    if cfg.objective in GLM_PRESETS or cfg.objective == "bert":
        return {"mask_ratio": cfg.mask_ratio}
    if cfg.mask_ratio != TrainConfig.mask_ratio:
        raise ValueError(f"TrainConfig.mask_ratio does not apply to the {cfg.objective!r} objective")
    return {}


def _eval_modes(objective) -> list[str | None]:
    """The GLM modes to validate separately (those with a non-zero probability); [None] for the baselines."""
    if not hasattr(objective, "bert_prob"):
        return [None]
    doc = 1.0 - objective.bert_prob - objective.sentence_prob
    modes = [m for m, p in (("token", objective.bert_prob), ("sentence", objective.sentence_prob),
                            ("document", doc)) if p > 1e-9]
    return modes if len(modes) > 1 else [None]


def main(argv: list[str] | None = None) -> int:
    """``python -m minglm train [options]``; returns the exit code (2 for bad input)."""
    t_main = time.perf_counter()
    args = build_parser().parse_args(argv)
    try:
        return _run(args, t_main)
    except (ValueError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _run(args, t_main: float) -> int:
    from minglm.data.corpus import encode_corpus, load_corpus
    from minglm.data.loader import BlockLoader, iter_eval_batches
    from minglm.tokenizer import CharTokenizer, load_tokenizer

    model_fields = field_types(GLMConfig)
    flags = {"steps": args.steps, "seed": args.seed, "device": args.device, "corpus": args.corpus,
             "objective": args.objective, "eval_every": args.eval_every, "ckpt_every": args.ckpt_every,
             "keep": args.keep, "time_limit": args.time_limit}
    if args.resume:
        blocked = [f for f in ("config", "corpus", "objective", "seed") if getattr(args, f) is not None] + \
            (["set"] if args.set else [])
        if blocked:
            raise ValueError(f"--resume continues a run with its saved config; drop --{', --'.join(blocked)}")
        run_dir = _resolve_resume(args.resume, args.out)
        saved = json.loads((run_dir / "config.json").read_text())
        preset, model_dict, train_dict = saved.get("preset"), dict(saved["model"]), dict(saved["train"])
    else:
        preset, model_dict, train_dict = load_config_source(args.config or "tiny", GLMConfig.PRESETS)
        apply_overrides(model_dict, train_dict, args.set, model_fields)
    train_dict.update({k: v for k, v in flags.items() if v is not None})
    cfg = make_train_config(train_dict)
    verbose = not args.quiet
    say = print if verbose else (lambda *a, **k: None)

    # data and tokenizer
    corpus = load_corpus(cfg.corpus, val_fraction=cfg.val_fraction, seed=0)
    if args.resume:
        tokenizer = load_tokenizer(run_dir / "tokenizer.json")
    else:
        tokenizer = CharTokenizer.from_texts(corpus.docs)
    tok_json, vocab_sha = tokenizer_record(tokenizer)
    train_ids, val_ids = encode_corpus(corpus, tokenizer)
    if not val_ids:
        raise ValueError(f"corpus {cfg.corpus!r} has no validation documents (it needs at least two documents)")
    mcfg = _model_config(preset, model_dict, cfg, tokenizer.vocab_size)

    # the run folder
    if not args.resume:
        out = Path(args.out)
        if args.name:
            run_dir = out / args.name
            if run_dir.exists():
                raise ValueError(f"--name: {run_dir} exists; pick another name or --resume it")
        else:
            run_dir = _unique_run_dir(out, f"{corpus.name}-{preset or 'custom'}-{cfg.objective}".replace("/", "_"))
        run_dir.mkdir(parents=True)
        tokenizer.save(run_dir / "tokenizer.json")
        (run_dir / "log.jsonl").write_text("")
    config_record = {"preset": preset, "model": mcfg.to_dict(), "train": cfg.to_dict()}
    write_json_atomic(run_dir / "config.json", config_record)

    # model, optimizer, loaders (the rng: model init, then data order, blanks and dropout)
    rng = np.random.default_rng(cfg.seed)
    model = GLM(mcfg, rng)
    xp = device_xp(cfg.device)
    if xp is not np:
        model.to("gpu")  # before the optimizer: it makes the parameters views of its flat buffer
    optimizer = AdamW(model, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay)
    schedule = CosineSchedule(cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
    data_kw = _objective_overrides(cfg)
    loader = BlockLoader(train_ids, tokenizer, cfg.seq_len, cfg.batch_size, objective=cfg.objective, **data_kw)
    val_batches = []
    for mode in _eval_modes(loader.objective):
        for b in iter_eval_batches(val_ids, tokenizer, cfg.seq_len, cfg.batch_size, objective=cfg.objective,
                                   seed=VAL_SEED, max_batches=cfg.eval_batches, mode=mode, **data_kw):
            val_batches.append((b.objective, b))
    meta = {"model_config": mcfg.to_dict(), "train_config": cfg.to_dict(), "vocab_sha256": vocab_sha,
            "vocab_size": tokenizer.vocab_size, "tokenizer": tok_json}
    expect = {"model_config": mcfg.to_dict(), "vocab_sha256": vocab_sha}
    spike = _steps_list(args.inject_spike_at, "--inject-spike-at")
    nan = _steps_list(args.inject_nan_at, "--inject-nan-at")
    trainer = Trainer(model, optimizer, schedule, loader, rng, cfg, val_batches, ckpt_dir=run_dir / "ckpt",
                      log_path=run_dir / "log.jsonl", meta=meta, expect=expect,
                      fault_hook=make_fault_hook(spike, nan), verbose=verbose)
    if args.resume:
        ckpt_dir = run_dir / "ckpt"
        if latest_checkpoint(ckpt_dir) is None:
            raise CheckpointError(f"--resume: no valid checkpoint in {ckpt_dir}")
        step = trainer.load_checkpoint(ckpt_dir, full=True)
        _truncate_log(run_dir / "log.jsonl", trainer.log_lines)
        say(f"resumed {run_dir} at step {step}")

    n_params = model.num_parameters()
    say(f"run {run_dir}: {n_params:,} parameters, vocab {tokenizer.vocab_size}, {cfg.objective} on {corpus.name} "
        f"({sum(map(len, train_ids)):,} train / {sum(map(len, val_ids)):,} val tokens), {cfg.steps} steps of "
        f"{cfg.batch_size}x{cfg.grad_accum} windows of {cfg.seq_len}, device {cfg.device}")
    t_train = time.perf_counter()
    reason = trainer.fit(until=args.stop_at)
    train_s = time.perf_counter() - t_train
    if reason == "until":
        say(f"stopped after step {trainer.step} (--stop-at); continue with --resume {run_dir}")
        return 0

    # the end: final numbers, baseline, fills, plots
    final = trainer.last_eval if trainer.last_eval.get("step") == trainer.step else {
        "step": trainer.step, **trainer.evaluate()}
    base_loader = BlockLoader(train_ids, tokenizer, cfg.seq_len, cfg.batch_size, objective=cfg.objective, **data_kw)
    unigram = unigram_baseline(base_loader, val_batches, tokenizer.vocab_size)
    # a character tokenizer: [CLS] + line + <eos> must fit in the seq_len positions seen in training
    max_chars = min(90, cfg.seq_len - 6)
    pairs = heldout_lines(corpus.val, cfg.fill_lines, np.random.default_rng(VAL_SEED), max_chars=max_chars)
    fills = show_fills(model, tokenizer, pairs, say=say)
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
        "fills": fills,
    }
    write_json_atomic(run_dir / "summary.json", summary)
    if cfg.plots:
        try:
            import viz

            viz.save_run_plots(run_dir)
        except (ImportError, AttributeError):
            pass
    val_loss = final.get("val_loss", float("nan"))
    print(f"done: {trainer.step} steps in {train_s:.0f} s ({reason}); val loss {val_loss:.3f}"
          f" vs unigram {unigram:.3f} (ratio {summary['val_over_unigram']:.2f}); val acc "
          f"{final.get('val_acc', float('nan')):.3f}; run folder {run_dir}")
    return 0
