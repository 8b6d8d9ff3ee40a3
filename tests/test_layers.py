"""The package's layers, read from the source: every ``dlm_ray`` import (at module level or inside a
function) runs one way, config → core → io → data → train / serving / eval, with no cycle; config
and core import neither Ray nor DeepSpeed; and only ``core/kinds.py`` decides what a model kind
does (the model itself and the config's own validation aside)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dlm_ray"
# A module may import from its own layer and the layers before it. runtime.py (starting Ray) sits
# beside data: what starts or feeds Ray may use it, the pure layers may not.
RANK = {"config": 0, "core": 1, "io": 2, "runtime": 3, "data": 3, "train": 4, "serving": 4, "eval": 4}
# The top layer's three packages stand side by side: none imports another.
SIDE_BY_SIDE = {"train", "serving", "eval"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module named by an import anywhere in the file, functions included."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}  # "from pkg import module"
    return out


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {m: {i for i in imports(p) if i in modules and i != m} for m, p in modules.items()}


def layer(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "dlm_ray"


def test_no_import_cycle():
    g = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(g):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_layers_import_one_way():
    wrong = []
    for m, deps in graph().items():
        a = layer(m)
        if a not in RANK:
            continue  # dlm_ray/__init__.py
        for d in deps:
            b = layer(d)
            if b not in RANK or a == b:
                continue
            if RANK[b] > RANK[a] or (a in SIDE_BY_SIDE and b in SIDE_BY_SIDE):
                wrong.append(f"{m} imports {d}")
    assert not wrong, "\n".join(sorted(wrong))


def test_pure_layers_import_no_ray_or_deepspeed():
    for p in [*(PACKAGE / "config").rglob("*.py"), *(PACKAGE / "core").rglob("*.py")]:
        heavy = {i for i in imports(p) if i.split(".")[0] in ("ray", "deepspeed")}
        assert not heavy, f"{p.relative_to(ROOT)} imports {sorted(heavy)}"


def test_only_kinds_decides_what_a_kind_does():
    allowed = {PACKAGE / "core" / "kinds.py", PACKAGE / "core" / "model.py", PACKAGE / "config" / "schema.py"}
    rule = re.compile(r"attention\s*(?:==|!=|in\b)|\.(?:block_)?causal\b|getattr\([^)]*\"(?:block_)?causal\"")
    found = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
             for p in PACKAGE.rglob("*.py") if p not in allowed
             for n, line in enumerate(p.read_text().splitlines(), 1) if rule.search(line)]
    assert not found, "\n".join(found)
