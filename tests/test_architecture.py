"""The package's rooms follow the data: no import circles, and no import against the stages' order.

Every `import` counts, at module level or inside a function (a lazy import is still a dependency),
and so do imports only made for type checking. docs/architecture.md describes the rooms.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "phi_pipeline"

# Each room may import rooms of a lower rank and itself, never one of the same or a higher rank.
RANKS = {
    "errors": 0,
    "versions": 0,
    "digests": 0,
    "tiny": 1,
    "pipeline_spec": 2,
    "orchestration": 3,
    "bundle": 4,
    "runtime": 5,
    "web": 5,
    "evaluate": 6,
    "search": 7,
    "serve": 7,
    "pipeline": 8,
    "bench": 9,
    "cli": 10,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `name` imports (`from pkg import module` names the module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        found |= {t for t in targets if t.split(".")[0] == "phi_pipeline" and t != name}
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "phi_pipeline"


def test_every_room_has_a_rank_and_says_what_it_holds():
    rooms = {_room(m) for m in _modules()} - {"phi_pipeline"}
    assert rooms == set(RANKS), f"rooms without a rank (or ranks without a room): {rooms ^ set(RANKS)}"
    for room in rooms:
        init = PACKAGE / room / "__init__.py"
        if init.is_file():
            doc = ast.get_docstring(ast.parse(init.read_text()))
            assert doc, f"{init}: needs a docstring that says what the room holds and may import"


def test_no_import_runs_against_the_stages_order():
    wrong = []
    for module, deps in _graph().items():
        room = _room(module)
        for dep in sorted(deps):
            other = _room(dep)
            if other not in ("phi_pipeline", room) and RANKS[other] >= RANKS[room]:
                wrong.append(f"{module} imports {dep} ({room} rank {RANKS[room]}, {other} rank {RANKS[other]})")
    assert not wrong, "imports against the stages' order:\n" + "\n".join(wrong)


def test_no_import_circles():
    graph = _graph()
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if dep not in graph:
                continue
            if state.get(dep) == "open":
                cycles.append(" -> ".join([*stack[stack.index(dep) :], dep]))
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def test_import_rule_check_finds_a_circle_and_an_upward_import(tmp_path, monkeypatch):
    # the checks above are only worth something if they can fail
    pkg = tmp_path / "phi_pipeline"
    for room, body in {
        "pipeline_spec": "from phi_pipeline.orchestration import runner\n",
        "orchestration": "",
    }.items():
        (pkg / room).mkdir(parents=True)
        (pkg / room / "__init__.py").write_text('"""doc"""\n')
        (pkg / room / "a.py").write_text(body + "from phi_pipeline.%s import b\n" % room)
        (pkg / room / "b.py").write_text("from phi_pipeline.%s import a\n" % room)
    (pkg / "orchestration" / "runner.py").write_text("")
    (pkg / "__init__.py").write_text("")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", pkg)
    graph = _graph()
    assert "phi_pipeline.orchestration.runner" in graph["phi_pipeline.pipeline_spec.a"]
    assert "phi_pipeline.pipeline_spec.b" in graph["phi_pipeline.pipeline_spec.a"] and "phi_pipeline.pipeline_spec.a" in graph["phi_pipeline.pipeline_spec.b"]
    for check in (test_no_import_runs_against_the_stages_order, test_no_import_circles):
        try:
            check()
        except AssertionError:
            continue
        raise AssertionError(f"{check.__name__} passed on a package that breaks it")
