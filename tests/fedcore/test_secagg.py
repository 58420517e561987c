"""Secure aggregation end to end, in-process: three devices and a coordinator exchanging the
encoded frames of one round, the test relaying them and keeping everything the coordinator saw.

The updates are real: each device trains the seed's Net (431,080 parameters) for a few steps on
its own MNIST digits, and its update is the delta from the global model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from fedcore.mnist import load_shard
from fedcore.model import build_model, initial_weights, weight_spec
from fedcore.privacy import fixedpoint, primitives, shamir
from fedcore.privacy import secagg_messages as messages
from fedcore.privacy.errors import SecAggAborted
from fedcore.privacy.fixedpoint import Block
from fedcore.privacy.secagg_coordinator import SecAggCoordinator, SecAggSum
from fedcore.privacy.secagg_device import SecAggDevice, mask_info, sign
from fedcore.privacy.secagg_messages import Setup
from fedcore.shards import ShardSpec
from fedcore.training import TrainPlan, train_local

NAMES = ("alice", "bob", "carol")
LABELS = {"alice": [0, 1, 2, 3], "bob": [4, 5, 6], "carol": [7, 8, 9]}
PARAMS = 431_080
CLIP = 20.0  # L2 bound of a device's delta: above these updates' norms, so nothing is clipped
BOUND = 1.0  # per-coordinate range


@pytest.fixture(scope="module")
def updates(mnist_dir: Path) -> dict[str, torch.Tensor]:
    """Each device's flat model delta after 5 steps of SGD on its own digits (float64)."""
    spec = weight_spec()
    names = list(spec)
    start = initial_weights(1)
    out = {}
    for i, name in enumerate(NAMES):
        images, labels = load_shard(str(mnist_dir), ShardSpec.by_labels(LABELS[name]))
        model = build_model(start)
        train_local(
            model, images, labels, TrainPlan(steps=5, lr=0.1), torch.Generator().manual_seed(i)
        )
        after = model.state_dict()
        delta = {k: after[k] - start[k] for k in names}
        out[name] = fixedpoint.flatten(delta, names)
    assert all(
        u.numel() == PARAMS and float(u.norm()) < CLIP and float(u.abs().max()) < BOUND
        for u in out.values()
    )
    return out


@dataclass
class View:
    """Everything the coordinator received or relayed, as the frames on the wire."""

    frames: list[tuple[str, str, bytes]] = field(default_factory=list)  # (phase, worker, frame)

    def keep(self, phase: str, worker: str, frame: bytes) -> bytes:
        self.frames.append((phase, worker, frame))
        return frame

    def decoded(self, phase: str, length: int | None = None) -> dict[str, Any]:
        return {w: messages.decode(f, length) for p, w, f in self.frames if p == phase}


def setup(round: int = 1, threshold: int = 2, length: int = PARAMS) -> Setup:
    block = Block("delta", length, clip_norm=CLIP, bound=BOUND)
    return Setup(round, NAMES, threshold, degree=2, graph_seed=round, blocks=(block,))


def run_round(
    values: dict[str, torch.Tensor],
    s: Setup,
    view: View,
    drop_after: dict[str, str] | None = None,
) -> SecAggSum:
    """One round over encoded frames; `drop_after` maps a device to the last phase it answers
    ("none", "keys", "shares", "masked"): it drops after it, as a device that lost power."""
    drop_after = drop_after or {}
    order = ["none", "keys", "shares", "masked", "unmask"]

    def alive(name: str, phase: str) -> bool:
        return order.index(drop_after.get(name, "unmask")) >= order.index(phase)

    setup_frame = view.keep("setup", "*", messages.encode(s))
    decoded_setup = messages.decode(setup_frame)
    assert isinstance(decoded_setup, Setup)
    devices = {n: SecAggDevice(n, decoded_setup) for n in NAMES}
    coord = SecAggCoordinator(s)
    keys = {
        n: _wire(view, "keys", n, d.advertise()) for n, d in devices.items() if alive(n, "keys")
    }
    books = coord.collect_keys(keys)
    shares = {
        n: _wire(view, "shares", n, devices[n].share_keys(_wire(view, "book", n, b)))
        for n, b in books.items()
        if alive(n, "shares")
    }
    relayed = coord.collect_shares(shares)
    masked = {
        n: _wire(
            view,
            "masked",
            n,
            devices[n].mask(_wire(view, "relay", n, r), {"delta": values[n]}),
            s.length,
        )
        for n, r in relayed.items()
        if alive(n, "masked")
    }
    requests = coord.collect_masked(masked)
    reveals = {
        n: _wire(view, "reveal", n, devices[n].unmask(_wire(view, "unmask", n, r)))
        for n, r in requests.items()
        if alive(n, "unmask")
    }
    return coord.collect_unmask(reveals)


def _wire(view: View, phase: str, worker: str, msg: Any, length: int | None = None) -> Any:
    """`msg` as the other side gets it: encoded, kept in the coordinator's view, decoded."""
    return messages.decode(view.keep(phase, worker, messages.encode(msg)), length)


def test_sum_equals_the_plain_sum_within_the_quantisation_bound(updates) -> None:
    s = setup()
    result = run_round(updates, s, View())
    plain = sum(updates[n] for n in NAMES)
    assert result.count == 3 and result.survivors == NAMES
    assert set(result.sums) == {"delta"}
    err = float((result.sums["delta"] - plain).abs().max())
    bound = fixedpoint.error_bound(s.blocks[0], 3, 3)
    assert err <= bound * (1 + 1e-9) and bound < 3e-9


def test_a_device_dropped_after_masking_leaves_the_other_two_sums(updates) -> None:
    # bob sent his masked input, then vanished before unmasking: threshold 2 of 3 still holds
    s = setup(threshold=2)
    result = run_round(updates, s, View(), drop_after={"bob": "masked"})
    plain = updates["alice"] + updates["bob"] + updates["carol"]
    err = float((result.sums["delta"] - plain).abs().max())
    assert result.count == 3 and err <= fixedpoint.error_bound(s.blocks[0], 3, 3) * (1 + 1e-9)


def test_a_device_dropped_before_masking_is_unmasked_from_its_key_shares(updates) -> None:
    # bob shared his keys, then dropped before sending a masked input: his pairwise masks in
    # alice's and carol's inputs are removed with his mask key, rebuilt from their shares
    s = setup(threshold=2)
    view = View()
    result = run_round(updates, s, view, drop_after={"bob": "shares"})
    plain = updates["alice"] + updates["carol"]
    assert result.count == 2 and result.survivors == ("alice", "carol")
    err = float((result.sums["delta"] - plain).abs().max())
    assert err <= fixedpoint.error_bound(s.blocks[0], 3, 2) * (1 + 1e-9)
    reveals = view.decoded("reveal")
    assert all(set(r.key_shares) == {"bob"} for r in reveals.values())
    assert all("bob" not in r.seed_shares for r in reveals.values())


def test_a_device_dropped_before_sharing_keys_is_left_out(updates) -> None:
    s = setup(threshold=2)
    result = run_round(updates, s, View(), drop_after={"carol": "keys"})
    plain = updates["alice"] + updates["bob"]
    assert result.survivors == ("alice", "bob")
    assert float((result.sums["delta"] - plain).abs().max()) <= 2e-9


def test_below_the_threshold_the_round_aborts(updates) -> None:
    with pytest.raises(SecAggAborted, match="threshold is 2"):
        run_round(
            updates, setup(threshold=2), View(), drop_after={"bob": "shares", "carol": "shares"}
        )
    # and with threshold 3 of 3, one device lost after masking leaves too few shares
    with pytest.raises(SecAggAborted, match="threshold"):
        run_round(updates, setup(threshold=3), View(), drop_after={"bob": "masked"})


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def _least_squares_estimate(target: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
    """The best linear estimate of `target` from `features` (with an intercept)."""
    x = torch.stack([torch.ones_like(target)] + features, dim=1)
    coef = torch.linalg.lstsq(x, target.unsqueeze(1)).solution
    return (x @ coef).squeeze(1)


def _signed(vector: torch.Tensor, s: Setup) -> torch.Tensor:
    return fixedpoint.dequantize(vector, s.blocks[0], len(s.participants))


@pytest.mark.parametrize("drop", [None, "bob"])
def test_the_coordinators_view_does_not_reveal_alices_update(updates, drop) -> None:
    """From every frame the coordinator received or relayed, including the shares it used to
    unmask (so it can rebuild the self masks of all survivors, and the mask key of a device that
    dropped before masking), the best linear estimate of alice's update is uncorrelated with it.
    The sum itself is the output and is left out: it contains alice's update by design."""
    s = setup(threshold=2)
    view = View()
    result = run_round(updates, s, view, drop_after={drop: "shares"} if drop else None)
    assert result.count == (2 if drop else 3)
    masked = view.decoded("masked", s.length)
    reveals = view.decoded("reveal")
    keys = view.decoded("keys")
    assert set(view.decoded("shares")) == set(NAMES)

    def rebuilt(owner: str, kind: str) -> bytes:
        """A secret the coordinator rebuilds from the unmasking shares in its view."""
        held = {s.index(w): getattr(r, kind)[owner] for w, r in reveals.items()}
        return shamir.reconstruct({x: shamir.share_value(v, "t") for x, v in held.items()}, 2)

    n = s.length
    features = []
    for name, msg in masked.items():
        y = msg.vector
        features.append(_signed(y, s))
        y = (y - primitives.prg_uint32(rebuilt(name, "seed_shares"), n)) & fixedpoint.MASK
        features.append(_signed(y, s))  # without its self mask
        if drop:  # and without the dropped device's pairwise mask
            info = mask_info(1, name, drop)
            seed = primitives.agree(rebuilt(drop, "key_shares"), keys[name].s_pk, info)
            y = (y - sign(s, name, drop) * primitives.prg_uint32(seed, n)) & fixedpoint.MASK
            features.append(_signed(y, s))
    alice = updates["alice"]
    assert abs(_correlation(_least_squares_estimate(alice, features), alice)) < 0.05
    # what the coordinator cannot remove: alice's pairwise masks with the surviving devices
    assert abs(_correlation(features[1 if not drop else 2], alice)) < 0.05
    # without secure aggregation the coordinator receives alice's update itself
    plain_view = [updates[n] for n in NAMES]
    assert _correlation(_least_squares_estimate(alice, plain_view), alice) == pytest.approx(1.0)


def test_scaffold_control_deltas_travel_as_a_second_block(updates) -> None:
    # SCAFFOLD's c_i deltas are summed in the same masked vector, in a block with its own range
    blocks = (
        Block("delta", PARAMS, clip_norm=CLIP, bound=BOUND),
        Block("control_delta", PARAMS, clip_norm=1000.0, bound=50.0),
    )
    s = Setup(4, NAMES, 2, 2, 4, blocks)
    control = {n: updates[n] * -20.0 for n in NAMES}  # (x - y) / (K lr) scale: larger values
    values = {n: {"delta": updates[n], "control_delta": control[n]} for n in NAMES}
    devices = {n: SecAggDevice(n, s) for n in NAMES}
    coord = SecAggCoordinator(s)
    books = coord.collect_keys({n: d.advertise() for n, d in devices.items()})
    relayed = coord.collect_shares({n: devices[n].share_keys(b) for n, b in books.items()})
    requests = coord.collect_masked({n: devices[n].mask(r, values[n]) for n, r in relayed.items()})
    result = coord.collect_unmask({n: devices[n].unmask(r) for n, r in requests.items()})
    for b in blocks:
        plain = sum(values[n][b.name] for n in NAMES)
        err = float((result.sums[b.name] - plain).abs().max())
        assert err <= fixedpoint.error_bound(b, 3, 3) * (1 + 1e-9)


def test_a_device_refuses_to_reveal_twice_or_out_of_order(updates) -> None:
    s = setup(length=16)
    devices = {n: SecAggDevice(n, s) for n in NAMES}
    coord = SecAggCoordinator(s)
    books = coord.collect_keys({n: d.advertise() for n, d in devices.items()})
    with pytest.raises(SecAggAborted, match="asked to advertise while expecting to share"):
        devices["alice"].advertise()
    relayed = coord.collect_shares({n: devices[n].share_keys(b) for n, b in books.items()})
    small = {n: {"delta": torch.zeros(16, dtype=torch.float64)} for n in NAMES}
    requests = coord.collect_masked({n: devices[n].mask(r, small[n]) for n, r in relayed.items()})
    devices["alice"].unmask(requests["alice"])
    # a coordinator that now claims bob dropped would get bob's mask key and his seed
    with pytest.raises(SecAggAborted, match="asked to unmask while expecting to done"):
        devices["alice"].unmask(messages.UnmaskRequest(1, ("alice", "carol")))


def test_a_device_refuses_a_threshold_below_a_majority() -> None:
    s = Setup(1, NAMES, 1, 2, 1, (Block("delta", 4, 1.0, 1.0),))
    with pytest.raises(SecAggAborted, match="must be a majority"):
        SecAggDevice("alice", s)


def test_secagg_available_names_the_library() -> None:
    ok, message = primitives.secagg_available()
    assert ok and message.startswith("cryptography ")


def test_a_device_clips_an_update_past_its_range() -> None:
    # alice sends a huge update: her own clipping bounds its norm, so the sum stays in range
    s = Setup(2, NAMES, 2, 2, 2, (Block("delta", 1000, clip_norm=1.0, bound=0.1),))
    values = {n: torch.full((1000,), 0.001, dtype=torch.float64) for n in NAMES}
    values["alice"] = torch.full((1000,), 5.0, dtype=torch.float64)
    devices = {n: SecAggDevice(n, s) for n in NAMES}
    coord = SecAggCoordinator(s)
    books = coord.collect_keys({n: d.advertise() for n, d in devices.items()})
    relayed = coord.collect_shares({n: devices[n].share_keys(b) for n, b in books.items()})
    requests = coord.collect_masked(
        {n: devices[n].mask(r, {"delta": values[n]}) for n, r in relayed.items()}
    )
    result = coord.collect_unmask({n: devices[n].unmask(r) for n, r in requests.items()})
    clipped = fixedpoint.clip(values["alice"], s.blocks[0])
    assert float(clipped.norm()) == pytest.approx(1.0)
    expected = clipped + 2 * values["bob"]
    assert float((result.sums["delta"] - expected).abs().max()) < 1e-8
