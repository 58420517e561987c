"""The lab's error, and running the system tools the lab drives (ssh-keygen, useradd, pip, ...).

Every tool failure becomes a `LabError` whose message names the step and the tool's own words, so
`fedmnist lab up` can print one line that says what went wrong and what to do.
"""

from __future__ import annotations

import subprocess

from fedcore.errors import FedError


class LabError(FedError):
    """The lab could not be set up or torn down; the message says what to do."""


def run(argv: list[str], what: str, timeout: float = 60.0) -> str:
    """Run `argv` and return its standard output.

    Args:
        argv: the command and its arguments.
        what: the step, as the error message names it (e.g. "useradd fedlab-alice").
        timeout: seconds before the command counts as failed.

    Raises:
        LabError: the command could not start, ran past `timeout` or exited non-zero.
    """
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LabError(f"{what} failed: {exc}") from None
    if done.returncode != 0:
        raise LabError(
            f"{what} failed (exit status {done.returncode}): {(done.stderr or done.stdout).strip()}"
        )
    return done.stdout
