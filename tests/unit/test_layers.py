"""The layering STYLE.md asks for, checked on the source: no import circle anywhere in the
core, ``model`` imports nothing of ours but ``errors`` (which imports nothing), and the core never imports an adapter package
(``kvm``, ``xen``, ``hooks``: entry points only). Module-level and ``TYPE_CHECKING`` imports
both count: a circle of annotations is still a circle to a reader."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, known: set[str]) -> set[str]:
    """The known modules ``path`` imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            for a in node.names:
                sub = f"{target}.{a.name}"
                found.add(sub if sub in known else target)
    return {m for m in found if m in known and m != name}


def graph(package: str) -> dict[str, set[str]]:
    files = list((ROOT / package).rglob("*.py"))
    known = {module_name(p) for p in files}
    return {module_name(p): imports(p, known | {"kvm", "xen", "hooks"}) for p in files}


def test_no_import_circle_in_the_core() -> None:
    try:
        tuple(TopologicalSorter(graph("orchestrator")).static_order())
    except CycleError as exc:
        raise AssertionError(f"import circle: {' -> '.join(exc.args[1])}") from None


def test_model_imports_nothing_of_ours_and_the_core_no_adapter() -> None:
    g = graph("orchestrator")
    for mod, deps in g.items():
        assert not {d for d in deps if d.split(".")[0] in ("kvm", "xen", "hooks")}, mod
        if mod.startswith("orchestrator.model"):
            outside = {d for d in deps if not d.startswith("orchestrator.model")}
            assert outside <= {"orchestrator.errors"}, (mod, deps)
    assert g["orchestrator.errors"] == set()
