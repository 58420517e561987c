"""The worker's code bundle: the fedcore modules `python -m fedcore.worker` imports, with a version.

Agentless: a device gets exactly these modules (see `bootstrap`), found by reading their import
statements (AST, nothing is imported), and the version is a hash of their bytes, so an unchanged
bundle is never uploaded twice. `import_closure` is the walk itself; the layering tests use it to
check that what ships needs only torch and the standard library, on Python 3.8.
"""

from __future__ import annotations

import ast
import hashlib
import threading
from collections.abc import Iterable
from pathlib import Path

# What `python -m fedcore.worker` imports, transitively: shipped to the device, nothing else.
# `worker_modules()` adds any fedcore module the worker has come to import since (and a test
# keeps this list complete), so a new device-side import never breaks a device.
WORKER_MODULES = (
    "__init__",
    "errors",
    "seeding",
    "shards",
    "model",
    "mnist",
    "training",
    "evaluation",
    "tensorcodec",
    "wire",
    "compressed_form",
    "compression",
    "messages",
    "protocol",
    "local_algorithms",
    "cpu_limit",
    "pacing",
    "worker",
)
# The fedcore package folder: this file is fedcore/transport/ssh/bundle.py.
PACKAGE_DIR = Path(__file__).resolve().parents[2]


def module_path(module: str) -> Path:
    """The file of the top-level fedcore module `module` (e.g. `wire` -> fedcore/wire.py)."""
    return PACKAGE_DIR / f"{module}.py"


def fedcore_imports(module: str) -> set[str]:
    """Top-level fedcore modules that fedcore/<module>.py imports.

    Args:
        module: a top-level fedcore module name, e.g. `worker`.

    Returns:
        Names of the modules (files directly in fedcore/) it imports, relatively (`from .x import
        y`, `from . import x`) or absolutely (`from fedcore.x import y`); subpackages are left out.

    Raises:
        OSError: the module's file cannot be read; SyntaxError: it does not parse.
    """
    tree = ast.parse(module_path(module).read_bytes())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:  # from .x import y
                found.add(node.module.split(".")[0])
            elif node.level == 1:  # from . import x, y
                found.update(a.name for a in node.names)
            elif node.level == 0 and node.module and node.module.startswith("fedcore."):
                found.add(node.module.split(".")[1])
    return {m for m in found if module_path(m).is_file()}


def import_closure(roots: Iterable[str]) -> list[str]:
    """`roots` and every fedcore module they import, transitively.

    Args:
        roots: top-level fedcore module names.

    Returns:
        The module names, sorted.

    Raises:
        OSError, SyntaxError: as `fedcore_imports`.
    """
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(fedcore_imports(m) - seen)
    return sorted(seen)


def worker_modules() -> list[str]:
    """WORKER_MODULES plus every fedcore module they import, transitively (sorted)."""
    return import_closure(WORKER_MODULES)


_BUNDLE_LOCK = threading.Lock()


def code_bundle() -> tuple[str, dict[str, bytes]]:
    """The worker's modules and their version.

    Serialised: workers start on parallel task threads, and CPython 3.11's `ast.parse` is not
    safe to run on several threads at once ("AST constructor recursion depth mismatch").

    Returns:
        (version, {path relative to the code folder, e.g. `fedcore/wire.py`: bytes}), where the
        version is the first 16 hex digits of a sha256 over paths, sizes and contents.
    """
    with _BUNDLE_LOCK:
        return _code_bundle()


def _code_bundle() -> tuple[str, dict[str, bytes]]:
    files = {f"fedcore/{m}.py": module_path(m).read_bytes() for m in worker_modules()}
    digest = hashlib.sha256()
    for rel in sorted(files):
        digest.update(rel.encode() + b"\0" + str(len(files[rel])).encode() + b"\0" + files[rel])
    return digest.hexdigest()[:16], files
