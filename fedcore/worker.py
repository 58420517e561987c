"""The worker program: `python -m fedcore.worker --name alice --data-dir DIR --shard JSON`.

Runs on a device (a Jetson, or a local subprocess), owns one shard and loads only its images,
then answers framed requests on stdin with framed replies on stdout until `bye` or end of input:
hello, train, evaluate (see fedcore.protocol). One process serves a whole training, so Python
and torch start once: importing torch costs seconds on a Jetson, which paid every round would
dwarf a round's training (docs/ARCHITECTURE.md, Decisions 2). Nothing received is executed or
unpickled: frames are JSON plus safetensors. Logs go to stderr, which the coordinator shows line
by line.

Under update compression (the plan's `compression`, fedcore.compression) it decodes the request
in the scheme's downlink codec, checked like any request, and replies with its delta from the
global model it received, in the uplink codec, keeping what the codec left out of that delta for
its next one (error feedback) for as long as the process lives.

An evaluator with two or more torch threads scores the models of one request side by side, one
model per thread and one torch thread each, rather than each model over all threads in turn: the
seed's small CNN gains little from splitting a layer over threads, and on a busy machine the
threads waiting on each other cost more than that (the scores are the same, bit for bit).

`--slowdown N` / `--step-seconds S` make it a slower or a steady device (fedcore.pacing): it puts
itself under a CPU limit where the kernel lets it (a cgroup it removes at exit, also on SIGTERM
or SIGHUP), else sleeps after each training step; its hello says which.

Runs on the device's own Python (>= 3.8) with torch and the standard library only.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import math
import os
import platform
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO, Dict, List, Optional

import torch

from . import compression, protocol, wire
from .device_facts import RoundProbe, hello_facts
from .errors import FedError, WireError
from .evaluation import evaluate
from .local_algorithms import CONTROL_DELTA, ScaffoldClient
from .mnist import label_counts, load_shard
from .model import build_model, weight_spec
from .pacing import MAX_SLOWDOWN, MAX_STEP_SECONDS, Pacing
from .pacing import setup as setup_pacing
from .shards import ShardSpec
from .training import train_local

log = logging.getLogger("fedcore.worker")


class Worker:
    """A worker's state across rounds: its shard, its device and its model buffers."""

    def __init__(
        self,
        name: str,
        data_dir: str,
        spec: ShardSpec,
        device: str,
        pacing: Optional[Pacing] = None,
    ) -> None:
        self.name = name
        self.spec = spec
        self.device = device
        self.pacing = pacing or Pacing()
        images, labels = load_shard(data_dir, spec)
        self.counts = label_counts(labels)
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.spec_weights = weight_spec()
        self.model = build_model(
            {k: torch.zeros(s, dtype=d) for k, (s, d) in self.spec_weights.items()}, device
        )
        # SCAFFOLD's control variate c_i, kept for the whole training (fedcore.local_algorithms).
        self.scaffold = ScaffoldClient(
            {k: (tuple(p.shape), p.dtype) for k, p in self.model.named_parameters()}
        )
        # What update compression left out of past deltas, sent with the next (error feedback).
        self.feedback = compression.ErrorFeedback()
        self.probe = RoundProbe(device)  # the device's facts after each round (memory, heat)
        log.info("%s holds %d images (%s) on %s", name, labels.numel(), spec.describe(), device)

    def hello(self) -> bytes:
        return protocol.encode_hello(
            protocol.Hello(
                worker=self.name,
                shard=self.spec.describe(),
                label_counts=self.counts,
                python=platform.python_version(),
                torch=torch.__version__,
                device=self.device,
                threads=torch.get_num_threads(),
                pid=os.getpid(),
                slowdown=self.pacing.slowdown,
                pacing=self.pacing.mode,
                facts=hello_facts(self.device),
            )
        )

    def _load(self, weights: Dict[str, torch.Tensor], what: str) -> None:
        wire.validate_tensors("coordinator", weights, self.spec_weights, what)
        self.model.load_state_dict(weights)

    def train(self, meta: wire.Meta, payload: bytes) -> bytes:
        req = protocol.decode_train(meta, payload, self.spec_weights)
        if req.extras and not req.plan.scaffold:
            raise WireError(f"unsupported tensor groups in train request: {sorted(req.extras)}")
        self._load(req.weights, "global weights")
        correction = (
            self.scaffold.begin(req.round, req.extras, self.device) if req.plan.scaffold else None
        )
        gen = torch.Generator().manual_seed(req.sample_seed)
        mark = self.pacing.mark()
        self.probe.start()
        metrics = train_local(
            self.model,
            self.images,
            self.labels,
            req.plan,
            gen,
            grad_correction=correction,
            pacer=self.pacing.pacer,
        )
        weights = {k: v.detach().to("cpu") for k, v in self.model.state_dict().items()}
        _, up = compression.codecs(req.plan.compression)
        sent: Optional[Dict[str, Dict[str, torch.Tensor]]] = None
        transmit = None
        if up != compression.F32:
            sent = {}
            delta = {k: _delta(w, req.weights[k]) for k, w in weights.items()}
            self._compress(up, req.plan.topk_fraction, "weights", delta, sent, self.feedback)

            def transmit(d: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
                # no error feedback: SCAFFOLD's delta corrects itself (fedcore.compression)
                assert sent is not None
                return self._compress(up, req.plan.topk_fraction, CONTROL_DELTA, d, sent, None)

        extras = (
            self.scaffold.finish(
                req.round, req.weights, weights, req.plan.steps, req.plan.lr, transmit
            )
            if req.plan.scaffold
            else {}
        )
        log.info(
            "round %d: %d steps, loss %.4f, %.2fs%s",
            req.round,
            metrics.steps,
            metrics.loss,
            metrics.seconds,
            self.pacing.note(mark),
        )
        facts = self.probe.facts()  # memory and heat after the round: the device's own record
        return protocol.encode_update(
            protocol.Update(
                self.name, req.round, weights, self.labels.numel(), metrics, extras, device=facts
            ),
            sent,
        )

    def _score(
        self,
        names: List[str],
        models: Dict[str, Dict[str, torch.Tensor]],
        groups: List[List[int]],
        model: Optional[torch.nn.Module],
    ) -> Dict[str, Any]:
        """Score the models `names` (already validated) in turn on one model object (a new
        one when `model` is None: each evaluating thread has its own)."""
        out = {}
        for name in names:
            if model is None:
                model = build_model(models[name], self.device)
            else:
                model.load_state_dict(models[name])
            out[name] = evaluate(model, self.images, self.labels, groups)
        return out

    def _compress(
        self,
        codec: str,
        fraction: float,
        group: str,
        tensors: Dict[str, torch.Tensor],
        sent: Dict[str, Dict[str, torch.Tensor]],
        feedback: Optional[compression.ErrorFeedback],
    ) -> Dict[str, torch.Tensor]:
        """Add `group`'s wire form to `sent`; return what the coordinator will decode from it."""
        wire_groups, decoded = compression.encode(codec, {group: tensors}, fraction, feedback)
        sent.update(wire_groups)
        return decoded[group]

    def evaluate(self, meta: wire.Meta, payload: bytes) -> bytes:
        rnd, models, groups = protocol.decode_evaluate(meta, payload)
        for model_name, weights in models.items():
            wire.validate_tensors(
                "coordinator", weights, self.spec_weights, f"weights of model {model_name!r}"
            )
        names = list(models)
        threads = min(torch.get_num_threads(), len(names)) if self.device == "cpu" else 1
        if threads <= 1:
            scores = self._score(names, models, groups, self.model)
        else:
            # One model per thread, one torch thread each: a small CNN's kernels split over two
            # threads wait on each other at every layer, which on a busy machine costs more
            # than they gain (the scores are the same, bit for bit).
            chunks = [names[i::threads] for i in range(threads)]
            previous = torch.get_num_threads()
            torch.set_num_threads(1)  # threads started from here on use one each
            try:
                with ThreadPoolExecutor(threads, thread_name_prefix="evaluate") as pool:
                    parts = list(
                        pool.map(
                            lambda chunk: self._score(chunk, models, groups, None),
                            chunks,
                        )
                    )
            finally:
                torch.set_num_threads(previous)
            scores = {}
            for part in parts:
                scores.update(part)
        results = {name: scores[name] for name in names}
        log.info(
            "round %d: evaluated %d models on %d images", rnd, len(models), self.labels.numel()
        )
        return protocol.encode_evaluation(results)


def _delta(trained: torch.Tensor, received: torch.Tensor) -> torch.Tensor:
    """What a compressed update carries for one tensor: trained - received (an integer tensor,
    which no delta describes, travels as it is)."""
    return trained - received if trained.is_floating_point() else trained


def serve(worker: Worker, stdin: BinaryIO, stdout: BinaryIO, max_payload: int) -> int:
    """Answer requests until bye or end of input; returns the exit code."""
    read_exact = wire.stream_reader(stdin)
    secagg = None  # the secure-aggregation state (fedcore.secagg_worker), made on first use
    while True:
        try:
            meta, payload = wire.read_frame(read_exact, max_payload)
        except EOFError:
            log.info("coordinator closed the connection; exiting")
            return 0
        except WireError as exc:
            # The stream is out of step: answer once, then stop rather than guess.
            log.error("rejected a bad frame: %s", exc)
            _send(stdout, protocol.encode_error("WireError", str(exc)))
            return 2
        except Exception as exc:  # noqa: BLE001 - a decoder bug must not crash the device either
            log.exception("rejected a frame that failed to decode")
            message = wire.clip(f"frame failed to decode: {type(exc).__name__}: {exc}")
            _send(stdout, protocol.encode_error("WireError", message))
            return 2
        kind = meta["type"]
        try:
            if kind == "hello":
                reply = worker.hello()
            elif kind == "train":
                reply = worker.train(meta, payload)
            elif kind == "evaluate":
                reply = worker.evaluate(meta, payload)
            elif isinstance(kind, str) and kind.startswith("secagg_"):
                if secagg is None:  # imported here: only secure aggregation needs it
                    from .secagg_worker import SecAggWorker

                    secagg = SecAggWorker(worker)
                reply = secagg.handle(kind, meta, payload)
            elif kind == "bye":
                _send(stdout, protocol.encode_simple("bye"))
                return 0
            else:
                raise WireError(f"unknown request type {kind!r}")
        except FedError as exc:
            log.error("%s request failed: %s", kind, exc)
            reply = protocol.encode_error(type(exc).__name__, str(exc))
        except Exception as exc:  # noqa: BLE001 - a bad request or a diverged training: answer
            log.exception("%s request failed unexpectedly", kind)
            reply = protocol.encode_error(type(exc).__name__, f"{kind} failed: {exc}")
        _send(stdout, reply)


def _send(stdout: BinaryIO, frame: bytes) -> None:
    stdout.write(frame)
    stdout.flush()


def pick_device(choice: str) -> str:
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def _bounded(lo: float, hi: float, low_open: bool = False) -> Any:
    """An argparse type: a finite float in lo..hi (lo excluded when `low_open`)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (lo < value if low_open else lo <= value) and value <= hi):
            bound = f"({lo:g}, {hi:g}]" if low_open else f"{lo:g}..{hi:g}"
            raise argparse.ArgumentTypeError(f"must be a number in {bound}, got {text!r}")
        return value

    return parse


def _exit_on_signal(signum: int, frame: object) -> None:
    # SIGTERM/SIGHUP (a coordinator stopping a busy worker, a closed SSH session) unwind through
    # main's `finally`, so the worker's own cgroup is removed instead of being left behind.
    raise SystemExit(128 + signum)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedcore.worker", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--name", required=True, help="worker name, e.g. alice")
    parser.add_argument("--data-dir", required=True, help="folder with the MNIST idx files")
    parser.add_argument("--shard", required=True, help="shard spec as JSON (fedcore.shards)")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads (default 0: torch's own)"
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    parser.add_argument(
        "--max-payload-mb", type=int, default=256, help="largest frame accepted (256)"
    )
    parser.add_argument(
        "--slowdown",
        type=_bounded(1.0, MAX_SLOWDOWN),
        default=1.0,
        help="each training step takes N times as long (1: as fast as it is)",
    )
    parser.add_argument(
        "--step-seconds",
        type=_bounded(0.0, MAX_STEP_SECONDS, low_open=True),
        default=None,
        help="each training step takes S x slowdown seconds (default: as fast as it is)",
    )
    args = parser.parse_args(argv)

    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format=f"[{args.name}] %(message)s")
    # stdout carries frames only: anything printed by accident goes to stderr instead.
    stdout = sys.stdout.buffer
    sys.stdout = sys.stderr
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    # Before the shard loads: a slow device is slow at everything, loading included.
    pacing = setup_pacing(
        args.name, args.slowdown, args.step_seconds, torch.get_num_threads(), device == "cpu"
    )
    if pacing.limit is not None:
        atexit.register(pacing.close)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _exit_on_signal)
    try:
        try:
            worker = Worker(
                args.name, args.data_dir, ShardSpec.from_json(args.shard), device, pacing
            )
        except FedError as exc:
            log.error("cannot start: %s", exc)
            _send(stdout, protocol.encode_error(type(exc).__name__, str(exc)))
            return 3
        return serve(worker, sys.stdin.buffer, stdout, args.max_payload_mb << 20)
    finally:
        pacing.close()


if __name__ == "__main__":
    sys.exit(main())
