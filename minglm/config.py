"""Training configuration: the ``TrainConfig`` dataclass, its presets, and typed ``key=value`` overrides.

A run is described by two dataclasses, saved together as ``runs/<name>/config.json``::

    {"preset": "tiny", "model": {GLMConfig fields}, "train": {TrainConfig fields}}

``--config`` picks a preset (``tiny``, ``small``, ``base``, ``glm-130b``) or such a JSON file (a run's own config.json
works), and ``--set key=value`` changes one field. The value is parsed by the field's declared type (int, float, bool,
str, optional), never by ``eval``; an unknown key is an error that lists the valid ones. A bare key is looked up in
TrainConfig, then in GLMConfig; ``model.key`` / ``train.key`` say which explicitly.

The tiny defaults are tuned for the main job, ``python -m minglm train`` with no arguments: GLM-Base's token-level
blank infilling on character-level Shakespeare, a few minutes on 2 CPU cores. What the tuning found (val loss on
Part-B targets; a unigram scores 3.1): at GLM's own settings (15 % masked, 16 windows of 128, lr 3e-3) the loss sits
near 2.5 for the first thousand steps, because Part-B tokens must learn to find their blank's neighbours through two
learned position tables, and only a sixth of the tokens carry a loss. Progress followed the number of steps more
than their size, so the default takes many small steps (8 windows of 64), and blanks half of each window
(``mask_ratio=0.5``): 4000 such steps reached 1.82. ``--set mask_ratio=0.15`` gives GLM's exact objective.
Reference: docs/official-code.md §4 for the optimiser settings.
"""

from __future__ import annotations

import json
import math
import types
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np


@dataclass
class TrainConfig:
    # data
    corpus: str = "shakespeare"  # a corpus name (shakespeare, tang) or a path to .txt files
    objective: str = "glm-base"  # glm-base | glm-10b | glm-doc | glm-130b | bert | gpt | prefix | t5
    mask_ratio: float = 0.5  # share of each window blanked by glm-* and bert. GLM uses 0.15 (the small/base
    # presets keep it); more Part-B targets per step learned much faster in the few CPU minutes of the main job:
    # val loss after 4000 steps 2.07 at 0.3 and 1.8 at 0.5 (measured; 0.15 was still at 2.3-2.5)
    span_unit: str = "token"  # token | word | known_word: what a span length counts for the glm-* token blanks.
    # "word" is a named deviation from GLM (whose spans are over word pieces): spans cover whole words with their
    # leading space, so training blanks look like what a user blanks (minglm.data.samplers.WordSpanSampler);
    # "known_word" also starts and ends them only at words the vocabulary holds as one token
    span_lambda: float = 3.0  # Poisson mean of a token-level span's length (GLM: 3), in span_unit units
    window_start: str = "any"  # any | sentence: where a training window may start. "sentence" is what the official
    # BlockDataset does (each cut moved to a sentence start), so [CLS] is followed by a line's first word as in
    # a text given to fill; "any" tiles the stream without overlap (minglm.data.loader.make_windows)
    line_windows: float = 0.0  # share of the training windows cut to their first line or lines and closed with
    # <eos> (minglm.data.loader.cut_to_lines), so the model also sees the short [CLS] text <eos> that fill is given
    all_words: float = 0.0  # share of token-level batches with every word a blank and Part A whole (a deviation
    # from GLM: GLMObjective.all_words; it needs a model with hide_own_token and either one layer or raw_part_a,
    # README rounds 11 and 12)
    tokenizer: str = "char"  # char | bpe | word, learned from the train documents at the start of the run:
    # byte-level BPE, or whole words with a byte fallback (minglm/tokenizer.py)
    bpe_vocab: int = 4096  # ids of the bpe or word tokenizer, specials and the 256 bytes included
    val_fraction: float = 0.1  # share of documents held out for validation (split by document, seeded)
    seq_len: int = 64  # tokens per window before blanking (Part A + Part B is a little longer)
    batch_size: int = 8  # windows per micro-batch. On 2 cores, progress went with the number of steps much more
    # than with their size: 8 windows of 64 beat 16 of 128 at equal time by a wide margin
    grad_accum: int = 1  # micro-batches per optimizer step; each loss is scaled by 1/grad_accum
    # optimisation (docs/official-code.md §4: AdamW, betas of GLM-10B, decay 0.1, clip 1.0, warmup then cosine)
    steps: int = 3600  # optimizer steps: 3-4 minutes on 2 cores (0.053-0.066 s a step measured, with its batch)
    lr: float = 2e-3  # peak; a tiny model takes a larger lr than GLM's 1e-4..2e-4 (5e-3 and 1e-2 were worse)
    warmup: int = 100  # linear warmup steps (if >= steps, the lr never reaches its peak)
    min_lr_ratio: float = 0.1  # the cosine ends at 10 % of the peak
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip: float = 1.0  # global gradient-norm clip (0 = off)
    # evaluation, checkpoints, logging
    eval_every: int = 500  # steps between validation passes (0 = only at the end)
    eval_batches: int = 8  # fixed validation batches per objective mode
    ckpt_every: int = 1000  # steps between checkpoints (0 = only at the end)
    keep: int = 3  # keep the newest K checkpoints
    seed: int = 0  # one numpy Generator for init, data order, blanks and dropout
    device: str = "auto"  # auto | cpu | gpu
    time_limit: float = 0.0  # seconds of training after which the run stops early and saves (0 = no limit;
    # the tiny preset sets 240 so that the main job, with its start, final evaluation and the fill benchmark
    # (about 30 s idle, 100 s on a machine busy with three other jobs), stays near 5 minutes on a busy machine)
    # loss-spike guard: roll back to the last checkpoint when the loss is not finite or jumps above the median
    spike_factor: float = 3.0  # a loss above factor × median of the recent window is a spike (0 = off)
    spike_window: int = 50  # how many recent accepted losses the median is taken over
    spike_warmup: int = 200  # no spike_factor test before this step (early losses fall fast) ...
    spike_gross: float = 10.0  # ... but a loss above this × the running median is a spike from step 1 on (before
    # any loss is accepted the reference is ln(vocab_size), the loss of a uniform guess; 0 = off). Early losses
    # fall by at most a few times; an injected ×1000 or a real blow-up is caught at once (minglm/train.py)
    max_rollbacks: int = 5  # give up (raise) after this many rollbacks in one run
    # the end of the run
    fill_words: int = 400  # one-word blanks of the end-of-run fill benchmark (minglm/fill_eval.py)
    fill_spans: int = 200  # 2-4-word blanks of it (both 0: no benchmark)
    fill_lines: int = 6  # example rows of the benchmark printed (text, truth, model, n-gram)
    plots: bool = True  # draw runs/<name>/plots/*.png with viz at the end (when viz is importable)

    def __post_init__(self):
        check_types({f.name: getattr(self, f.name) for f in fields(self)}, TrainConfig, "TrainConfig")
        positive = ("seq_len", "batch_size", "grad_accum", "steps", "eval_batches", "keep", "spike_window")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        for name in ("warmup", "eval_every", "ckpt_every", "spike_warmup", "max_rollbacks", "fill_words", "fill_spans",
                     "fill_lines", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"TrainConfig.{name} must be a non-negative integer, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be positive, got {self.lr!r}")
        for name in ("weight_decay", "clip", "time_limit", "spike_factor"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.spike_gross != 0 and not self.spike_gross > 1:
            raise ValueError(f"TrainConfig.spike_gross must be 0 (off) or > 1, got {self.spike_gross!r}")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"TrainConfig.mask_ratio must be in (0, 1), got {self.mask_ratio!r}")
        for name in ("beta1", "beta2", "val_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"TrainConfig.{name} must be in [0, 1), got {getattr(self, name)!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if not self.eps > 0:
            raise ValueError(f"TrainConfig.eps must be positive, got {self.eps!r}")
        if not self.span_lambda > 0 or self.span_lambda == float("inf"):
            raise ValueError(f"TrainConfig.span_lambda must be a finite number > 0, got {self.span_lambda!r}")
        if not 0.0 <= self.all_words <= 1.0:
            raise ValueError(f"TrainConfig.all_words must be in [0, 1], got {self.all_words!r}")
        if not 0.0 <= self.line_windows <= 1.0:
            raise ValueError(f"TrainConfig.line_windows must be in [0, 1], got {self.line_windows!r}")
        if self.window_start not in ("any", "sentence"):
            raise ValueError(f"TrainConfig.window_start must be any or sentence, got {self.window_start!r}")
        if self.span_unit not in ("token", "word", "known_word"):
            raise ValueError(f"TrainConfig.span_unit must be token, word or known_word, got {self.span_unit!r}")
        if self.tokenizer not in ("char", "bpe", "word"):
            raise ValueError(f"TrainConfig.tokenizer must be char, bpe or word, got {self.tokenizer!r}")
        if not isinstance(self.bpe_vocab, int) or isinstance(self.bpe_vocab, bool) or self.bpe_vocab < 264:
            raise ValueError(f"TrainConfig.bpe_vocab must be an integer >= 264 (8 specials + 256 bytes), "
                             f"got {self.bpe_vocab!r}")
        if self.device not in ("auto", "cpu", "gpu"):
            raise ValueError(f"TrainConfig.device must be auto, cpu or gpu, got {self.device!r}")

    def to_dict(self) -> dict:
        return asdict(self)


# The default run and the course model fill whole words: a word tokenizer (4,096 ids; the default run's 2,048),
# blanks of whole words the vocabulary holds (spans of Poisson 0.25 words: one word 88 % of the time), half of each
# window blanked, windows of 32 tokens that start at a sentence (README, "What was tried": each choice measured
# against the word n-gram).
_WORD_RECIPE = dict(tokenizer="word", bpe_vocab=4096, span_unit="known_word", span_lambda=0.25, mask_ratio=0.5,
                    window_start="sentence", seq_len=32, lr=2e-3, warmup=100)

# Training presets that go with GLMConfig.PRESETS. tiny: the CPU main job; small: docs/performance.md's benchmark
# config (about 0.4 s a step on 2 cores, so runs are longer); base: a GPU.
TRAIN_PRESETS = {
    "tiny": dict(time_limit=240.0),
    "small": dict(seq_len=256, batch_size=8, steps=2000, lr=1e-3, warmup=100, eval_every=200, ckpt_every=500,
                  mask_ratio=0.15),
    "base": dict(seq_len=512, batch_size=16, steps=20000, lr=6e-4, warmup=1000, eval_every=1000, ckpt_every=2000,
                 mask_ratio=0.15, device="gpu"),
    # the default run: one layer (the `words` model preset) on 5,000 steps of 32 windows of _WORD_RECIPE, with
    # 2,048 ids instead of 4,096: the tied head is most of a step, so a step takes a quarter to a third less time,
    # and the fills stay the same while the 210 s hold more steps (README, "What was tried", round 10)
    "words": dict(_WORD_RECIPE, bpe_vocab=2048, batch_size=32, steps=5000, eval_every=500, ckpt_every=1000,
                  time_limit=210.0),
    # the course model: the same recipe on ten times the windows (12,000 steps of 128), half of them cut to a
    # line or a few, nine batches in ten with every word a blank (README, "What was tried", round 4: the one line
    # fill is given stopped looking like nothing it had trained on; round 5: tokens, not layers; round 6: 12,000
    # steps rather than 8,000 or a second layer, and the default's short spans; round 11: every word a blank)
    "course": dict(_WORD_RECIPE, line_windows=0.5, all_words=0.9, batch_size=128, steps=12000, eval_every=1000,
                   ckpt_every=1000, time_limit=3300.0),
    # tiny's run with GLM-130B's data mixture; the model preset of the same name turns on its switches
    "glm-130b": dict(objective="glm-130b", time_limit=240.0),
}


# --- typed key=value overrides ---------------------------------------------------------------------------------


def field_types(cls) -> dict[str, object]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _fits(value, typ) -> bool:
    """Whether ``value`` (as JSON or --set gives it) is a valid value of the annotation ``typ``."""
    if isinstance(typ, types.UnionType) or typing.get_origin(typ) is typing.Union:
        return any(value is None if a is type(None) else _fits(value, a) for a in typing.get_args(typ))
    if typ is bool:
        return isinstance(value, bool | np.bool_)
    if typ is int:
        return isinstance(value, int | np.integer) and not isinstance(value, bool)
    if typ is float:  # an int is a fine float; NaN and inf are not (they cannot be written to config.json)
        return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool) \
            and math.isfinite(value)
    if typ is str:
        return isinstance(value, str)
    return True


def _kind(typ) -> str:
    names = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string", type(None): "null"}
    return " or ".join(names.get(a, str(a)) for a in (typing.get_args(typ) or (typ,)))


def check_types(values: dict, cls, where: str) -> None:
    """A ValueError naming the field when a value of ``values`` has the wrong type for the dataclass ``cls``, or is
    a NaN or infinite number (``lr: "abc"`` in a config.json, ``--set clip=nan``). Unknown keys are not checked here.
    """
    hints = field_types(cls)
    for key, value in values.items():
        typ = hints.get(key)
        if typ is not None and not _fits(value, typ):
            raise ValueError(f"{where}.{key} must be {_kind(typ)}, got {value!r}")


def parse_value(text: str, typ, where: str):
    """Parse ``text`` as ``typ`` (int, float, bool, str, or X | None); a ValueError names ``where`` on failure."""
    args = typing.get_args(typ)
    if isinstance(typ, types.UnionType) or typing.get_origin(typ) is typing.Union:
        if text.strip().lower() in ("none", "null") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return parse_value(text, inner[0], where)
    s = text.strip()
    try:
        if typ is bool:
            if s.lower() in ("1", "true", "yes", "on"):
                return True
            if s.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            return int(s)
        if typ is float:
            return float(s)
        if typ is str:
            return text
    except ValueError:
        pass
    else:
        raise ValueError(f"{where}: cannot set a field of type {typ}")
    raise ValueError(f"{where}: {text!r} is not a valid {getattr(typ, '__name__', typ)}")


def apply_overrides(model_cfg: dict, train_cfg: dict, pairs: list[str], model_fields: dict[str, object]) -> None:
    """Apply ``key=value`` strings in place to the two config dicts (model fields' types given by the caller)."""
    train_fields = field_types(TrainConfig)
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--set: expected key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        key = key.strip().replace("-", "_")
        section = None
        if key.startswith(("model.", "train.")):
            section, key = key.split(".", 1)
        if section in (None, "train") and key in train_fields:
            train_cfg[key] = parse_value(value, train_fields[key], f"--set train.{key}")
        elif section in (None, "model") and key in model_fields:
            model_cfg[key] = parse_value(value, model_fields[key], f"--set model.{key}")
        else:
            known = sorted(train_fields) + sorted(f"model.{k}" for k in model_fields)
            raise ValueError(f"--set: unknown config field {key!r}; known fields: {', '.join(known)}")


def load_config_source(source: str, model_presets: dict) -> tuple[str | None, dict, dict]:
    """(preset name or None, model dict, train dict) from a preset name or a JSON file."""
    if source in model_presets:
        return source, dict(model_presets[source]), dict(TRAIN_PRESETS.get(source, {}))
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"--config: {source!r} is neither a preset ({', '.join(model_presets)}) nor a JSON file")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--config: cannot read {source} as JSON ({e})") from e
    if not isinstance(data, dict) or not set(data) <= {"preset", "model", "train"}:
        raise ValueError(f"--config: {source} must be a JSON object with keys 'preset', 'model', 'train'")
    preset = data.get("preset")
    model, train = {}, {}
    if preset is not None:
        if preset not in model_presets:
            raise ValueError(f"--config: {source} names an unknown preset {preset!r}")
        model, train = dict(model_presets[preset]), dict(TRAIN_PRESETS.get(preset, {}))
    model.update(data.get("model") or {})
    train.update(data.get("train") or {})
    return preset, model, train


def make_train_config(values: dict) -> TrainConfig:
    """A TrainConfig from a dict; unknown keys are an error naming them."""
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"TrainConfig: unknown fields {unknown}; known fields are {sorted(known)}")
    return TrainConfig(**values)
