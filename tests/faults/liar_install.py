"""Put the lying worker on a lab: `lying_worker.py` copied into the lab folder behind a wrapper
the lab users can run as their device's Python.

Its own module so that installing the liar never imports it: `lying_worker` patches the worker
class of the process that imports it.
"""

from __future__ import annotations

from pathlib import Path

LIAR = Path(__file__).with_name("lying_worker.py")


def install(lab_dir: Path, python: str) -> str:
    """The trainers' `ssh.python`: the lab's interpreter, except that the worker program is
    `lying_worker.py` reading its cues from `<lab>/faults.env` (created empty)."""
    liar = lab_dir / "lying_worker.py"
    liar.write_text(LIAR.read_text())
    (lab_dir / "faults.env").write_text("")
    wrapper = lab_dir / "device-python"
    wrapper.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "-m" ] && [ "$2" = "fedcore.worker" ]; then\n'
        "    shift 2\n"
        f"    . {lab_dir / 'faults.env'}\n"
        '    export PYTHONPATH="$PWD"\n'
        f'    exec {python} {liar} "$@"\n'
        "fi\n"
        f'exec {python} "$@"\n'
    )
    for f in (liar, lab_dir / "faults.env", wrapper):
        f.chmod(0o755)
    return str(wrapper)
