"""The package's shape: no import cycles, light imports at the top, third-party libraries where they belong, and a
runner that calls pass hooks instead of probing for them."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "mmopt"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported(node: ast.Import | ast.ImportFrom) -> list[str]:
    """Every module name an import statement loads (``from mmopt.memory import counting`` loads the submodule)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]


def imports(path: Path) -> tuple[set[str], set[str]]:
    """(imported at module level, imported inside functions): every module name, third-party ones included.
    Imports under ``if TYPE_CHECKING:`` never run and are left out."""
    top: set[str] = set()
    inner: set[str] = set()

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for other in child.orelse:
                    visit(other, in_function)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                (inner if in_function else top).update(_imported(child))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text()), False)
    return top, inner


def _graph(function_level: bool) -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        top, inner = imports(path)
        targets = top | inner if function_level else top
        # a package's __init__ runs before its modules, so an import of a parent package adds nothing
        graph[name] = {t for t in targets if t in MODULES and t != name and not name.startswith(t + ".")}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path that ends where it starts, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_parser_sees_both_kinds_of_import():
    top, inner = imports(MODULES["mmopt.memory.profile"])
    assert {"mmopt.memory.estimator", "mmopt.registry"} <= top
    assert "mmopt.checkpoint" in inner and "mmopt.adapters.base" not in top | inner   # TYPE_CHECKING only
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_module_level_imports_have_no_cycle():
    assert _cycle(_graph(function_level=False)) is None


def test_no_cycle_even_through_imports_inside_functions():
    assert _cycle(_graph(function_level=True)) is None


def test_heavy_libraries_wait_until_used():
    """Importing any mmopt module except the nn.Module definitions in ``mmopt/modules`` loads no torch, so
    ``mmopt --help`` and ``mmopt validate`` stay instant."""
    light = [name for name in MODULES if not name.startswith("mmopt.modules.")]
    code = ("import importlib, sys\n"
            f"for name in {light!r}: importlib.import_module(name)\n"
            "print(sorted(m for m in ('torch', 'transformers', 'open_clip', 'bitsandbytes', 'torchvision') "
            "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["[]"]


@pytest.mark.parametrize("library, allowed", [
    ("bitsandbytes", ("mmopt.passes.quantize",)),
    ("open_clip", ("mmopt.adapters.",)),
    ("transformers", ("mmopt.adapters.",)),
])
def test_third_party_libraries_stay_where_they_belong(library, allowed):
    users = {name for name, path in MODULES.items()
             if any(t == library or t.startswith(library + ".") for t in set().union(*imports(path)))}
    assert users and all(name.startswith(allowed) for name in users), sorted(users)


@pytest.mark.parametrize("module", ["mmopt.pipeline", "mmopt.checkpoint", "mmopt.report"])
def test_the_runner_calls_pass_hooks_without_probing(module):
    tree = ast.parse(MODULES[module].read_text())
    probes = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Call)
              and isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr")]
    assert probes == []
