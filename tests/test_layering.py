"""Dependencies point down (flows -> tasks -> fedcore) and the worker side runs on Python 3.8."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys

from conftest import ROOT

from fedcore.transport.ssh.bundle import module_path, worker_modules


def test_fedcore_imports_neither_prefect_nor_mlflow() -> None:
    code = (
        "import json, sys, pkgutil, importlib, fedcore\n"
        "for m in pkgutil.walk_packages(fedcore.__path__, 'fedcore.'):\n"
        "    importlib.import_module(m.name)\n"
        "print(json.dumps(sorted(k for k in sys.modules if k.split('.')[0] in "
        "('prefect', 'mlflow', 'tasks', 'flows'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert json.loads(out.stdout) == []


def test_loading_a_config_does_not_import_paramiko() -> None:
    # fedcore.config validates `ssh:` settings with SSHConfig; only talking SSH needs paramiko.
    code = "import json, sys, fedcore.config\nprint(json.dumps('paramiko' in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert json.loads(out.stdout) is False


def test_ssh_package_exports_its_names_not_its_submodules() -> None:
    # A submodule named like an exported function would replace it on the package once imported.
    code = (
        "import json, pkgutil, importlib, types, fedcore.transport.ssh as ssh\n"
        "for m in pkgutil.iter_modules(ssh.__path__, ssh.__name__ + '.'):\n"
        "    importlib.import_module(m.name)\n"
        "print(json.dumps(sorted(n for n in ssh.__all__ "
        "if isinstance(getattr(ssh, n), types.ModuleType))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert json.loads(out.stdout) == []


def test_worker_side_uses_only_torch_and_the_standard_library() -> None:
    # worker_modules() is what ships to a device: the worker's fedcore import closure.
    allowed = set(sys.stdlib_module_names) | {"torch", "__future__"}
    # imported inside functions only, so a worker without it starts while secure aggregation
    # is off (tests/fedcore/test_secagg_parts.py checks that importing does not load it)
    lazy = {"privacy.primitives": {"cryptography"}}
    for name in worker_modules():
        tree = ast.parse(module_path(name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                tops = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                tops = [(node.module or "").split(".")[0]]
            else:
                continue
            assert set(tops) <= allowed | lazy.get(name, set()), f"fedcore/{name}.py imports {tops}"


def test_worker_side_parses_as_python_38() -> None:
    files = [str(module_path(n)) for n in worker_modules()]
    for f in files:
        ast.parse(open(f).read(), feature_version=(3, 8))
    vermin = shutil.which("vermin") or str(ROOT / ".venv" / "bin" / "vermin")
    out = subprocess.run(
        [vermin, "-t=3.8-", "--no-tips", "--violations", "--eval-annotations", *files],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
