"""``python -m minglm bench <topic> [options]``: pick one of the benchmarks in ``minglm/bench/`` and run it.

Each benchmark is a module of ``minglm.bench`` with its own ``main(argv)`` and options; this command only chooses one.
"""

from __future__ import annotations

import importlib
import sys

BENCHES = ("ops", "data", "train", "generate", "attention")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in BENCHES:
        print(f"usage: python -m minglm bench {{{'|'.join(BENCHES)}}} [options]", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(f"minglm.bench.{argv[0]}")
    return int(module.main(argv[1:]) or 0)
