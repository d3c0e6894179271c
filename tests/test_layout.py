"""The layout keeps its arrows: experiments -> agents -> envs, the runtime below the environments, no import circle.

Imports are read from the source (module level and inside functions; ``if TYPE_CHECKING:`` blocks
are annotations only and do not count), so a lazy import cannot hide a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("envs", "agents", "experiments")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The PruneGym modules ``path`` imports (resolved to the longest existing module name)."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    me = module_name(path)
    out: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = me.split(".")[: -node.level] if not path.name == "__init__.py" else me.split(".")
                base = ".".join([*pkg, base] if base else pkg)
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != me:
                out.add(name)
    return out


def graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    modules = {module_name(p) for p in files}
    return {module_name(p): imports_of(p, modules) for p in files}


def test_no_import_circle():
    g = graph()
    seen: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> None:
        seen[m] = 1
        stack.append(m)
        for n in sorted(g.get(m, ())):
            if n.startswith(m + ".") or m.startswith(n + "."):
                continue  # a package and its own modules
            if seen.get(n) == 1:
                cycle = stack[stack.index(n) :] + [n]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if n not in seen:
                visit(n)
        stack.pop()
        seen[m] = 2

    for m in sorted(g):
        if m not in seen:
            visit(m)


RULES = [
    # (modules under, may not import modules under, why)
    ("envs", "agents", "arrows point experiments -> agents -> envs"),
    ("envs", "experiments", "arrows point experiments -> agents -> envs"),
    ("agents", "experiments", "arrows point experiments -> agents -> envs"),
    ("envs.data", "envs.runtime", "the data layer is the lowest"),
    ("envs.runtime", "envs.measure", "the runtime knows nothing of measurement"),
    ("envs.runtime", "envs.tasks", "the runtime knows nothing of tasks"),
    ("envs.measure", "envs.tasks", "measurement knows nothing of tasks"),
    ("envs.distill", "envs.base", "preparing a model needs no environment"),
]
ENVIRONMENT_MODULES = ("envs.base", "envs.per_input", "envs.layer_by_layer", "envs.per_token")


def _under(m: str, prefix: str) -> bool:
    return m == prefix or m.startswith(prefix + ".")


def test_layers_point_one_way():
    g = graph()
    bad = [
        f"{m} imports {n} ({why})"
        for m, deps in g.items()
        for n in deps
        for a, b, why in RULES
        if _under(m, a) and _under(n, b)
    ]
    for m, deps in g.items():
        if _under(m, "envs.runtime") or _under(m, "envs.measure") or _under(m, "envs.data") or _under(m, "envs.tasks"):
            bad += [f"{m} imports the environment {n}" for n in deps if n in ENVIRONMENT_MODULES]
    assert not bad, "\n".join(bad)


def test_runtime_and_deployment_need_no_gymnasium_ray_or_hydra():
    forbidden = ("gymnasium", "ray", "hydra", "omegaconf")
    deploy = ("envs.runtime", "envs.measure", "envs.data", "envs.observation", "envs.action", "envs.interface")
    bad = []
    for p in [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]:
        m = module_name(p)
        if not any(_under(m, d) for d in (*deploy, "agents.controller", "agents.adaptive")):
            continue
        tree = ast.parse(p.read_text())
        skip = _type_checking_lines(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom) and node.lineno not in skip:
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                bad += [f"{m}:{node.lineno} imports {n}" for n in names if n.split(".")[0] in forbidden]
    assert not bad, "\n".join(bad)
