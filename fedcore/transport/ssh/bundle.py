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
    "device_facts",
    "worker",
    "secagg_worker",
    # secure aggregation and DP-SGD, device side (imported by worker.py once wired)
    "privacy.__init__",
    "privacy.errors",
    "privacy.shamir",
    "privacy.fixedpoint",
    "privacy.primitives",
    "privacy.neighbours",
    "privacy.secagg_messages",
    "privacy.secagg_device",
    "privacy.dpsgd",
)
# The fedcore package folder: this file is fedcore/transport/ssh/bundle.py.
PACKAGE_DIR = Path(__file__).resolve().parents[2]


def module_path(module: str) -> Path:
    """The file of the fedcore module `module`, dotted below fedcore (e.g. `wire` ->
    fedcore/wire.py, `privacy.shamir` -> fedcore/privacy/shamir.py, `privacy.__init__` ->
    fedcore/privacy/__init__.py)."""
    return PACKAGE_DIR.joinpath(*module.split(".")).with_suffix(".py")


def _resolve(name: str) -> str | None:
    """`name` (dotted below fedcore) as a module file, or its package's `__init__`; else None."""
    if module_path(name).is_file():
        return name
    if module_path(f"{name}.__init__").is_file():
        return f"{name}.__init__"
    return None


def fedcore_imports(module: str) -> set[str]:
    """The fedcore modules that fedcore/<module>.py imports, dotted below fedcore.

    Args:
        module: a fedcore module name, dotted below fedcore, e.g. `worker` or `privacy.shamir`.

    Returns:
        The modules it imports relatively (`from .x import y`, `from . import x`, `from ..x
        import y`) or absolutely (`from fedcore.x import y`), plus the `__init__` of every
        subpackage on the way (Python runs it before the module).

    Raises:
        OSError: the module's file cannot be read; SyntaxError: it does not parse.
    """
    tree = ast.parse(module_path(module).read_bytes())
    package = module.split(".")[:-1]  # `privacy.shamir` and `privacy.__init__` -> ["privacy"]
    found: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level == 0:
            if not (node.module and node.module.startswith("fedcore.")):
                continue
            base = node.module.split(".")[1:]
        else:
            up = node.level - 1
            if up > len(package):
                continue
            base = package[: len(package) - up] + (node.module.split(".") if node.module else [])
        targets = [base] if node.module else [base + [a.name] for a in node.names]
        for parts in targets:
            for i in range(1, len(parts)):  # the subpackages' __init__ on the way
                found.add(_resolve(".".join(parts[:i])) or "")
            found.add(_resolve(".".join(parts)) or "")
    found.discard("")
    found.discard(module)
    return found


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
    files = {
        f"fedcore/{m.replace('.', '/')}.py": module_path(m).read_bytes() for m in worker_modules()
    }
    digest = hashlib.sha256()
    for rel in sorted(files):
        digest.update(rel.encode() + b"\0" + str(len(files[rel])).encode() + b"\0" + files[rel])
    return digest.hexdigest()[:16], files
