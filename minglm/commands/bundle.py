"""``python -m minglm bundle RUN``: make a finished run the bundled course model (minglm/course_model/).

It scores the run on the fill benchmark (greedy, and with fill's default beam search), then writes a weights-only
copy of its newest checkpoint, its config and tokenizer, and MANIFEST.json (the training command, the git commit,
the SHA-256 of every file, the fill table): see minglm/course.py. Afterwards ``python -m minglm fill course "..."``
and ``eval fill course`` use it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from minglm.checkpoint import CheckpointError
from minglm.commands.eval import run_corpus
from minglm.commands.fill import DEFAULT_BEAMS
from minglm.course import COURSE_DIR, make_bundle
from minglm.fill_eval import evaluate_fill, format_report
from minglm.runs import load_run, resolve_run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m minglm bundle", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("run", help="a finished run folder runs/<name>")
    ap.add_argument("--out", default=str(COURSE_DIR), help="where the bundle goes")
    ap.add_argument("--command", default=None,
                    help="the command that trained the run, for the manifest (None: python -m minglm train "
                         "--config <its preset>)")
    ap.add_argument("--git-commit", default=None,
                    help="the commit the run was trained at, for a run trained outside this checkout (None: this "
                         "checkout's commit)")
    args = ap.parse_args(argv)
    try:
        run_dir, _ = resolve_run(args.run)
        preset = json.loads((run_dir / "config.json").read_text(encoding="utf-8")).get("preset")
        command = args.command or f"python -m minglm train --config {preset or 'FILE.json'}"
        model, tokenizer = load_run(run_dir)
        corpus = run_corpus(run_dir)
        report = evaluate_fill(model, tokenizer, corpus.train, corpus.val, beams=DEFAULT_BEAMS)
        manifest = make_bundle(run_dir, Path(args.out), command, report.to_dict(), commit=args.git_commit)
    except (FileNotFoundError, ValueError, CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    print(f"\nbundle written to {args.out}: {len(manifest['files'])} files, trained by `{command}` at "
          f"{manifest['git_commit']}")
    return 0
