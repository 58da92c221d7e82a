"""The tree's shape: imports run down the floors, and the README's equation index points at code that exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "headstyle"
# Floors from the bottom (README, Layout): a module may import from its own floor and the ones below.
FLOORS: tuple[tuple[str, ...], ...] = (
    ("io", "settings", "progress", "runtime", "input_files", "weight_files", "cameras", "geometry", "training"),
    ("generator", "priors"),
    ("distill", "export", "mesh", "faces", "crafted", "testing"),
    ("attention", "metrics"),
    ("stylize",),
    ("sfa",),
    ("lab",),
    ("app",),
    ("cli", "__main__"),
)
FLOOR = {name: level for level, names in enumerate(FLOORS) for name in names}


def _room(module: str) -> str:
    return module.split(".")[1] if module.count(".") >= 1 else ""


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("headstyle."):
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("headstyle.")]
    return found


def _module_room(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    return rel.parts[0]


def test_every_module_has_a_floor() -> None:
    rooms = {_module_room(p) for p in SRC.rglob("*.py")} - {"__init__"}
    assert rooms <= set(FLOOR), sorted(rooms - set(FLOOR))


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_imports_run_down_the_floors(path: Path) -> None:
    room = _module_room(path)
    if room == "__init__":
        return
    upward = [m for m in _imports(path) if _room(m) in FLOOR and FLOOR[_room(m)] > FLOOR[room]]
    assert not upward, f"{path.relative_to(SRC)} imports from a higher floor: {upward}"


LAB_ROOMS = ("world", "prior", "experiments")


@pytest.mark.parametrize("path", sorted((SRC / "lab").rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_the_lab_rooms_import_downwards(path: Path) -> None:
    """lab/world <- lab/prior <- lab/experiments: no room imports from one above it."""
    parts = path.relative_to(SRC / "lab").parts
    if len(parts) == 1:
        return
    own = LAB_ROOMS.index(parts[0])
    rooms = [m.split(".")[2] for m in _imports(path) if m.startswith("headstyle.lab.")]
    assert all(LAB_ROOMS.index(r) <= own for r in rooms), f"{path.relative_to(SRC)} imports {rooms}"


def _defined(path: Path, name: str) -> bool:
    """Whether ``name`` (a function, a class, or Class.method) is defined at the top of ``path``."""
    tree = ast.parse(path.read_text())
    head, _, attr = name.partition(".")
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == head:
            if not attr:
                return True
            return isinstance(node, ast.ClassDef) and any(
                isinstance(n, ast.FunctionDef) and n.name == attr for n in node.body
            )
    return False


def test_the_equation_index_points_at_code_that_exists() -> None:
    readme = (ROOT / "README.md").read_text()
    index = readme[readme.index("### Where each paper's equations live") :]
    refs = re.findall(r"`([\w/]+\.py):([\w.]+)`", index)
    assert len(refs) > 30
    missing = [f"{file}:{name}" for file, name in refs if not (SRC / file).is_file() or not _defined(SRC / file, name)]
    assert not missing, missing
