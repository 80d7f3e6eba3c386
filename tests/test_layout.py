"""The shape of the code: no import cycles (module level or inside functions), stage packages that
import only downwards, no underscore names imported across packages, small files."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "millis"
MAX_LINES = 400
# Stage packages, lowest first: a package may import only from packages before it (and itself).
LAYERS = ("common", "kernels", "encoder", "gpu", "gen", "runtimes", "artifact", "evaluate", "train", "optimize",
          "serve", "loadgen", "cli")


def module_name(p: Path) -> str:
    parts = list(p.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in ROOT.rglob("*.py")}


def imports(path: Path, known: dict[str, Path]) -> list[tuple[str, str, int]]:
    """(imported module, imported name or "", line) for every import anywhere in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, "", node.lineno) for a in node.names if a.name.startswith("millis")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("millis"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.append((sub, "", node.lineno) if sub in known else (node.module, a.name, node.lineno))
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: {t for t, _, _ in imports(p, known) if t in known and t != m} for m, p in known.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str]:
        state[n] = 1
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        state[n] = 2
        stack.pop()
        return []

    for n in sorted(g):
        if n not in state and (c := visit(n)):
            return c
    return []


def stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_finds_a_cycle_when_there_is_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycles_even_inside_functions():
    g = graph()
    assert len(g) > 50, "the walk found too few modules"
    assert find_cycle(g) == []


def test_stage_packages_import_only_downwards():
    bad = []
    for m, targets in graph().items():
        s = stage(m)
        if s not in LAYERS:
            continue
        for t in targets:
            ts = stage(t)
            if ts in LAYERS and LAYERS.index(ts) > LAYERS.index(s):
                bad.append(f"{m} -> {t}")
    assert bad == []


def test_every_module_belongs_to_a_stage_package():
    loose = [m for m in modules() if m.count(".") == 1 and stage(m) not in LAYERS and m != "millis.__main__"]
    assert loose == []  # only millis/__init__.py sits at the top, and __main__.py (`python -m millis`: the CLI)


def package_of(module: str, known: dict[str, Path]) -> str:
    return module if known[module].name == "__init__.py" else module.rsplit(".", 1)[0]


def test_no_underscore_name_imported_across_packages():
    known = modules()
    bad = []
    for m, p in known.items():
        for target, name, line in imports(p, known):
            leaf = name or target.rsplit(".", 1)[-1]
            if not leaf.startswith("_") or leaf.startswith("__") or target not in known:
                continue
            if package_of(target, known) != package_of(m, known):
                bad.append(f"{p.relative_to(ROOT.parent)}:{line} imports {leaf} from {target}")
    assert bad == []


def test_no_file_over_the_line_limit():
    big = {str(p.relative_to(ROOT.parent)): n for p in ROOT.rglob("*.py")
           if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert big == {}
