"""The parts of secure aggregation one by one: Shamir sharing, fixed point, the SecAgg+ graph,
and the messages' decoders against hostile bytes (every failure a typed error)."""

from __future__ import annotations

import base64
import itertools
import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from fedcore import wire
from fedcore.errors import FrameTooLarge, UpdateRejected, WireError
from fedcore.privacy import fixedpoint, primitives, shamir
from fedcore.privacy import secagg_messages as messages
from fedcore.privacy.errors import SecAggAborted, ShareRejected
from fedcore.privacy.fixedpoint import Block
from fedcore.privacy.neighbours import neighbours
from fedcore.privacy.secagg_coordinator import SecAggCoordinator
from fedcore.privacy.secagg_device import SecAggDevice
from fedcore.privacy.secagg_messages import MaskedInput, Setup

SECRET = bytes(range(32))


def _is_probable_prime(n: int) -> bool:
    for a in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37):
        d, r = n - 1, 0
        while d % 2 == 0:
            d, r = d // 2, r + 1
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def test_the_field_is_prime_and_holds_every_secret() -> None:
    assert _is_probable_prime(shamir.P) and shamir.P > 2**256


@pytest.mark.parametrize("t,n", [(2, 3), (3, 5), (5, 5), (1, 1), (7, 12)])
def test_any_t_of_n_shares_reconstruct_the_secret(t: int, n: int) -> None:
    shares = shamir.split(SECRET, list(range(1, n + 1)), t)
    for subset in itertools.islice(itertools.combinations(shares, t), 50):
        assert shamir.reconstruct({x: shares[x] for x in subset}, t) == SECRET
    assert shamir.reconstruct(shares, t) == SECRET  # more than t as well


def test_fewer_than_t_shares_are_refused_and_reveal_nothing() -> None:
    shares = shamir.split(SECRET, [1, 2, 3], 3)
    with pytest.raises(SecAggAborted, match="2 shares, the threshold is 3"):
        shamir.reconstruct({1: shares[1], 2: shares[2]}, 3)
    # interpolating t - 1 shares as if they were enough gives a value unrelated to the secret
    wrong = shamir.split(SECRET, [1, 2], 2)  # same 2 points, another polynomial family
    assert wrong != {1: shares[1], 2: shares[2]}


def test_a_garbled_share_is_detected_by_the_secret_size() -> None:
    # a garbled share moves the result to a random field element, almost never a 32-byte one; a
    # crafted small change is not caught here, but by the coordinator's commitment and
    # public-key checks (test_secagg.py)
    shares = shamir.split(SECRET, [1, 2, 3], 2)
    with pytest.raises(SecAggAborted, match="do not interpolate"):
        shamir.reconstruct({1: shares[1], 2: (shares[2] + 2**300) % shamir.P}, 2)


def test_share_bytes_are_bounded() -> None:
    with pytest.raises(SecAggAborted, match="66 bytes"):
        shamir.share_value(b"\0" * 65, "share")
    with pytest.raises(SecAggAborted, match="outside the field"):
        shamir.share_value(b"\xff" * 66, "share")


def test_fixed_point_round_trip_and_no_wrap_at_the_range_edges() -> None:
    block = Block("delta", 5, clip_norm=10.0, bound=2.0)
    devices = 4
    x = torch.tensor([2.0, -2.0, 0.0, 1e-9, -1.234567], dtype=torch.float64)
    q = fixedpoint.quantize(x, block, devices)
    total = (q * devices) & fixedpoint.MASK
    back = fixedpoint.dequantize(total, block, devices)
    assert float((back - devices * x).abs().max()) <= fixedpoint.error_bound(
        block, devices, devices
    )
    assert back[0] > 0 and back[1] < 0  # the extremes summed 4 times did not wrap


def test_clipping_bounds_norm_and_coordinates() -> None:
    block = Block("delta", 4, clip_norm=1.0, bound=0.3)
    out = fixedpoint.clip(torch.tensor([3.0, 4.0, 0.0, 0.0]), block)
    assert out.tolist() == pytest.approx([0.3, 0.3, 0.0, 0.0])


def test_the_range_check_refuses_a_sum_clipped_devices_cannot_make() -> None:
    block = Block("delta", 4, clip_norm=1.0, bound=1.0)
    ok = {"delta": torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64)}
    fixedpoint.check_sum(ok, [block], 3, 2)
    with pytest.raises(UpdateRejected, match="did not clip"):
        fixedpoint.check_sum({"delta": torch.full((4,), 1.5, dtype=torch.float64)}, [block], 3, 2)
    with pytest.raises(UpdateRejected, match="count 4 outside 1..3"):
        fixedpoint.check_sum(ok, [block], 3, 4)


def test_neighbour_graph_is_regular_symmetric_and_seeded() -> None:
    names = [f"d{i}" for i in range(20)]
    g = neighbours(names, 6, seed=3)
    assert all(len(v) == 6 and u not in v for u, v in g.items())
    assert all(u in g[v] for u, vs in g.items() for v in vs)
    assert g == neighbours(names, 6, seed=3) and g != neighbours(names, 6, seed=4)
    assert neighbours(names[:3], 2, seed=1) == {
        "d0": {"d1", "d2"},
        "d1": {"d0", "d2"},
        "d2": {"d0", "d1"},
    }
    with pytest.raises(ValueError, match="even"):
        neighbours(names, 5, seed=1)


def test_prg_is_deterministic_per_seed_and_uniform() -> None:
    a = primitives.prg_uint32(b"k" * 32, 100_000)
    assert torch.equal(a, primitives.prg_uint32(b"k" * 32, 100_000))
    assert int(a.min()) >= 0 and int(a.max()) < 2**32
    assert abs(float(a.double().mean()) / 2**32 - 0.5) < 0.01


# --- messages ---------------------------------------------------------------------------------

SETUP = Setup(3, ("alice", "bob", "carol"), 2, 2, 9, (Block("delta", 8, 1.0, 1.0),))


def _frame(meta: dict, payload: bytes = b"") -> bytes:
    return wire.PREFIX.pack(wire.MAGIC, len(raw := json.dumps(meta).encode()), len(payload)) + (
        raw + payload
    )


def test_every_message_round_trips() -> None:
    assert messages.decode(messages.encode(SETUP)) == SETUP
    keys = messages.AdvertiseKeys(3, "alice", b"a" * 32, b"b" * 32)
    assert messages.decode(messages.encode(keys)) == keys
    book = messages.KeyBook(3, {"alice": (b"a" * 32, b"b" * 32)})
    assert messages.decode(messages.encode(book)) == book
    sh = messages.EncryptedShares(3, "alice", b"c" * 32, {"bob": b"x" * messages.CIPHERTEXT_BYTES})
    assert messages.decode(messages.encode(sh)) == sh
    v = torch.tensor([0, 1, 2**31, 2**32 - 1] * 2, dtype=torch.int64)
    back = messages.decode(messages.encode(MaskedInput(3, "bob", v)), 8)
    assert isinstance(back, MaskedInput) and torch.equal(back.vector, v)
    req = messages.UnmaskRequest(3, ("alice", "carol"))
    assert messages.decode(messages.encode(req)) == req
    rev = messages.UnmaskShares(3, "carol", {"alice": b"s" * 66}, {"bob": b"k" * 66})
    assert messages.decode(messages.encode(rev)) == rev


def test_a_masked_input_of_the_wrong_size_is_refused() -> None:
    frame = messages.encode(MaskedInput(3, "bob", torch.zeros(8, dtype=torch.int64)))
    with pytest.raises(WireError, match="8 entries, this round's input has 9"):
        messages.decode(frame, 9)
    with pytest.raises(FrameTooLarge):
        messages.decode(frame, 4)  # the payload is bounded by the round's length
    with pytest.raises(FrameTooLarge):
        messages.decode(frame)  # and refused without one


def test_a_masked_input_says_only_true_of_a_lost_control_variate() -> None:
    v = torch.zeros(8, dtype=torch.int64)
    frame = messages.encode(MaskedInput(3, "bob", v, control_lost=True))
    back = messages.decode(frame, 8)
    assert isinstance(back, MaskedInput) and back.control_lost is True
    assert wire.decode_frame(messages.encode(MaskedInput(3, "bob", v)), 64)[0].keys() == {
        "type",
        "round",
        "sender",
        "length",
    }  # absent unless true: a device that predates the field decodes the same
    meta, payload = wire.decode_frame(frame, 64)
    for bad in (False, "yes", 1):
        with pytest.raises(WireError, match="control_lost must be true if sent"):
            messages.decode_meta({**meta, "control_lost": bad}, payload, 8)


def _setup_meta(**changes: object) -> dict:
    meta = {
        "type": "secagg_setup",
        "round": 1,
        "participants": ["a", "b", "c", "d", "e"],
        "threshold": 3,
        "degree": 4,
        "graph_seed": 0,
        "blocks": [{"name": "d", "length": 4, "clip_norm": 1.0, "bound": 1.0}],
    }
    meta.update(changes)
    return meta


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"participants": ["a"]}, "at least 2 participants"),
        ({"degree": 3}, "must be even"),
        ({"degree": 1}, "degree"),
        ({"threshold": 1}, "threshold"),
        ({"blocks": []}, "at least one block"),
        ({"blocks": [{"name": "d", "length": 4, "clip_norm": -1.0, "bound": 1.0}]}, "clip_norm"),
        ({"blocks": [{"name": "d", "length": 4, "clip_norm": 1.0}]}, "has fields"),
        ({"graph_seed": -1}, "graph_seed"),
        ({"extra": 1}, "differ from the expected"),
    ],
)
def test_a_hostile_setup_is_refused_before_any_work(changes: dict, match: str) -> None:
    messages.decode(_frame(_setup_meta()))  # the unchanged one is fine
    with pytest.raises(WireError, match=match):
        messages.decode(_frame(_setup_meta(**changes)))


@pytest.mark.parametrize(
    "meta,match",
    [
        (
            {"type": "secagg_keys", "round": 1, "sender": "a", "c_pk": "AA==", "s_pk": "AA=="},
            "32 bytes",
        ),
        (
            {"type": "secagg_keys", "round": 1, "sender": "-x", "c_pk": "", "s_pk": ""},
            "not a worker",
        ),
        ({"type": "secagg_keys", "round": 1, "sender": "a", "c_pk": "!!", "s_pk": ""}, "base64"),
        ({"type": "secagg_keys", "round": 1, "sender": "a"}, "differ from the expected"),
        ({"type": "secagg_keys", "round": 0, "sender": "a", "c_pk": "", "s_pk": ""}, "round"),
        ({"type": "secagg_nope", "round": 1}, "not a secure-aggregation"),
        ({"type": "secagg_unmask", "round": 1, "survivors": ["a", "a"]}, "repeats"),
        ({"type": "secagg_unmask", "round": 1, "survivors": ["a"] * 2000}, "at most 1024"),
        ({"type": "secagg_book", "round": 1, "keys": {"a": ["x"]}}, "c_pk|s_pk|string"),
        (
            {
                "type": "secagg_relay",
                "round": 1,
                "shares": {"a": base64.b64encode(b"x" * 159).decode()},
            },
            "160 bytes",
        ),
        (
            {
                "type": "secagg_setup",
                "round": 1,
                "participants": ["a", "b"],
                "threshold": 5,
                "degree": 1,
                "graph_seed": 0,
                "blocks": [{"name": "d", "length": 4, "clip_norm": 1.0, "bound": 1.0}],
            },
            "threshold",
        ),
        (
            {
                "type": "secagg_setup",
                "round": 1,
                "participants": ["a", "b"],
                "threshold": 2,
                "degree": 2,
                "graph_seed": 0,
                "blocks": [{"name": "d", "length": 2**40, "clip_norm": 1.0, "bound": 1.0}],
            },
            "length",
        ),
    ],
)
def test_hostile_messages_give_wire_errors(meta: dict, match: str) -> None:
    with pytest.raises(WireError, match=match):
        messages.decode(_frame(meta))


def test_a_tampered_share_ciphertext_is_rejected() -> None:
    names = ("alice", "bob", "carol")
    s = Setup(1, names, 2, 2, 1, (Block("delta", 4, 1.0, 1.0),))
    devices = {n: SecAggDevice(n, s) for n in names}
    coord = SecAggCoordinator(s)
    books = coord.collect_keys({n: d.advertise() for n, d in devices.items()})
    relayed = coord.collect_shares({n: devices[n].share_keys(b) for n, b in books.items()})
    blob = bytearray(relayed["bob"].shares["alice"])
    blob[40] ^= 1
    tampered = messages.RelayedShares(1, {**relayed["bob"].shares, "alice": bytes(blob)})
    zeros = {"delta": torch.zeros(4, dtype=torch.float64)}
    with pytest.raises(ShareRejected, match="failed authentication"):
        devices["bob"].mask(tampered, zeros)
    # a share alice addressed to carol, relayed to bob as alice's, fails too: each ciphertext is
    # bound to its round, sender and receiver
    fresh = {n: SecAggDevice(n, s) for n in names}
    coord = SecAggCoordinator(s)
    books = coord.collect_keys({n: d.advertise() for n, d in fresh.items()})
    relayed = coord.collect_shares({n: fresh[n].share_keys(b) for n, b in books.items()})
    swapped = messages.RelayedShares(
        1, {**relayed["bob"].shares, "alice": relayed["carol"].shares["alice"]}
    )
    with pytest.raises(ShareRejected):
        fresh["bob"].mask(swapped, zeros)


def test_replies_from_the_wrong_sender_or_round_are_left_out() -> None:
    names = ("alice", "bob", "carol")
    s = Setup(1, names, 2, 2, 1, (Block("delta", 4, 1.0, 1.0),))
    devices = {n: SecAggDevice(n, s) for n in names}
    coord = SecAggCoordinator(s)
    replies = {n: d.advertise() for n, d in devices.items()}
    replies["carol"] = replies["bob"]  # carol's session relays bob's keys
    books = coord.collect_keys(replies)
    assert set(books) == {"alice", "bob"}
    assert "names sender 'bob'" in coord.refused["carol"]


def _fresh_python(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    return out.stdout.strip()


def test_device_modules_import_cryptography_only_when_used() -> None:
    # a worker without `cryptography` must still start and train when secure aggregation is off
    code = (
        "import sys\n"
        "import fedcore.privacy.secagg_device, fedcore.privacy.dpsgd\n"
        "print('cryptography' in sys.modules)"
    )
    assert _fresh_python(code) == "False"


def test_without_cryptography_the_device_is_told_how_to_fix_it() -> None:
    code = (
        "import sys\n"
        "sys.modules['cryptography'] = None  # as if it were not installed\n"
        "from fedcore.privacy import primitives, secagg_messages as messages\n"
        "from fedcore.privacy.errors import SecAggUnavailable\n"
        "from fedcore.privacy.fixedpoint import Block\n"
        "from fedcore.privacy.secagg_device import SecAggDevice\n"
        "ok, why = primitives.secagg_available()\n"
        "print(ok)\n"
        "print(why)\n"
        "s = messages.Setup(1, ('a', 'b', 'c'), 2, 2, 1, (Block('d', 4, 1.0, 1.0),))\n"
        "try:\n"
        "    SecAggDevice('a', s)\n"
        "except SecAggUnavailable as exc:\n"
        "    print(type(exc).__name__, exc.transient)\n"
    )
    ok, why, refused = _fresh_python(code).splitlines()
    assert ok == "False"
    assert "needs the `cryptography` package" in why and "pip install --user cryptography" in why
    assert refused == "SecAggUnavailable False"
