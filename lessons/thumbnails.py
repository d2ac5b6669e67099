"""Run every lesson in fast mode, time it, and save the key plot of each as a thumbnail for the README.

    python lessons/thumbnails.py              # all lessons: lessons/thumbnails/NN_name.png and a table of times
    python lessons/thumbnails.py 07 10        # only these lessons

Each lesson is executed as tests/test_lessons.py does it (a real kernel, fast mode, one BLAS thread, the inline
backend, runs in a temporary folder), so the times it prints are the ones the course's budget of 10 minutes on two
cores is about. The key plot is the first figure drawn by the code cell tagged ``thumbnail``
(``# %% tags=["thumbnail"]`` in the source); it is scaled to at most 360 × 200 pixels.

Left out: writing the executed notebooks (the committed ones stay without outputs; lessons/build.py makes them).
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import jupytext
import nbclient
from PIL import Image

LESSONS = Path(__file__).resolve().parent
ROOT = LESSONS.parent
OUT = LESSONS / "thumbnails"
SIZE = (360, 200)


def run_lesson(source: Path, runs: Path) -> tuple[float, bytes | None]:
    """Execute one lesson; returns (seconds, the PNG of its thumbnail cell or None)."""
    env = {"MINGLM_FAST": "1", "TQDM_DISABLE": "1", "MINGLM_RUNS": str(runs), "OPENBLAS_NUM_THREADS": "1",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH"))
                                                                  if p)}
    os.environ.update(env)
    os.environ.pop("MPLBACKEND", None)
    nb = jupytext.read(source)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(LESSONS)}})
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    png = None
    for cell in nb.cells:
        if "thumbnail" in cell.metadata.get("tags", []):
            images = [o["data"]["image/png"] for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
            png = base64.b64decode(images[0]) if images else None  # the first figure the cell draws
    return seconds, png


def save_thumbnail(png: bytes, path: Path) -> None:
    image = Image.open(io.BytesIO(png)).convert("RGB")
    image.thumbnail(SIZE, Image.Resampling.LANCZOS)
    image.save(path, optimize=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("only", nargs="*", help="lesson numbers to run (default: all)")
    args = ap.parse_args(argv)
    sources = sorted(p for p in LESSONS.glob("[0-9][0-9]_*.py") if not args.only or p.name[:2] in args.only)
    OUT.mkdir(exist_ok=True)
    total = 0.0
    with tempfile.TemporaryDirectory() as runs:
        for source in sources:
            seconds, png = run_lesson(source, Path(runs))
            total += seconds
            if png is None:
                print(f"{source.stem}: {seconds:6.1f} s   (no thumbnail cell drew a figure)")
                continue
            save_thumbnail(png, OUT / f"{source.stem}.png")
            print(f"{source.stem}: {seconds:6.1f} s   -> {(OUT / source.stem).relative_to(ROOT)}.png", flush=True)
    print(f"total {total:.0f} s for {len(sources)} lessons ({platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
