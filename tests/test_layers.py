"""The package is layered the way the course is taught, and a lower layer never imports a higher one.

Every ``import`` statement of every module under minglm/ is read with ``ast`` (the ones inside functions too, since a
lazy import is still an arrow in the graph) and each arrow is checked against the table below. A new module must get
a row, so the table stays the map of the package that the README's layer table shows.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "minglm"

# Lowest first. A module may import its own layer and the layers before it, never a later one.
LAYERS = [
    ("backend", ["minglm.backend", "minglm.parallel"]),
    ("mask", ["minglm.masks"]),
    ("autograd", ["minglm", "minglm.tensor", "minglm.ops"]),
    ("kernels", ["minglm.kernels"]),
    ("functional", ["minglm.functional"]),
    ("nn", ["minglm.nn"]),
    ("model", ["minglm.model"]),
    ("data", ["minglm.tokenizer", "minglm.data"]),
    ("training", ["minglm.config", "minglm.optim", "minglm.checkpoint", "minglm.runs", "minglm.train"]),
    ("use", ["minglm.generate", "minglm.finetune", "minglm.lora", "minglm.prefix", "minglm.interop",
             "minglm.fill_eval", "minglm.course"]),
    ("experiments", ["minglm.ablate"]),
    ("course", ["minglm.exercises", "minglm.testing"]),
    ("bench", ["minglm.bench"]),
    ("commands", ["minglm.commands", "minglm.__main__"]),
]


def layer_of(module: str) -> int | None:
    """The index in LAYERS of the longest matching prefix, or None when no row names the module."""
    best, best_len = None, -1
    for rank, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or (p != "minglm" and module.startswith(p + "."))) and len(p) > best_len:
                best, best_len = rank, len(p)
    return best


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file; ``from minglm import x`` names minglm.x if x is a
    submodule."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            base = ROOT.joinpath(*node.module.split("."))
            for alias in node.names:
                if (base / f"{alias.name}.py").exists() or (base / alias.name).is_dir():
                    found.append((node.lineno, f"{node.module}.{alias.name}"))
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=[module_name(p) for p in MODULES])
def test_every_module_has_a_layer(path):
    assert layer_of(module_name(path)) is not None, (
        f"{module_name(path)} has no row in tests/test_layers.py LAYERS: say which layer it belongs to"
    )


@pytest.mark.parametrize("path", MODULES, ids=[module_name(p) for p in MODULES])
def test_no_import_runs_up_the_layers(path):
    me = module_name(path)
    mine = layer_of(me)
    for line, target in imports_of(path):
        if target == "viz" or target.startswith("viz."):
            assert LAYERS[mine][0] == "commands", (
                f"{me}:{line} imports {target}: only minglm/commands may draw (the library returns data)"
            )
            continue
        if not target.startswith("minglm"):
            continue
        theirs = layer_of(target)
        assert theirs is not None, f"{me}:{line} imports {target}, which has no row in LAYERS"
        assert theirs <= mine, (
            f"{me}:{line} imports {target}: layer {LAYERS[mine][0]!r} may not import the higher layer "
            f"{LAYERS[theirs][0]!r}"
        )


def test_training_does_not_reach_for_decoding():
    targets = {t for _, t in imports_of(PACKAGE / "train.py")}
    assert not any(t.startswith("minglm.generate") for t in targets), sorted(targets)


def test_the_readme_table_lists_the_layers_in_this_order():
    """Each row of the README's layer table names files; read top to bottom, their layers never go down."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("| layer (lower never imports higher"):].split("\n\n")[0]
    ranks = []
    for row in table.splitlines()[2:]:
        modules = [m.replace("/", ".").removesuffix(".py").rstrip(".")
                   for m in re.findall(r"`(minglm/[\w/]*(?:\.py)?)`", row)]
        known = [layer_of(m) for m in modules if layer_of(m) is not None]
        if known:
            ranks.append((min(known), max(known), row.split("|")[1].strip()))
    assert len(ranks) >= 8, table
    for (_, hi_a, a), (lo_b, _, b) in zip(ranks, ranks[1:]):
        assert hi_a <= lo_b, f"README layer table: row {a!r} holds a layer above row {b!r}'s"
