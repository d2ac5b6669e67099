"""The command line: ``python -m minglm <command> ...``.

Each command lives with the code it drives, and this file only dispatches to that module's ``main(argv)``:

    train      minglm.train          train a GLM (the main job; no arguments = Shakespeare on the CPU)
    fill       minglm.generate       fill [MASK] / [sMASK] / [gMASK] blanks with a trained run
    finetune   minglm.finetune       cloze fine-tuning (genre of a Shakespeare passage), full and LoRA
    sample     minglm.data.show      print one sample of a corpus: Part A, Part B, positions, mask
    plot       viz.cli               pictures: mask, positions, spans, loss, attention
    export     minglm.interop        a run's weights as .npz under the official GLM (or SAT) names
    bench      minglm.bench.<topic>  ops | data | train | generate | attention

Modules are imported only when their command runs, so ``python -m minglm --help`` stays fast.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("minglm.train", "train a GLM (no arguments: the default config on Shakespeare, CPU)"),
    "fill": ("minglm.generate", "fill the blanks of a text with a trained run"),
    "finetune": ("minglm.finetune", "cloze fine-tuning on the Shakespeare genre task (full and LoRA)"),
    "sample": ("minglm.data.show", "print one blank-infilling sample of a corpus: Part A, Part B, positions, mask"),
    "plot": ("viz.cli", "draw masks, positions, span lengths, loss curves, attention weights"),
    "export": ("minglm.interop", "write a run's weights under the official GLM or SAT parameter names"),
    "bench": ("minglm.bench", "benchmarks: ops | data | train | generate | attention"),
}
BENCHES = ("ops", "data", "train", "generate", "attention")


def _usage() -> str:
    lines = ["usage: python -m minglm <command> [options]", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `python -m minglm <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    from minglm.backend import tune_malloc

    tune_malloc()  # fewer page faults from the large per-step temporaries (see its docstring)
    if command not in COMMANDS:
        print(f"minglm: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    if command == "bench":
        if not rest or rest[0] not in BENCHES:
            print(f"usage: python -m minglm bench {{{'|'.join(BENCHES)}}} [options]", file=sys.stderr)
            return 0 if rest and rest[0] in ("-h", "--help") else 2
        module = importlib.import_module(f"minglm.bench.{rest[0]}")
        rest = rest[1:]
    else:
        module = importlib.import_module(COMMANDS[command][0])
    result = module.main(rest)
    return int(result or 0)
