"""``python -m minglm ablate``: GLM-130B's switches, each on and off, trained on the tiny config and measured.

The library is ``minglm.ablate`` (settings, one run, the table); this command picks the size (``--quick`` for a
lesson, a few minutes; the default 20-25 minutes on 2 cores), writes ``ablation.json``, ``ablation.md`` and
``ablation.png`` (``viz.ablation.plot_ablation``) into ``--out``, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import viz.ablation  # the app layer is the one that draws
from minglm import ablate


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m minglm ablate",
        description="Train the tiny GLM with each GLM-130B switch (RoPE 1-D/2-D, DeepNorm, GeGLU, EGS, FP32 softmax) "
                    "on and off, plus a high-lr setting, at several seeds; one table and one plot.")
    ap.add_argument("--quick", action="store_true", help="the lesson's version: 120 steps a run, a few minutes")
    ap.add_argument("--steps", type=int, help="steps per run (default: 800, or 120 with --quick)")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default: 0,1)")
    ap.add_argument("--only", default=None,
                    help="comma-separated settings (default: all): " + ", ".join(s.key for s in ablate.SETTINGS))
    ap.add_argument("--lr", type=float, help="peak learning rate (default 2e-3)")
    ap.add_argument("--high-lr", type=float, help="learning rate of the unstable settings (default 2e-2)")
    ap.add_argument("--corpus", default=None, help="shakespeare (default) | tang | a .txt file or folder of them")
    ap.add_argument("--out", default=None, help="output folder (default: runs/ablation or runs/ablation-quick)")
    ap.add_argument("--estimate", action="store_true", help="time 20 steps of every setting and say how long the "
                    f"whole ablation would take here, against its {ablate.BUDGET_MINUTES}-minute budget")
    args = ap.parse_args(argv)
    try:
        cfg = ablate.QUICK if args.quick else ablate.AblationConfig()
        changes = {k: v for k, v in (("steps", args.steps), ("lr", args.lr), ("high_lr", args.high_lr),
                                     ("corpus", args.corpus)) if v is not None}
        if args.seeds:
            changes["seeds"] = tuple(int(s) for s in args.seeds.split(",") if s.strip())
        cfg = replace(cfg, **changes)
        settings = ablate.select([k.strip() for k in args.only.split(",")] if args.only else None)
        out = Path(args.out or ("runs/ablation-quick" if args.quick else "runs/ablation"))
        if args.estimate:
            est = ablate.estimate(cfg, settings)
            m = est["machine"]
            print(f"estimate: about {est['minutes']:.1f} min for {len(settings)} settings x {len(cfg.seeds)} seeds x "
                  f"{cfg.steps} steps on {m['cpu']} (load average {m['load_start']} -> {m['load_end']}); "
                  f"budget {est['budget_minutes']} min: {'fits' if est['fits'] else 'does NOT fit'}")
            return 0
        result = ablate.run_ablation(cfg, settings)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    table = ablate.format_table(result)
    (out / "ablation.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "ablation.md").write_text(table + "\n")
    viz.ablation.plot_ablation(result).savefig(out / "ablation.png", dpi=120)
    print()
    print(table)
    print(f"\nwrote {out / 'ablation.md'}, {out / 'ablation.json'} and {out / 'ablation.png'}")
    return 0
