"""The command line, ``python -m minglm <command> ...``: the app layer on top of the library.

One module per command, each with ``main(argv) -> exit code``:

    train      minglm/commands/train.py     train a GLM (the main job; no arguments = Shakespeare on the CPU)
    fill       minglm/commands/fill.py      fill [MASK] / [sMASK] / [gMASK] blanks with a trained run
    finetune   minglm/commands/finetune.py  cloze fine-tuning (genre of a Shakespeare passage), full and LoRA
    eval       minglm/commands/eval.py      the fill benchmark of a run against word-counting baselines
    bundle     minglm/commands/bundle.py    make a finished run the bundled course model (minglm/course.py)
    sample     minglm/commands/sample.py    print one sample of a corpus: Part A, Part B, positions, mask
    plot       minglm/commands/plot.py      pictures: mask, positions, spans, loss, attention
    export     minglm/commands/export.py    a run's weights as .npz under the official GLM (or SAT) names
    ablate     minglm/commands/ablate.py    GLM-130B's switches, each on and off: one table, one plot
    bench      minglm/commands/bench.py     benchmarks: ops | data | train | generate | attention

This layer owns what a library function should not: argparse, run folders, printing, demonstrations and plots
(it is the only part of the package that imports ``viz``). The library below it never imports a command.
Modules are imported only when their command runs, so ``python -m minglm --help`` stays fast.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": "train a GLM (no arguments: the default config on Shakespeare, CPU)",
    "fill": "fill the blanks of a text with a trained run",
    "finetune": "cloze fine-tuning on the Shakespeare genre task (full and LoRA)",
    "eval": "benchmarks of a trained run: `eval fill RUN` against word-counting baselines",
    "bundle": "make a finished run the bundled course model (weights, tokenizer, config, manifest)",
    "sample": "print one blank-infilling sample of a corpus: Part A, Part B, positions, mask",
    "plot": "draw masks, positions, span lengths, loss curves, attention weights",
    "export": "write a run's weights under the official GLM or SAT parameter names",
    "ablate": "train with each GLM-130B switch on and off (--quick: a few minutes); one table, one plot",
    "bench": "benchmarks: ops | data | train | generate | attention",
}


def error_line(exc: BaseException) -> str:
    """An exception as one line for ``error: ...``: an OSError as "FILE: reason", any other by its message."""
    if isinstance(exc, OSError) and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def fail(exc: BaseException, prefix: str = "error") -> int:
    """Print ``exc`` as one line on stderr and return the exit code of a refused command, 2."""
    print(f"{prefix}: {error_line(exc)}", file=sys.stderr)
    return 2


def _usage() -> str:
    lines = ["usage: python -m minglm <command> [options]", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, help_ in COMMANDS.items()]
    lines += ["", "Run `python -m minglm <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"minglm: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"minglm.commands.{command}")
    return int(module.main(rest) or 0)
