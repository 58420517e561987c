"""The "Jetson lab" (`fedmnist lab`): emulated devices on loopback, each a real sshd with a shard.

What a fleet of Jetsons gives the ssh transport, on one machine: per device an OpenSSH server on
127.0.0.1 and its own port, with its own host key, and - as root - its own Linux user
`fedlab-<name>` whose home (mode 700) holds the device's work folder and its shard, provisioned as
idx files holding only that worker's images and readable only by that user. The coordinator logs
in with one lab key pair and verifies every host key against the lab's own known_hosts file,
exactly as it would against real devices. A device's Python is a venv of Debian's
/usr/bin/python3 with torch, built once and shared by every lab. Without root, every device logs
in as the current user (no per-user separation). A device may be slower or steady
(`DeviceSpeed`), for a heterogeneous fleet.

This is a development and test harness, not library code: a training never imports it. It lives
outside `fedcore` because it drives the machine itself (sshd, useradd, /proc, pip), which the
library must not. Modules, one concern each: `lab` (up, status, down, kill/restart a device, the
state file), `sshd` (one device's server), `users` (Linux users), `procs` (/proc), `python` (the
devices' venv), `provision` (a device's home and shard), `inventory` (lab-workers.yaml),
`commands` (LabError, running tools).
"""

from __future__ import annotations

from .commands import LabError
from .inventory import INVENTORY_FILE, DeviceSpeed
from .lab import LabHost, LabInfo, kill_host, lab_down, lab_status, lab_up, restart_host
from .python import ensure_lab_python
from .users import user_name

__all__ = [
    "INVENTORY_FILE",
    "DeviceSpeed",
    "LabError",
    "LabHost",
    "LabInfo",
    "ensure_lab_python",
    "kill_host",
    "lab_down",
    "lab_status",
    "lab_up",
    "restart_host",
    "user_name",
]
