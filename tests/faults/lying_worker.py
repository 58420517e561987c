"""A worker program that misbehaves on cue, for the fault suite (never shipped to devices).

Runs the real `fedcore.worker` with its `Worker.train` wrapped. The fault comes from the
environment variable FEDMNIST_FAULT_<NAME> = "<kind>@<round>[,<kind>@<round>...]":
  exit@R   the process dies on receiving round R's request (as if killed mid-round)
  stall@R  it stops answering in round R (sleeps, like a SIGSTOPped device)
  nan@R    it returns weights full of NaN in round R
  shape@R  it returns a wrong-shape tensor in round R
A fault fires once per training unless FEDMNIST_FAULT_ALWAYS=1 (a marker file in
FEDMNIST_FAULT_DIR records that it fired, so a restarted worker behaves).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from fedcore import protocol, wire
from fedcore.worker import Worker, main


def _faults(name: str) -> dict[int, str]:
    spec = os.environ.get(f"FEDMNIST_FAULT_{name.upper()}", "")
    out = {}
    for item in filter(None, spec.split(",")):
        kind, _, rnd = item.partition("@")
        out[int(rnd)] = kind
    return out


def _fire_once(name: str, kind: str, rnd: int) -> bool:
    if os.environ.get("FEDMNIST_FAULT_ALWAYS") == "1":
        return True
    marker = Path(os.environ["FEDMNIST_FAULT_DIR"]) / f"{name}-{kind}-{rnd}"
    if marker.exists():
        return False
    marker.touch()
    return True


original_train = Worker.train


def lying_train(self: Worker, meta: wire.Meta, payload: bytes) -> bytes:
    rnd = int(meta.get("round", 0))
    kind = _faults(self.name).get(rnd)
    if kind is None or not _fire_once(self.name, kind, rnd):
        return original_train(self, meta, payload)
    if kind == "exit":
        os._exit(9)
    if kind == "stall":
        time.sleep(3600)
    reply = original_train(self, meta, payload)
    m, body = wire.decode_frame(reply)
    update = protocol.decode_update(m, body)
    if kind == "nan":
        update.weights["fc2.bias"] = torch.full_like(update.weights["fc2.bias"], float("nan"))
    elif kind == "shape":
        update.weights["fc1.weight"] = torch.zeros(3, 3)
    return protocol.encode_update(update)


Worker.train = lying_train  # type: ignore[method-assign]

if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:2] == ["-m", "fedcore.worker"]:
        args = args[2:]
    sys.exit(main(args))
