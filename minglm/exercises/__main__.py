"""``python -m minglm.exercises ANSWERS.py``: grade a file of answers to the lessons' exercises.

Every function (and value) the file defines under an exercise's name goes to that exercise's checker, in lesson
order. A function that raises is reported as ERROR with the exception's last line, and grading goes on. The run ends
with a summary table (lesson, exercise, PASS / FAIL / NOT DONE / ERROR, detail) and exits 0 only when every graded
exercise passed: 1 when any did not, or when the file defines none; 2 for a usage error or a file that does not
import. The checkers are in minglm/exercises/__init__.py.
"""

from __future__ import annotations

import argparse
import sys
import traceback

from minglm.exercises import FUNCTION_CHECKERS, VALUE_CHECKERS, check_all, load_answers, summary_table


def main(argv: list[str] | None = None) -> int:
    names = list(FUNCTION_CHECKERS) + [n for group in VALUE_CHECKERS for n in group]
    ap = argparse.ArgumentParser(prog="python -m minglm.exercises",
                                 description="Grade a Python file of answers to the minglm exercises.",
                                 epilog="exercise names: " + ", ".join(names))
    ap.add_argument("answers", help="a .py file that defines some of the exercise functions")
    args = ap.parse_args(argv)
    try:
        module = load_answers(args.answers)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a file that does not import is the student's error to read
        last = traceback.format_exception_only(type(e), e)[-1].strip()
        print(f"error: {args.answers} does not import: {last}", file=sys.stderr)
        return 2
    results = check_all(module)
    if not results:
        print(f"{args.answers} defines none of the exercises: {', '.join(names)}")
        return 1
    print()
    print(summary_table(results))
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
