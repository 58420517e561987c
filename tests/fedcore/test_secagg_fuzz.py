"""Fuzzing the secure-aggregation decoders: valid frames of every message, mutated one part at a
time (fuzz_inputs.mutate_frame: a field, a JSON byte, a cut, a moved boundary, a length), must be
accepted or rejected with `WireError` (or a subclass); anything else escaping is a bug."""

from __future__ import annotations

import json

import torch
from fuzz_inputs import mutate_frame
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedcore import wire
from fedcore.errors import WireError
from fedcore.privacy import secagg_messages as m
from fedcore.privacy.fixedpoint import Block

LENGTH = 8
NAMES = st.sampled_from(["alice", "bob", "carol", "d0", "x.y-z_1"])
KEY = st.binary(min_size=32, max_size=32)
CIPHER = st.binary(min_size=m.CIPHERTEXT_BYTES, max_size=m.CIPHERTEXT_BYTES)
SHARE = st.binary(min_size=66, max_size=66)
ROUND = st.integers(1, 2**31 - 1)
SETUPS = st.builds(
    m.Setup,
    ROUND,
    st.just(("alice", "bob", "carol")),
    st.just(2),
    st.just(2),
    st.integers(0, 2**63 - 1),
    st.just((Block("delta", LENGTH, 1.0, 1.0),)),
)
MESSAGES = st.one_of(
    SETUPS,
    st.builds(m.AdvertiseKeys, ROUND, NAMES, KEY, KEY),
    st.builds(m.KeyBook, ROUND, st.dictionaries(NAMES, st.tuples(KEY, KEY), max_size=3)),
    st.builds(m.EncryptedShares, ROUND, NAMES, KEY, st.dictionaries(NAMES, CIPHER, max_size=3)),
    st.builds(m.RelayedShares, ROUND, st.dictionaries(NAMES, CIPHER, max_size=3)),
    st.builds(
        m.MaskedInput,
        ROUND,
        NAMES,
        st.lists(st.integers(0, 2**32 - 1), min_size=LENGTH, max_size=LENGTH).map(
            lambda v: torch.tensor(v, dtype=torch.int64)
        ),
    ),
    st.builds(m.UnmaskRequest, ROUND, st.lists(NAMES, unique=True, max_size=3).map(tuple)),
    st.builds(
        m.UnmaskShares,
        ROUND,
        NAMES,
        st.dictionaries(NAMES, SHARE, max_size=3),
        st.dictionaries(NAMES, SHARE, max_size=3),
    ),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(MESSAGES)
def test_every_message_round_trips(msg: m.Message) -> None:
    back = m.decode(m.encode(msg), LENGTH)
    if isinstance(msg, m.MaskedInput):
        assert isinstance(back, m.MaskedInput) and torch.equal(back.vector, msg.vector)
    else:
        assert back == msg


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(MESSAGES, st.data())
def test_mutated_frames_are_accepted_or_wire_errors(msg: m.Message, data: st.DataObject) -> None:
    frame = mutate_frame(data, m.encode(msg))
    try:
        m.decode(frame, LENGTH)
    except WireError:
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(MESSAGES, st.sampled_from(sorted(m.KINDS.values())))
def test_a_frame_relabelled_as_another_message_is_a_wire_error(msg: m.Message, kind: str) -> None:
    meta, payload = wire.decode_frame(m.encode(msg), max_payload=4 * LENGTH)
    meta["type"] = kind
    frame = wire.PREFIX.pack(wire.MAGIC, len(text := json.dumps(meta).encode()), len(payload))
    try:
        m.decode(frame + text + payload, LENGTH)
    except WireError:
        pass
