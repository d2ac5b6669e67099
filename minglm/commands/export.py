"""``python -m minglm export RUN``: a run's weights as one .npz under the official GLM or SAT parameter names.

The renaming is ``minglm.interop``; this command loads the run (checked against its checkpoint: ``load_run``), writes
the file through a temporary file and a rename (never through a symbolic link), and prints the sizes that an
official or SAT model config needs to read it back. Every fault is one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import argparse

from minglm import interop
from minglm.checkpoint import CheckpointError
from minglm.commands import fail
from minglm.runs import load_run, resolve_run


def main(argv: list[str] | None = None) -> int:
    """``python -m minglm export RUN [--out FILE.npz] [--layout official|sat]``: a run's latest weights, renamed."""
    parser = argparse.ArgumentParser(prog="python -m minglm export",
                                     description="Write a run's weights under the official GLM or SAT names.")
    parser.add_argument("run", help="a run folder (its latest checkpoint) or a checkpoint .npz")
    parser.add_argument("--out", default=None, help="output .npz (default: <run>/glm_<layout>.npz)")
    parser.add_argument("--layout", choices=("official", "sat"), default="official")
    args = parser.parse_args(argv)
    try:
        model, _ = load_run(args.run)  # checked against config.json: the sizes printed below are the trained ones
        run_dir, _ = resolve_run(args.run)
        # a GLM-130B-switch model maps to SAT's GLM130B only; other layouts say why they cannot hold it
        out = interop.save(model, args.out or run_dir / f"glm_{args.layout}.npz", args.layout)
    except (ValueError, CheckpointError, OSError) as e:
        return fail(e)
    print(f"wrote {out}: {len(model.state_dict())} tensors in the {args.layout} layout "
          f"({interop.sat_args(model.config)})")
    return 0
