"""What a worker tells the coordinator about the machine it runs on: once in its hello, and after
every round of training.

Hello facts (strings, `hello_facts`): the CUDA device's name, capability and memory when the worker
trains on CUDA, torch's threads, the machine's total memory and CPU count, the `cryptography`
version when it imports (secure aggregation needs it), whether `torch.func` is there (DP-SGD's
per-example gradients need it), a Jetson's model from the device tree, and the thermal zone whose
temperature the rounds report. Round facts (numbers, `round_facts`): the process's current and
peak resident memory, the CUDA memory high-water mark of the round when it trains on CUDA, and that
zone's temperature. A fact the machine does not expose is left out, never reported as 0: a
laptop has no device tree, a container often no thermal zones.

Everything is read from /proc, /sys and torch, never from a command. Runs on the device's own
Python (>= 3.8) with torch and the standard library only (fedcore.worker imports it).
"""

# ruff: noqa: UP006, UP007, UP035, UP045 - runs on Python 3.8: typing's generics, not builtins.
from __future__ import annotations

import glob
import importlib.util
import os
import platform
import resource
import sys
from typing import Dict, List, Optional, Tuple

import torch

MB = 1 << 20
# Where a temperature comes from, best first: a Jetson's zones are named like `SOC-therm`,
# `CPU-therm`, `GPU-therm`; a PC's `x86_pkg_temp` or `acpitz`.
ZONE_PREFERENCE = ("soc", "cpu", "x86_pkg", "gpu")
MIN_CELSIUS, MAX_CELSIUS = -60.0, 200.0  # a reading outside is a sensor's error code
FACT_LIMIT = 200  # characters of one fact's value kept


def _read(path: str, limit: int = 4096) -> Optional[str]:
    """A small text file's content, or None when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("utf-8", "replace")
    except OSError:
        return None


def jetson_model(root: str = "/") -> Optional[str]:
    """The device tree's model string (`NVIDIA Jetson Orin Nano Developer Kit`), if any."""
    text = _read(os.path.join(root, "proc/device-tree/model"))
    if text is None:
        return None
    model = text.replace("\x00", "").strip()
    return model[:FACT_LIMIT] or None


def total_memory_mb(root: str = "/") -> Optional[int]:
    """The machine's memory in MiB, from /proc/meminfo's MemTotal."""
    text = _read(os.path.join(root, "proc/meminfo"))
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "MemTotal:" and parts[1].isdigit():
            return int(parts[1]) // 1024
    return None


def thermal_zones(root: str = "/") -> List[Tuple[str, str]]:
    """(zone type, temp file) of every thermal zone, in zone order."""
    zones = []
    pattern = os.path.join(root, "sys/class/thermal/thermal_zone*")
    for zone in sorted(glob.glob(pattern), key=_zone_number):
        kind = _read(os.path.join(zone, "type"), 256)
        if kind is not None and kind.strip():
            zones.append((kind.strip()[:64], os.path.join(zone, "temp")))
    return zones


def _zone_number(path: str) -> int:
    digits = path.rsplit("thermal_zone", 1)[-1]
    return int(digits) if digits.isdigit() else 1 << 30


def read_celsius(temp_file: str) -> Optional[float]:
    """A zone's temperature in degrees Celsius (the file holds millidegrees), if plausible."""
    text = _read(temp_file, 64)
    try:
        value = int((text or "").strip()) / 1000.0
    except ValueError:
        return None
    return value if MIN_CELSIUS <= value <= MAX_CELSIUS else None


def pick_zone(root: str = "/") -> Optional[Tuple[str, str]]:
    """The zone whose temperature stands for the device's: the SoC's where there is one, else
    the CPU's, else the first that gives a plausible reading."""
    readable = [z for z in thermal_zones(root) if read_celsius(z[1]) is not None]
    for word in ZONE_PREFERENCE:
        for zone in readable:
            if word in zone[0].lower():
                return zone
    return readable[0] if readable else None


def memory_mb(root: str = "/") -> Dict[str, float]:
    """The process's resident memory now (`rss_mb`) and at its peak (`rss_peak_mb`), in MiB:
    /proc/self/status's VmRSS and VmHWM, else the peak from `resource` (ru_maxrss: KiB on
    Linux, bytes on macOS)."""
    out: Dict[str, float] = {}
    text = _read(os.path.join(root, "proc/self/status"), 16384)
    names = {"VmRSS:": "rss_mb", "VmHWM:": "rss_peak_mb"}
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in names and parts[1].isdigit():
            out[names[parts[0]]] = round(int(parts[1]) / 1024.0, 1)
    if "rss_peak_mb" not in out:
        try:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        except (OSError, ValueError):
            peak = 0
        if peak > 0:
            out["rss_peak_mb"] = round(peak / (MB if sys.platform == "darwin" else 1024.0), 1)
    return out


def _cryptography_version() -> Optional[str]:
    """The installed `cryptography`'s version when Python can find the package, without importing
    it: its OpenSSL bindings would add tens of MiB to every worker's memory (and to the `rss_mb`
    it reports) for a package only secure aggregation uses, and imports lazily itself."""
    try:
        if importlib.util.find_spec("cryptography") is None:
            return None
        from importlib import metadata

        return metadata.version("cryptography")[:FACT_LIMIT]
    except Exception:  # noqa: BLE001 - no metadata, a broken install: not usable either way
        return None


def _has_torch_func() -> bool:
    try:
        import torch.func  # noqa: F401 - only whether it imports
    except Exception:  # noqa: BLE001 - torch before 2.0 has no torch.func
        return False
    return True


def hello_facts(device: str, root: str = "/") -> Dict[str, str]:
    """The facts a worker's hello carries about its machine (see the module docstring).

    Args:
        device: the torch device the worker trains on (`cpu`, `cuda`, `cuda:1`).
        root: the file system root /proc and /sys are read under (tests give a fake one).
    """
    facts: Dict[str, str] = {
        "machine": platform.machine()[:FACT_LIMIT] or "unknown",
        "cpus": str(os.cpu_count() or 0),
        "threads": str(torch.get_num_threads()),
        "torch_func": "yes" if _has_torch_func() else "no",
    }
    memory = total_memory_mb(root)
    if memory is not None:
        facts["memory_mb"] = str(memory)
    version = _cryptography_version()
    if version is not None:
        facts["cryptography"] = version
    model = jetson_model(root)
    if model is not None:
        facts["jetson_model"] = model
    zone = pick_zone(root)
    if zone is not None:
        facts["temp_zone"] = zone[0]
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(index)
        facts["cuda_name"] = str(props.name)[:FACT_LIMIT]
        facts["cuda_capability"] = f"{props.major}.{props.minor}"
        facts["cuda_memory_mb"] = str(int(props.total_memory) // MB)
        facts["cuda_version"] = str(torch.version.cuda or "unknown")
    return facts


class RoundProbe:
    """The per-round facts of one worker: memory, CUDA's high-water mark, temperature."""

    def __init__(self, device: str, root: str = "/") -> None:
        self.device = device
        self.root = root
        self.cuda = device.startswith("cuda") and torch.cuda.is_available()
        zone = pick_zone(root)
        self.temp_file = zone[1] if zone is not None else None

    def start(self) -> None:
        """Mark a round's start: CUDA's high-water mark counts from here."""
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def facts(self) -> Dict[str, float]:
        """The round's facts, read now (at its end); what the machine lacks is left out."""
        out = memory_mb(self.root)
        if self.cuda:
            out["cuda_max_mb"] = round(torch.cuda.max_memory_allocated(self.device) / MB, 1)
        if self.temp_file is not None:
            celsius = read_celsius(self.temp_file)
            if celsius is not None:
                out["temp_c"] = celsius
        return out


def round_facts(device: str, root: str = "/") -> Dict[str, float]:
    """One reading of the per-round facts (a `RoundProbe` made and read at once)."""
    return RoundProbe(device, root).facts()
