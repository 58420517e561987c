"""Dependencies point down (flows -> tasks -> fedcore) and the worker side runs on Python 3.8."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys

from conftest import ROOT


def test_fedcore_imports_neither_prefect_nor_mlflow() -> None:
    code = (
        "import json, sys, pkgutil, importlib, fedcore\n"
        "for m in pkgutil.walk_packages(fedcore.__path__, 'fedcore.'):\n"
        "    if m.name != 'fedcore.lab': importlib.import_module(m.name)\n"
        "print(json.dumps(sorted(k for k in sys.modules if k.split('.')[0] in "
        "('prefect', 'mlflow', 'tasks', 'flows'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert json.loads(out.stdout) == []


def _worker_closure() -> set[str]:
    """fedcore modules the worker program imports, followed transitively."""
    seen: set[str] = set()
    todo = ["worker"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        tree = ast.parse((ROOT / "fedcore" / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    todo.append(node.module.split(".")[0])
                else:
                    todo.extend(a.name for a in node.names)
    return seen


def test_worker_side_uses_only_torch_and_the_standard_library() -> None:
    allowed = set(sys.stdlib_module_names) | {"torch", "__future__"}
    for name in _worker_closure():
        tree = ast.parse((ROOT / "fedcore" / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                tops = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                tops = [(node.module or "").split(".")[0]]
            else:
                continue
            assert set(tops) <= allowed, f"fedcore/{name}.py imports {tops}"


def test_worker_side_parses_as_python_38() -> None:
    files = [str(ROOT / "fedcore" / f"{n}.py") for n in sorted(_worker_closure())]
    for f in files:
        ast.parse(open(f).read(), feature_version=(3, 8))
    vermin = shutil.which("vermin") or str(ROOT / ".venv" / "bin" / "vermin")
    out = subprocess.run(
        [vermin, "-t=3.8-", "--no-tips", "--violations", "--eval-annotations", *files],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
