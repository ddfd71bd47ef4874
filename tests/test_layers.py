"""The house rule: every import points down a floor (or stays in its room), so each floor can be read, tested and
replaced without the ones above it. Parsed from the source, imports inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Bottom to top. A module may import its own floor or any floor below it.
FLOORS = [
    ("model math and cost model", ("strategies", "cost")),
    ("placement", ("placement",)),
    ("engine", ("app.engine",)),
    ("Serve application", ("app.serve",)),
    ("CLI, benchmarks and load tests", ("app.cli", "load_tests")),
]
# Packages on the ground floor that must not see each other: the cost model prices the model math without importing it.
MODEL_MATH_SHARED = ("strategies.layout", "strategies.shapes")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def floor_of(module: str) -> int | None:
    for i, (_, prefixes) in enumerate(FLOORS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return None


def imports_of(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def sources() -> list[Path]:
    """Every module of the four top-level packages (empty ``__init__.py`` files hold no imports)."""
    return [p for top in ("strategies", "cost", "placement", "app", "load_tests") for p in (ROOT / top).rglob("*.py")
            if p.read_text().strip()]


def test_every_import_points_down_a_floor():
    wrong = []
    for path in sources():
        here = module_name(path)
        mine = floor_of(here)
        assert mine is not None, f"{here} is on no floor: add its folder to FLOORS"
        for line, target in imports_of(path):
            theirs = floor_of(target)
            if theirs is not None and theirs > mine:
                wrong.append(f"{path.relative_to(ROOT)}:{line} ({FLOORS[mine][0]}) imports {target} "
                             f"({FLOORS[theirs][0]})")
    assert not wrong, "imports pointing up a floor:\n" + "\n".join(wrong)


def test_cost_model_and_model_math_share_only_names_and_layouts():
    wrong = []
    for path in sources():
        here = module_name(path)
        in_cost, in_math = (here.split(".")[0] == top for top in ("cost", "strategies"))
        for line, target in imports_of(path):
            top = target.split(".")[0]
            if (in_cost and top == "strategies" and not target.startswith(MODEL_MATH_SHARED)) or (in_math and top == "cost"):
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not wrong, "the cost model and the model math import each other's internals:\n" + "\n".join(wrong)


def test_engine_messages_is_a_leaf():
    """The types that cross from the engine to the front end import nothing of dynpart."""
    own = [t for _, t in imports_of(ROOT / "app/engine/messages.py") if floor_of(t) is not None]
    assert own == []


def test_no_asyncio_wait_for():
    """``asyncio.timeout``, never ``asyncio.wait_for``: on Python 3.11 ``wait_for`` drops a cancel that lands in the
    tick its awaitable finishes, so a request whose client left ran on to its last token (test_faults has the case)."""
    calls = [f"{path.relative_to(ROOT)}:{node.lineno}" for path in sources()
             for node in ast.walk(ast.parse(path.read_text(), str(path)))
             if isinstance(node, ast.Attribute) and node.attr == "wait_for"
             and isinstance(node.value, ast.Name) and node.value.id == "asyncio"]
    assert not calls, "asyncio.wait_for at " + ", ".join(calls)
