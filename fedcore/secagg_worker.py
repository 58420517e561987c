"""The device's side of secure aggregation over the worker protocol: one round's SecAggDevice.

Under `secure_aggregation:` the coordinator never sees a device's update, only the round's sum
(Bonawitz et al. 2017; fedcore.privacy.secagg_device holds the state machine). A round is four
requests, each answered by one frame (fedcore.privacy.secagg_messages):

  secagg_setup   (Setup)                  -> secagg_keys   (AdvertiseKeys: a fresh device state)
  secagg_book    (KeyBook)                -> secagg_shares (EncryptedShares)
  secagg_train   (a train request and the -> secagg_masked (MaskedInput: the clipped, quantised
                  shares relayed to it)                       update plus its masks)
  secagg_unmask  (UnmaskRequest)          -> secagg_reveal (UnmaskShares)

`secagg_train` carries a plain train request's fields and payload (fedcore.protocol) plus
`shares`, the relayed ciphertexts. The worker trains exactly as for `train` (the same seed, plan
and local algorithm: it calls `Worker.train` and reads its reply back), then masks its delta from
the global model it received as the block `delta` and, with SCAFFOLD, its control delta as the
block `control_delta`; each block is clipped to the range the Setup states before quantising
(fedcore.privacy.fixedpoint), since the coordinator can no longer screen single updates.

SCAFFOLD: the server sees only the sum of the control deltas, so it acknowledges every device
whose masked input it summed; the device's pending c_i is set to what it actually contributed
(the clipped and quantised delta). A device that was not in step with the server (a new process:
its c_i is gone, while the server's c still counts it) contributes a zero delta and says so in
the clear (`control_lost`); the server cannot take one device's share out of a sum, so every
device's c_i and the server's c start again at 0 (fedcore/strategies_sum.py).

Nothing here is logged about the update itself (its norm, its clipping): a worker's log lines
reach the coordinator. `cryptography` is imported only when a round starts (fedcore.privacy.
primitives), so a worker without it starts and trains while secure aggregation is off.
Runs on the device (Python 3.8, torch, the standard library; `cryptography` for a round).
"""

# ruff: noqa: UP006, UP007, UP035, UP045 - runs on Python 3.8: typing's generics, not builtins.
from __future__ import annotations

import base64
import dataclasses
import logging
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Tuple

import torch

from . import protocol, tensorcodec, wire
from .errors import WireError
from .local_algorithms import CONTROL_DELTA
from .privacy import fixedpoint
from .privacy import secagg_messages as messages
from .privacy.errors import SecAggAborted
from .privacy.secagg_device import SecAggDevice

if TYPE_CHECKING:
    from .worker import Worker

log = logging.getLogger("fedcore.worker")

SETUP = "secagg_setup"
BOOK = "secagg_book"
TRAIN = "secagg_train"
UNMASK = "secagg_unmask"
KINDS = (SETUP, BOOK, TRAIN, UNMASK)
DELTA = "delta"
BLOCKS = (DELTA, CONTROL_DELTA)  # the blocks a device may be asked for, in this order


def encode_train(request: protocol.TrainRequest, relayed: messages.RelayedShares) -> bytes:
    """The coordinator's `secagg_train` frame: `request` uncompressed (secure aggregation
    refuses update compression) plus the ciphertexts `relayed` to this device."""
    if request.plan.compression != "none":
        raise ValueError("secure aggregation sends train requests uncompressed")
    if relayed.round != request.round:
        raise ValueError(f"relayed shares of round {relayed.round} in round {request.round}")
    groups: Dict[str, Mapping[str, torch.Tensor]] = {"global": request.weights}
    groups.update(request.extras)
    meta = {
        "type": TRAIN,
        "round": request.round,
        "plan": request.plan.to_dict(),
        "sample_seed": request.sample_seed,
        "shares": {k: base64.b64encode(v).decode("ascii") for k, v in relayed.shares.items()},
    }
    return wire.encode_frame(meta, tensorcodec.dumps(wire.join_prefixed(groups)))


def split_train(meta: wire.Meta) -> Tuple[wire.Meta, messages.RelayedShares]:
    """A `secagg_train` request's train part (as a `train` request's meta) and relayed shares.

    Raises:
        WireError: the shares are malformed (fedcore.privacy.secagg_messages bounds them).
    """
    train = {k: v for k, v in meta.items() if k != "shares"}
    train["type"] = "train"
    relay = {"type": "secagg_relay", "round": meta.get("round"), "shares": meta.get("shares")}
    relayed = messages.decode_meta(relay, b"")
    assert isinstance(relayed, messages.RelayedShares)
    return train, relayed


class SecAggWorker:
    """A worker's secure-aggregation state: the current round's device, if any.

    Args:
        worker: the worker program's state (its model, shard, SCAFFOLD client, `train`).
    """

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.device: Optional[SecAggDevice] = None
        self.length = sum(t.numel() for t in self._zeros().values())

    def _zeros(self) -> Dict[str, torch.Tensor]:
        return {k: torch.zeros(s, dtype=d) for k, (s, d) in self.worker.spec_weights.items()}

    def handle(self, kind: str, meta: wire.Meta, payload: bytes) -> bytes:
        """The reply frame to one secure-aggregation request.

        Raises:
            WireError: a malformed request; SecAggAborted: a request out of order, for another
            round, or one the protocol refuses; SecAggUnavailable: no usable `cryptography`.
        """
        if kind == SETUP:
            setup = self._decode(meta, payload, messages.Setup)
            self.device = None  # a new round: whatever the last one left is gone
            self._check_blocks(setup)
            self.device = SecAggDevice(self.worker.name, setup)
            log.info(
                "round %d: secure aggregation with %d devices (threshold %d)",
                setup.round,
                len(setup.participants),
                setup.threshold,
            )
            return messages.encode(self.device.advertise())
        device = self.device
        if device is None:
            raise SecAggAborted(
                f"{kind} without a secure-aggregation round in progress on {self.worker.name!r} "
                "(the worker restarted since the round's setup?)"
            )
        if kind == BOOK:
            return messages.encode(device.share_keys(self._decode(meta, payload, messages.KeyBook)))
        if kind == TRAIN:
            return self._train(device, meta, payload)
        if kind == UNMASK:
            request = self._decode(meta, payload, messages.UnmaskRequest)
            reply = device.unmask(request)
            self.device = None  # the round is over for this device
            return messages.encode(reply)
        raise WireError(f"unknown request type {wire.quote(kind)}")

    def _decode(self, meta: wire.Meta, payload: bytes, cls: Any) -> Any:
        msg = messages.decode_meta(meta, payload)
        if not isinstance(msg, cls):
            raise WireError(f"expected a {messages.KINDS[cls]} message, got {type(msg).__name__}")
        return msg

    def _check_blocks(self, setup: messages.Setup) -> None:
        """The Setup's blocks must be the model's delta (and SCAFFOLD's control delta), each as
        long as the model: a device masks nothing else."""
        names = tuple(b.name for b in setup.blocks)
        if names not in (BLOCKS[:1], BLOCKS):
            raise WireError(
                f"secagg_setup blocks {list(names)}, expected {list(BLOCKS)} or [delta]"
            )
        for b in setup.blocks:
            if b.length != self.length:
                raise WireError(
                    f"secagg_setup block {b.name!r} has {b.length} entries, the model {self.length}"
                )

    def _train(self, device: SecAggDevice, meta: wire.Meta, payload: bytes) -> bytes:
        """Train as for a plain `train` request, then mask the clipped delta(s)."""
        train_meta, relayed = split_train(meta)
        names = list(self.worker.spec_weights)
        request = protocol.decode_train(train_meta, payload, self.worker.spec_weights)
        if request.plan.compression != "none":
            raise WireError("a secagg_train request carries an uncompressed plan")
        rnd = device.setup.round
        if request.round != rnd:
            raise SecAggAborted(f"train request for round {request.round} in round {rnd}")
        scaffold = CONTROL_DELTA in (b.name for b in device.setup.blocks)
        if request.plan.scaffold != scaffold:
            raise WireError(
                f"round {rnd}: the plan's scaffold is {request.plan.scaffold}, the setup's blocks "
                f"{'include' if scaffold else 'lack'} {CONTROL_DELTA!r}"
            )
        reply = self.worker.train(train_meta, payload)
        reply_meta, reply_payload = wire.decode_frame(reply, max_payload=len(reply))
        update = protocol.decode_update(reply_meta, reply_payload, max_groups=2)
        delta = {
            k: update.weights[k].to(torch.float64) - request.weights[k].to(torch.float64)
            for k in names
        }
        values = {DELTA: fixedpoint.flatten(delta, names)}
        if scaffold:
            control = update.extras.get(CONTROL_DELTA)
            values[CONTROL_DELTA] = fixedpoint.flatten(
                control if control is not None else self._zeros(), names
            )
            self._contributed(device, rnd, values[CONTROL_DELTA])
        masked = device.mask(relayed, values)
        if scaffold and update.extras.get(CONTROL_DELTA) is None:
            masked = dataclasses.replace(masked, control_lost=True)
        log.info("round %d: masked input sent", rnd)
        return messages.encode(masked)

    def _contributed(self, device: SecAggDevice, rnd: int, control: torch.Tensor) -> None:
        """SCAFFOLD: what this device adds to the server's sum of control deltas becomes its
        c_i once the server acknowledges the round (fedcore.local_algorithms): its control
        delta as clipped and quantised, or zero when it was out of step and sent none."""
        block = next(b for b in device.setup.blocks if b.name == CONTROL_DELTA)
        devices = len(device.setup.participants)
        sent = fixedpoint.dequantize(fixedpoint.quantize(control, block, devices), block, devices)
        client = self.worker.scaffold
        spec = [(k, tuple(t.shape), t.dtype) for k, t in client.control().items()]
        client.sent(rnd, fixedpoint.unflatten(sent, spec))
