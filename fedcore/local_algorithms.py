"""Worker-side state of the local algorithms a strategy switches on: SCAFFOLD's control variate.

Karimireddy, Kale, Mohri, Reddi, Stich, Suresh, 2020, "SCAFFOLD: Stochastic Controlled Averaging
for Federated Learning" (ICML), Algorithm 1 with option II. Worker i keeps a control variate c_i
for the whole training; each round it receives the server's c, corrects every local gradient by
c - c_i (`train_local`'s `grad_correction`), and after K steps of lr eta from x to y_i computes

    c_i+ = c_i - c + (x - y_i) / (K eta)        (option II)

It keeps c_i+ and replies with the delta c_i+ - c_i only: c_i itself never leaves the worker.

Tensor groups (fedcore.protocol), one tensor per model parameter unless said otherwise:
  request `control/<param>`        the server's c; absent means c = 0 (round 1)
  request `control_base/round`     int64 scalar: the last round whose delta from this worker the
                                   server applied (0: none, the server's record of c_i is zero)
  reply   `control_delta/<param>`  c_i+ - c_i

Under update compression (fedcore.compression) the delta travels in the plan's uplink codec and
c_i moves by the delta the server decodes from it (`finish`'s `transmit`), not the exact one, so
the two records stay bit-equal through a lossy codec.

Staying in step with the server's record of c_i (which is the sum of the deltas it applied):
- a delta becomes the worker's c_i only once the server acknowledges it (`control_base` names its
  round in the next request); a reply the server lost or rejected is dropped on both sides;
- `control_base` 0: the server holds c_i = 0 for this worker, so the worker starts again from 0;
- a worker that does not hold the acknowledged c_i (a new process after a reconnect or a resume:
  it starts from c_i = 0) trains with c_i = 0 and replies with weights only; the server then drops
  its record of this worker's c_i (c = mean of the records drops that share) and acknowledges 0,
  after which both sides continue from 0. Nothing silently diverges: see strategies/scaffold.py.

Runs on the device (Python 3.8, torch and the standard library only).
"""

# ruff: noqa: UP006, UP007, UP035, UP045 - runs on Python 3.8: typing's generics, not builtins.
from __future__ import annotations

import logging
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch

from . import wire
from .errors import UpdateRejected, WireError

log = logging.getLogger("fedcore.worker")

CONTROL = "control"
CONTROL_BASE = "control_base"
CONTROL_DELTA = "control_delta"


def correction(
    c: Mapping[str, torch.Tensor], c_i: Mapping[str, torch.Tensor]
) -> Dict[str, torch.Tensor]:
    """c - c_i: what SCAFFOLD adds to each local gradient."""
    return {k: c[k] - c_i[k] for k in c_i}


def control_update(
    c_i: Mapping[str, torch.Tensor],
    c: Mapping[str, torch.Tensor],
    x: Mapping[str, torch.Tensor],
    y: Mapping[str, torch.Tensor],
    steps: int,
    lr: float,
) -> Dict[str, torch.Tensor]:
    """Option II: c_i+ = c_i - c + (x - y) / (steps * lr), in float64, returned in c_i's dtypes."""
    scale = 1.0 / (steps * lr)
    out = {}
    for k, ci in c_i.items():
        drift = (x[k].to(torch.float64) - y[k].to(torch.float64)) * scale
        out[k] = (ci.to(torch.float64) - c[k].to(torch.float64) + drift).to(ci.dtype)
    return out


def parse_request(
    round: int,
    extras: Mapping[str, Mapping[str, torch.Tensor]],
    spec: Mapping[str, tuple],
) -> Tuple[Optional[Dict[str, torch.Tensor]], int]:
    """(c or None for zero, acknowledged round) from a SCAFFOLD train request's tensor groups.

    Raises:
        WireError: unknown groups, a missing or malformed `control_base`, or a `control` group
            whose names, shapes, dtypes or values do not fit the model.
    """
    unknown = sorted(set(extras) - {CONTROL, CONTROL_BASE})
    if unknown:
        raise WireError(f"unsupported tensor groups in a SCAFFOLD train request: {unknown}")
    group = extras.get(CONTROL_BASE)
    if group is None or set(group) != {"round"}:
        raise WireError("a SCAFFOLD train request needs exactly one 'control_base/round' tensor")
    t = group["round"]
    if t.dtype != torch.int64 or t.numel() != 1:
        raise WireError(f"control_base/round must be one int64, got {t.dtype} {list(t.shape)}")
    base = int(t.reshape(()).item())
    if not 0 <= base < round:
        raise WireError(f"control_base/round {base} must lie in 0..{round - 1} in round {round}")
    c = extras.get(CONTROL)
    if c is not None:
        try:
            wire.validate_tensors("coordinator", c, spec, "control variate")
        except UpdateRejected as exc:
            raise WireError(f"train request: {exc.reason}") from None
        c = dict(c)
    return c, base


class ScaffoldClient:
    """One worker's SCAFFOLD state across the rounds of a training: c_i and what the server holds.

    Args:
        spec: name -> (shape, dtype) of the model's parameters (what `grad_correction` covers).
    """

    def __init__(self, spec: Mapping[str, tuple]) -> None:
        self.spec = dict(spec)
        self.c_i: Dict[str, torch.Tensor] = {}  # empty: zero (allocated on first use)
        self.base = 0  # round of the last delta folded into c_i (0: c_i = 0)
        # (round, c_i + delta) awaiting the server's acknowledgement
        self._pending: Optional[Tuple[int, Dict[str, torch.Tensor]]] = None
        # (round, c, whether c_i is the one the server acknowledged) between begin and finish
        self._current: Optional[Tuple[int, Dict[str, torch.Tensor], bool]] = None

    def _zeros(self) -> Dict[str, torch.Tensor]:
        return {k: torch.zeros(shape, dtype=dtype) for k, (shape, dtype) in self.spec.items()}

    def control(self) -> Dict[str, torch.Tensor]:
        """This worker's c_i (zeros before its first acknowledged delta)."""
        return self.c_i if self.c_i else self._zeros()

    def begin(
        self, round: int, extras: Mapping[str, Mapping[str, torch.Tensor]], device: str = "cpu"
    ) -> Dict[str, torch.Tensor]:
        """Read a train request's control groups; return the gradient correction c - c_i.

        Raises:
            WireError: the request's control groups are malformed (see `parse_request`).
        """
        c, base = parse_request(round, extras, self.spec)
        if self._pending is not None and self._pending[0] == base:
            self.base, self.c_i = base, self._pending[1]  # the server applied that delta
        self._pending = None
        if base == 0 and self.base != 0:
            log.info(
                "round %d: the server holds no control variate of ours; restarting at 0", round
            )
            self.base, self.c_i = 0, {}
        in_step = self.base == base
        if not in_step:
            log.warning(
                "round %d: the server applied our control delta of round %d but we hold round %d's "
                "(a new process?); training with c_i = 0 and replying without a delta",
                round,
                base,
                self.base,
            )
            self.base, self.c_i = 0, {}
        c = c if c is not None else self._zeros()
        self._current = (round, c, in_step)
        c_i = self.control()
        return {k: v.to(device) for k, v in correction(c, c_i).items()}

    def finish(
        self,
        round: int,
        x: Mapping[str, torch.Tensor],
        y: Mapping[str, torch.Tensor],
        steps: int,
        lr: float,
        transmit: Optional[Callable[[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]] = None,
    ) -> Dict[str, Dict[str, torch.Tensor]]:
        """The reply's control groups after training from `x` to `y` (CPU tensors by name).

        Args:
            transmit: under update compression (fedcore.compression), the delta -> the delta
                the server will decode from what is sent; c_i then moves by exactly that, so the
                two records of c_i stay bit-equal. None: the delta travels as it is.

        Returns {"control_delta": c_i+ - c_i} (as transmitted), or {} when this worker did not
        hold the c_i the server acknowledged (it then keeps c_i = 0 and the server drops its
        record).
        """
        if self._current is None or self._current[0] != round:
            raise RuntimeError(f"finish({round}) without begin({round})")
        _, c, in_step = self._current
        self._current = None
        if not in_step:
            return {}
        c_i = self.control()
        c_plus = control_update(c_i, c, x, y, steps, lr)
        delta = {k: c_plus[k] - c_i[k] for k in c_i}
        if transmit is not None:
            delta = transmit(delta)
        self.sent(round, delta)
        return {CONTROL_DELTA: delta}

    def sent(self, round: int, delta: Mapping[str, torch.Tensor]) -> None:
        """`delta` left for the server in `round`: c_i becomes c_i + delta once the server
        acknowledges that round (the next `begin`). Kept as that very sum, so the two records of
        c_i stay bit-equal; secure aggregation passes the delta as quantised in the masked sum."""
        c_i = self.control()
        self._pending = (round, {k: c_i[k] + delta[k] for k in c_i})
