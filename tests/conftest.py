"""Shared fixtures: the real MNIST files (from ../shared/mnist, never the internet) and paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_MNIST = Path(os.environ.get("FEDMNIST_MNIST_GZ", ROOT.parent / "shared" / "mnist"))
ALICE_COUNTS = {0: 5923, 1: 6742, 2: 5958, 3: 6131}
BOB_COUNTS = {4: 5842, 5: 5421, 6: 5918}
CHARLIE_COUNTS = {7: 6265, 8: 5851, 9: 5949}


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The four raw MNIST files, verified (prepared once from the shared gzip files)."""
    from fedcore.dataprep import prepare_mnist

    target = Path(os.environ.get("FEDMNIST_TEST_DATA", ROOT / ".fedmnist" / "data" / "mnist"))
    prepare_mnist(target, local_dirs=[SHARED_MNIST], allow_download=False, allow_npm=False)
    return target
