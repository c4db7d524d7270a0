"""lorakit's modules form layers: no import cycles, no hidden imports inside functions, light to import."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import lorakit

ROOT = Path(lorakit.__file__).parent
# The core: what `import lorakit` loads. The CLI, the trainer (lorakit.train) and the server (lorakit.serve) sit
# on top of it and may import lazily (transformers, matplotlib, torch.distributed, uvicorn are loaded only by the
# commands that need them).
CORE_EXCLUDED = ("lorakit.cli", "lorakit.__main__", "lorakit.train", "lorakit.serve")
# Imports inside functions the core is allowed, each an optional extra loaded on first use.
LAZY_ALLOWED = {("lorakit.kinds", "bitsandbytes"), ("lorakit.kinds", "bitsandbytes.functional")}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(name: str, path: Path) -> list[tuple[str, bool]]:
    """(imported module, whether the import is inside a function) for every import statement of the file."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((alias.name, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[:len(package.split(".")) - child.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from lorakit import registry` imports the module lorakit.registry; `from x import name` imports x.
                for alias in child.names:
                    full = f"{base}.{alias.name}"
                    found.append((full if full in MODULES else base, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


GRAPH = {name: {m for m, _ in _imports(name, path) if m in MODULES and m != name} for name, path in MODULES.items()}


def _cycle() -> list[str] | None:
    """One import cycle among lorakit's modules, as a path, or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(GRAPH):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_sees_the_imports_it_must():
    # The walk must find imports at module level and inside functions, absolute and `from lorakit import x`.
    assert "lorakit.layers" in GRAPH["lorakit.model"] and "lorakit.registry" in GRAPH["lorakit"]
    assert ("bitsandbytes", True) in _imports("lorakit.kinds", MODULES["lorakit.kinds"])
    assert "lorakit.train.trainer" in GRAPH["lorakit.cli"]  # imported inside the command functions


def test_no_import_cycles_among_lorakit_modules():
    assert _cycle() is None, " -> ".join(_cycle())


def test_a_cycle_would_be_found(monkeypatch):
    monkeypatch.setitem(GRAPH, "lorakit.kinds", GRAPH["lorakit.kinds"] | {"lorakit.adapt"})
    found = _cycle()
    assert found is not None and found[0] == found[-1] and "lorakit.kinds" in found


def test_the_core_imports_nothing_inside_functions_but_optional_extras():
    lazy = {(name, module) for name, path in MODULES.items() if not name.startswith(CORE_EXCLUDED)
            for module, inside in _imports(name, path) if inside}
    assert lazy <= LAZY_ALLOWED, sorted(lazy - LAZY_ALLOWED)


def test_import_lorakit_loads_neither_bitsandbytes_nor_transformers():
    code = ("import sys, lorakit as lk; lk.LoRA(); "
            "print(sorted(m for m in ('bitsandbytes', 'transformers', 'peft', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
