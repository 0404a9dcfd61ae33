"""The package's layers: no import circles, and the service never imports the operator tools.

The tree states the architecture (data/, serve/, worker/, shm/ under loader_server; tools/ for
operators), so an import that crosses the wrong way is a design regression, caught here from the
source itself (every import, at module level or inside a function) and from a real interpreter.
"""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("loader_server", "loader_client")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The project modules a file imports, wherever the import statement sits. `from pkg import
    mod` depends on the module `mod`, `from mod import name` on `mod`."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = {f"{node.module}.{a.name}" for a in node.names} & modules
            found |= submodules or {node.module}
    return found & modules


def graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    modules = {module_name(p): p for p in files}
    return {name: imports_of(path, set(modules)) - {name} for name, path in modules.items()}


def test_no_module_of_the_service_imports_the_operator_tools():
    crossing = {(a, b) for a, deps in graph().items() for b in deps
                if not a.startswith("loader_server.tools") and b.startswith("loader_server.tools")
                and a != "loader_server.cli"}  # the command line is the one place that runs the tools
    assert not crossing, crossing


def test_the_package_has_no_import_circle():
    g = graph()
    # Tarjan's strongly connected components: any with two or more modules is a circle
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(v: str) -> None:
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
                circles.append(sorted(component))

    for v in g:
        if v not in index:
            visit(v)
    assert not circles, circles


def test_importing_the_server_and_the_client_loads_no_tools_and_no_tensorflow():
    code = ("import sys, loader_server.serve.server, loader_server.worker.loop, loader_server.worker.remote, "
            "loader_server.cli, loader_client;"
            "from loader_client import BatchStream;"
            "bad = sorted(m for m in sys.modules if m.startswith(('loader_server.tools', 'tensorflow', 'keras', 'torch', 'jax')));"
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_torch_client_loads_torch_but_no_keras_or_tensorflow():
    if importlib.util.find_spec("torch") is None:
        pytest.skip("needs the torch extra: pip install -e '.[torch]'")
    code = ("import sys; from loader_client import RemoteDataset; from loader_client.torch import RemoteDataset as R;"
            "assert R is RemoteDataset and 'torch' in sys.modules;"
            "print(sorted(m for m in sys.modules if m.startswith(('tensorflow', 'keras', 'jax'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
