"""The wire format: frames and safetensors round trips, and rejection of bad input."""

from __future__ import annotations

import io
import math
import struct

import pytest
import torch

from fedcore import protocol, tensorcodec, wire
from fedcore.errors import FrameTooLarge, UpdateRejected, WireError
from fedcore.model import initial_weights, weight_spec
from fedcore.training import TrainMetrics, TrainPlan


def test_tensorcodec_bytes_equal_the_safetensors_package() -> None:
    st = pytest.importorskip("safetensors.torch")
    tensors = {
        "b": torch.arange(6, dtype=torch.float32).view(2, 3),
        "a": torch.tensor([1, 2, 3], dtype=torch.int64),
        "c": torch.tensor([True, False]),
        "h": torch.ones(3, dtype=torch.float16),
    }
    assert tensorcodec.dumps(tensors) == st.save(tensors)
    one = {"round": "3"}
    assert tensorcodec.dumps(tensors, one) == st.save(tensors, metadata=one)
    w = initial_weights(1)
    assert tensorcodec.dumps(w) == st.save(w)
    # With several metadata keys the reference writer's order comes from a hash map (it varies
    # between processes); ours sorts them. Either reads the other's bytes.
    meta = {"round": "3", "strategy": "mean", "config_hash": "abc"}
    back, back_meta = tensorcodec.loads(st.save(tensors, metadata=meta))
    assert back_meta == meta
    for k, t in tensors.items():
        assert torch.equal(back[k], t) and back[k].dtype == t.dtype
    theirs = st.load(tensorcodec.dumps(tensors, meta))
    assert all(torch.equal(theirs[k], t) for k, t in tensors.items())


def test_model_weights_round_trip_exactly() -> None:
    w = initial_weights(1)
    back, _ = tensorcodec.loads(tensorcodec.dumps(w))
    assert set(back) == set(w)
    assert all(torch.equal(back[k], w[k]) for k in w)


def test_update_round_trip_through_a_frame() -> None:
    w = initial_weights(2)
    u = protocol.Update("alice", 7, w, 24754, TrainMetrics(0.25, 320, 10, 0.5))
    meta, payload = wire.decode_frame(protocol.encode_update(u))
    back = protocol.decode_update(meta, payload)
    assert (back.worker, back.round, back.num_examples) == ("alice", 7, 24754)
    assert back.metrics == u.metrics
    assert all(torch.equal(back.weights[k], w[k]) for k in w)


def test_train_request_round_trip_keeps_plan_and_extras() -> None:
    w = initial_weights(3)
    extras = {"control": {k: torch.zeros_like(v) for k, v in w.items()}}
    req = protocol.TrainRequest(4, TrainPlan(lr=0.05, steps=3), 99, w, extras)
    meta, payload = wire.decode_frame(protocol.encode_train(req))
    back = protocol.decode_train(meta, payload)
    assert back.plan == req.plan and back.sample_seed == 99 and back.round == 4
    assert set(back.extras) == {"control"}


@pytest.mark.parametrize("cut", [0, 5, 16, 40, -1])
def test_truncated_frame_is_rejected(cut: int) -> None:
    frame = protocol.encode_update(
        protocol.Update("bob", 1, initial_weights(1), 10, TrainMetrics(1.0, 32, 1, 0.1))
    )
    data = frame[:cut] if cut >= 0 else frame[:-1]
    with pytest.raises(WireError, match="truncated"):
        wire.read_frame(wire.stream_reader(io.BytesIO(data))) if cut else wire.decode_frame(data)


def test_clean_end_of_stream_is_eof_not_error() -> None:
    with pytest.raises(EOFError):
        wire.read_frame(wire.stream_reader(io.BytesIO(b"")))


def test_garbled_magic_and_oversize_are_rejected() -> None:
    with pytest.raises(WireError, match="magic"):
        wire.decode_frame(b"GARBAGE!" * 4)
    big = wire.PREFIX.pack(wire.MAGIC, 2, 1 << 40) + b"{}"
    with pytest.raises(FrameTooLarge, match="payload announces"):
        wire.read_frame(wire.stream_reader(io.BytesIO(big)))


def test_bad_tensor_headers_are_rejected() -> None:
    good = tensorcodec.dumps({"x": torch.ones(4)})
    with pytest.raises(WireError, match="truncated"):
        tensorcodec.loads(good[:5])
    with pytest.raises(WireError, match="offsets"):
        tensorcodec.loads(good[:-4])  # data shorter than the header says
    with pytest.raises(WireError, match="trailing"):
        tensorcodec.loads(good + b"\0" * 8)


def _update_with(name: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    w = initial_weights(1)
    w[name] = value
    return w


def test_validation_rejects_wrong_shape_nan_inf_names_and_dtype() -> None:
    spec = weight_spec()
    cases = [
        (_update_with("fc2.bias", torch.zeros(11)), "shape [11], expected [10]"),
        (_update_with("fc2.bias", torch.full((10,), math.nan)), "10 non-finite"),
        (_update_with("conv1.bias", torch.tensor([math.inf] + [0.0] * 19)), "1 non-finite"),
        (_update_with("fc2.bias", torch.zeros(10, dtype=torch.float64)), "dtype torch.float64"),
        (
            {k: v for k, v in initial_weights(1).items() if k != "fc1.weight"},
            "missing ['fc1.weight']",
        ),
        (_update_with("evil", torch.zeros(1)), "unexpected ['evil']"),
    ]
    for tensors, message in cases:
        with pytest.raises(UpdateRejected) as err:
            wire.validate_tensors("charlie", tensors, spec)
        assert "charlie" in str(err.value) and message in str(err.value)
    wire.validate_tensors("charlie", initial_weights(1), spec)  # the good case passes


def test_train_plan_from_network_refuses_unknown_fields_and_types() -> None:
    with pytest.raises(WireError, match="unknown fields"):
        TrainPlan.from_dict({"steps": 1, "evil": 1})
    with pytest.raises(WireError, match="integer"):
        TrainPlan.from_dict({"steps": 1.5})
    with pytest.raises(WireError, match="steps >= 1"):
        TrainPlan.from_dict({"steps": 0})


def test_json_depth_is_bounded_exactly_and_strings_do_not_count() -> None:
    deepest: list = []
    for _ in range(15):
        deepest = [deepest]
    assert wire.parse_json(b"[" * 16 + b"]" * 16, "x") == deepest
    with pytest.raises(WireError, match="x is not valid JSON: its brackets nest deeper than 16"):
        wire.parse_json(b"[" * 17 + b"]" * 17, "x")
    brackets_in_text = b'{"a": "' + b"[{" * 1000 + b'\\"", "b": [1]}'
    assert wire.parse_json(brackets_in_text, "x") == {"a": "[{" * 1000 + '"', "b": [1]}
    with pytest.raises(WireError, match="do not pair up"):
        wire.parse_json(b"[1, 2", "x")


def test_numbers_from_a_peer_are_finite_bounded_and_typed() -> None:
    assert wire.parse_json(b'{"a": -9223372036854775808, "b": 1.5e300}', "x") == {
        "a": -(2**63),
        "b": 1.5e300,
    }
    for raw, message in [
        (b"[NaN]", "NaN is not a number"),
        (b"[-Infinity]", "-Infinity is not a number"),
        (b"[1e309]", "number 1e309 is not finite"),
        (b"[123456789012345678901]", "number 123456789012345678901... has more than 20 digits"),
    ]:
        with pytest.raises(WireError, match=message):
            wire.parse_json(raw, "x")
    with pytest.raises(WireError, match=r"round must be an integer in 0\.\.9, got True"):
        wire.integer(True, "round", 0, 9)
    with pytest.raises(WireError, match="loss must be a finite number"):
        wire.number(float("nan"), "loss")


def test_tensor_header_at_the_cap_is_read_and_past_it_refused() -> None:
    good = tensorcodec.dumps({"x": torch.ones(2)})
    (n,) = struct.unpack("<Q", good[:8])
    pad = tensorcodec.MAX_HEADER - n
    at_cap = struct.pack("<Q", n + pad) + good[8 : 8 + n] + b" " * pad + good[8 + n :]
    assert torch.equal(tensorcodec.loads(at_cap)[0]["x"], torch.ones(2))
    over = struct.pack("<Q", n + pad + 8) + good[8 : 8 + n] + b" " * (pad + 8) + good[8 + n :]
    with pytest.raises(WireError, match="tensor header announces 65544 bytes, limit 65536"):
        tensorcodec.loads(over)


def test_header_errors_name_the_tensor_and_quote_a_clipped_value() -> None:
    text = b'{"big":{"dtype":"' + b"A" * 50_000 + b'","shape":[1],"data_offsets":[0,4]}}'
    with pytest.raises(WireError) as err:
        tensorcodec.loads(struct.pack("<Q", len(text)) + text + bytes(4))
    message = str(err.value)
    assert message.startswith("tensor 'big': dtype 'AAA") and "AAA...AAA" in message
    assert message.endswith(
        "is not one of ['BF16', 'BOOL', 'F16', 'F32', 'F64', 'I16', 'I32', 'I64', 'I8', 'U8']"
    )
    assert len(message) < 400


def test_reply_limit_is_the_model_and_its_extra_groups() -> None:
    w = initial_weights(1)
    model_bytes = 431080 * 4  # the Net's parameters, float32
    assert protocol.reply_limit(w, 0) == model_bytes + 8 + tensorcodec.MAX_HEADER
    assert protocol.reply_limit(w, 1) == 2 * model_bytes + 8 + tensorcodec.MAX_HEADER
