"""How long the coordinator's decoders take to refuse crafted input, and what a refusal costs.

Issue 12 measured the decoders before their bounds: a safetensors header of 80,000 dimensions took
14 s to refuse, 1,000 dimensions of 4,000 digits 44 s, a 16 MiB header (the old cap) ~20 minutes;
JSON nested 100,000 deep raised RecursionError; a reply announcing 256 MiB for a 1.7 MB model was
read whole (+509 MiB RSS) before it was refused. Each input here is that attack, or the worst of
its kind that fits under the new caps (a 64 KiB header, 1 MiB of frame metadata), fed to the real
decoder the coordinator uses (`tensorcodec.loads`, `wire.decode_frame`, `wire.read_frame` with the
session's reply limit, `protocol.decode_evaluation`). Per input: the median time to the
`WireError` over `--repeat` runs, the bytes the decoder read, and the start of its message.

    .venv/bin/python benchmarks/hostile_inputs.py [--repeat 5]
        [--out benchmarks/results/hostile_inputs.md]    # raw figures in the .json twin
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedcore import protocol, tensorcodec, wire  # noqa: E402
from fedcore.errors import WireError  # noqa: E402
from fedcore.model import initial_weights  # noqa: E402

KIB = 1 << 10
MIB = 1 << 20


def safetensors(header: bytes, body: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + body


def one_entry(shape: bytes, offsets: bytes = b"[0,4]") -> bytes:
    return b'{"w":{"dtype":"F32","shape":[' + shape + b'],"data_offsets":' + offsets + b"}}"


def fill(prefix: bytes, item: bytes, suffix: bytes, size: int, sep: bytes = b",") -> bytes:
    """prefix + item, item, ... + suffix, as many items as fit in `size` bytes."""
    n = max(1, (size - len(prefix) - len(suffix)) // (len(item) + len(sep)))
    return prefix + sep.join([item] * n) + suffix


def meta_frame(text: bytes) -> bytes:
    return wire.PREFIX.pack(wire.MAGIC, len(text), 0) + text


def many_entries(size: int) -> bytes:
    """As many tensor entries as fit, each an empty tensor of 8 dimensions (accepted: the most
    work a header under the cap can ask for)."""
    dims = b",".join([b"0"] + [b"32"] * 7)
    entries: list[bytes] = []
    used = 2  # the braces
    while True:
        entry = b'"t%d":{"dtype":"F64","shape":[%s],"data_offsets":[0,0]}' % (len(entries), dims)
        if used + len(entry) + 1 > size:
            return safetensors(b"{" + b",".join(entries) + b"}")
        entries.append(entry)
        used += len(entry) + 1


def evaluation_of(rows: int, size: int) -> bytes:
    """An evaluation whose confusion matrix has `rows` rows of as many counts as fit."""
    row = fill(b"[", b"1", b"]", size // rows)
    result = b'{"correct":1,"total":1,"loss":0,"seed_loss":0,"group_shares":[],"confusion":['
    text = b'{"type":"evaluation","results":{"m":' + result + b",".join([row] * rows) + b"]}}}"
    return meta_frame(text)


def cases() -> list[tuple[str, bytes, Callable[[bytes], object]]]:
    """(what, input, decoder) for each crafted input."""
    header_cap = tensorcodec.MAX_HEADER
    st = tensorcodec.loads

    def frame(data: bytes) -> object:
        meta, _ = wire.decode_frame(data)
        return protocol.decode_evaluation(meta) if meta.get("type") == "evaluation" else meta

    return [
        ("header: 80,000 dims (issue: 14 s)", safetensors(one_entry(b"1," * 79_999 + b"1")), st),
        (
            "header: 1,000 dims of 4,000 digits (issue: 44 s)",
            safetensors(one_entry(b",".join([b"7" * 4000] * 1000))),
            st,
        ),
        (
            "header: 16 MiB of dims (the old cap; issue: ~20 min)",
            safetensors(fill(b'{"w":{"dtype":"F32","shape":[', b"9" * 19, b"]}}", 16 * MIB)),
            st,
        ),
        (
            "header: 64 KiB of dims (fits the cap)",
            safetensors(fill(b'{"w":{"dtype":"F32","shape":[', b"9" * 19, b"]}}", header_cap)),
            st,
        ),
        (
            "header: 64 KiB of 4,000-digit dims",
            safetensors(fill(b'{"w":{"dtype":"F32","shape":[', b"7" * 4000, b"]}}", header_cap)),
            st,
        ),
        ("header: [0, 2^63] (issue: TypeError)", safetensors(one_entry(b"0,%d" % 2**63)), st),
        (
            "header: 8 dims of 2^40, 4 bytes present",
            safetensors(one_entry(b",".join([b"1099511627776"] * 8)), bytes(4)),
            st,
        ),
        (
            "header: 64 KiB of empty 8-dim tensors (accepted)",
            many_entries(header_cap),
            st,
        ),
        (
            "header: 64 KiB nested [[[...]]]",
            safetensors(b"[" * (header_cap // 2) + b"]" * (header_cap // 2)),
            st,
        ),
        (
            "frame: 1 MiB nested (issue: 200 KB gave RecursionError)",
            meta_frame(b"[" * (wire.MAX_JSON // 2) + b"]" * (wire.MAX_JSON // 2)),
            frame,
        ),
        (
            'frame: 1 MiB of "\\\\" strings hiding nothing',
            meta_frame(fill(b'{"type":"x","a":[', b'"\\\\"', b"]}", wire.MAX_JSON)),
            frame,
        ),
        (
            "frame: 1 MiB of escaped quotes, never closed",
            meta_frame(fill(b'{"type":"x","a":"', b'\\"', b"", wire.MAX_JSON, b"")),
            frame,
        ),
        (
            "frame: 1 MiB of 20-digit integers",
            meta_frame(fill(b'{"type":"x","a":[', b"9" * 20, b"]}", wire.MAX_JSON)),
            frame,
        ),
        (
            "frame: NaN in metrics (issue: accepted)",
            meta_frame(b'{"type":"update","metrics":{"loss":NaN}}'),
            frame,
        ),
        (
            "evaluation: 10 rows of 1 MiB of counts",
            evaluation_of(10, wire.MAX_JSON - 200),
            frame,
        ),
    ]


def time_refusal(data: bytes, decode: Callable[[bytes], object], repeat: int) -> dict:
    times, message = [], "accepted"
    for _ in range(repeat):
        start = time.perf_counter()
        try:
            decode(data)
        except WireError as exc:
            message = str(exc)
        times.append(time.perf_counter() - start)
    return {"bytes": len(data), "median_ms": 1e3 * statistics.median(times), "result": message}


def reply_refusal() -> dict:
    """A reply announcing 256 MiB for the 1.7 MB model, read as the session reads a train reply:
    how many bytes are read before the refusal, and the peak RSS it adds."""
    weights = initial_weights(1)
    limit = protocol.reply_limit(weights, 0)
    prefix = wire.PREFIX.pack(wire.MAGIC, 2, 256 * MIB) + b"{}"
    read = {"bytes": 0}

    def read_exact(n: int) -> bytes:  # the hostile device: the prefix, then zeros on demand
        done = read["bytes"]
        read["bytes"] += n
        head = prefix[done : done + n]
        return head + bytes(n - len(head))

    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    try:
        wire.read_frame(read_exact, limit)
        message = "accepted"
    except WireError as exc:
        message = str(exc)
    seconds = time.perf_counter() - start
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "limit": limit,
        "bytes_read": read["bytes"],
        "median_ms": 1e3 * seconds,
        "peak_rss_added_kib": peak_after - peak_before,
        "result": message,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "hostile_inputs.md"))
    args = parser.parse_args()
    rows = []
    for what, data, decode in cases():
        row = {"input": what, **time_refusal(data, decode, args.repeat)}
        rows.append(row)
        print(f"{row['median_ms']:9.3f} ms  {what}: {row['result'][:90]}", flush=True)
    reply = reply_refusal()
    print(
        f"{reply['median_ms']:9.3f} ms  reply announcing 256 MiB, limit {reply['limit']}: "
        f"{reply['bytes_read']} bytes read, peak RSS +{reply['peak_rss_added_kib']} KiB",
        flush=True,
    )
    load = os.getloadavg()[0]
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPUs (load {load:.1f}), "
        f"Python {platform.python_version()}"
    )
    out = Path(args.out)
    out.with_suffix(".json").write_text(
        json.dumps({"machine": machine, "cases": rows, "reply": reply}, indent=1)
    )
    lines = [
        "# Time to refuse crafted input",
        "",
        f"`benchmarks/hostile_inputs.py --repeat {args.repeat}` on {machine}: median time from",
        "the bytes to the `WireError` (or to the decoded value, for what is accepted).",
        "",
        "| input | bytes | ms | result |",
        "|---|---|---|---|",
        *(
            f"| {r['input']} | {r['bytes']:,} | {r['median_ms']:.3f} | "
            f"{r['result'][:80].replace('|', '/')} |"
            for r in rows
        ),
        "",
        f"A reply announcing 256 MiB for the 1.7 MB model (session limit {reply['limit']:,} "
        f"bytes): refused after reading {reply['bytes_read']} bytes in "
        f"{reply['median_ms']:.3f} ms, peak RSS +{reply['peak_rss_added_kib']} KiB "
        "(before issue 12: read whole, +509 MiB).",
        "",
    ]
    out.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
