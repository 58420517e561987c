"""A worker program that misbehaves on cue, for the fault suite (never shipped to devices).

Runs the real `fedcore.worker` with its `Worker.train` wrapped. The fault comes from the
environment variable FEDMNIST_FAULT_<NAME> = "<kind>@<round>[,<kind>@<round>...]", the round a
number or `*` (every round):
  exit@R      the process dies on receiving round R's request (as if killed mid-round)
  stall@R     it stops answering in round R (sleeps, like a SIGSTOPped device)
  nan@R       it returns weights full of NaN in round R
  shape@R     it returns a wrong-shape tensor in round R
  scale:S@R   it returns g + S (w - g), g the round's global model, w its trained one (S a float,
              e.g. -10: flipped and boosted; 10: boosted, the model-replacement attack)
  signflip@R  it returns g - (w - g): an update of honest size pointing the wrong way
  count:N@R   it reports N as its example count (its weight under sample weighting), written as a
              JSON number: an int, or A^B for A to the power B (10^400: 401 digits)
  inflate@R   as an evaluator, it claims 10^400 correct answers for every model in round R
  shortrow@R  as an evaluator, it sends confusion matrices with short rows in round R
A fault fires once per training unless FEDMNIST_FAULT_ALWAYS=1 (a marker file in
FEDMNIST_FAULT_DIR records that it fired, so a restarted worker behaves).

`install(lab_dir, python)` makes a lab device run it: the program and a `device-python` wrapper
(the device's `ssh.python`) that starts it in place of `-m fedcore.worker`, reading the cues from
`<lab>/faults.env`, which the coordinator's side rewrites before each training.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from fedcore import protocol, wire
from fedcore.worker import Worker, main


def _fault(name: str, rnd: int) -> str | None:
    """The fault cued for worker `name` in round `rnd` (a round's own cue before `*`)."""
    spec = os.environ.get(f"FEDMNIST_FAULT_{name.upper()}", "")
    out = {}
    for item in filter(None, spec.split(",")):
        kind, _, when = item.partition("@")
        out[when] = kind
    return out.get(str(rnd), out.get("*"))


def _fire_once(name: str, kind: str, rnd: int) -> bool:
    if os.environ.get("FEDMNIST_FAULT_ALWAYS") == "1":
        return True
    safe = kind.replace(":", "_").replace("^", "_")
    marker = Path(os.environ["FEDMNIST_FAULT_DIR"]) / f"{name}-{safe}-{rnd}"
    if marker.exists():
        return False
    marker.touch()
    return True


original_train = Worker.train


def lying_train(self: Worker, meta: wire.Meta, payload: bytes) -> bytes:
    rnd = int(meta.get("round", 0))
    kind = _fault(self.name, rnd)
    if kind is None or not _fire_once(self.name, kind, rnd):
        return original_train(self, meta, payload)
    if kind == "exit":
        os._exit(9)
    if kind == "stall":
        time.sleep(3600)
    reply = original_train(self, meta, payload)
    m, body = wire.decode_frame(reply)
    kind, _, arg = kind.partition(":")
    if kind == "count":  # the honest reply with only the count changed
        base, _, power = arg.partition("^")
        m["num_examples"] = int(base) ** int(power) if power else int(base)
        return wire.encode_frame(m, body)
    update = protocol.decode_update(m, body)
    if kind in ("scale", "signflip"):
        s = float(arg) if kind == "scale" else -1.0
        g = protocol.decode_train(meta, payload).weights
        update.weights.update({k: g[k] + s * (w - g[k]) for k, w in update.weights.items()})
    elif kind == "nan":
        update.weights["fc2.bias"] = torch.full_like(update.weights["fc2.bias"], float("nan"))
    elif kind == "shape":
        update.weights["fc1.weight"] = torch.zeros(3, 3)
    return protocol.encode_update(update)


original_evaluate = Worker.evaluate


def lying_evaluate(self: Worker, meta: wire.Meta, payload: bytes) -> bytes:
    rnd = int(meta.get("round", 0))
    kind = _fault(self.name, rnd)
    if kind not in ("inflate", "shortrow") or not _fire_once(self.name, kind, rnd):
        return original_evaluate(self, meta, payload)
    m, body = wire.decode_frame(original_evaluate(self, meta, payload))
    for result in m["results"].values():
        if kind == "inflate":
            result["correct"] = 10**400
        else:
            result["confusion"] = [row[:3] for row in result["confusion"]]
    return wire.encode_frame(m, body)


Worker.train = lying_train  # type: ignore[method-assign]
Worker.evaluate = lying_evaluate  # type: ignore[method-assign]

if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:2] == ["-m", "fedcore.worker"]:
        args = args[2:]
    sys.exit(main(args))
