"""What `fedmnist run` shows while a training runs: a live progress display on a terminal, plain
log lines otherwise.

The display observes the training; it never drives it. Everything it knows comes from the log
records the round loop already emits (flows/rounds.py, flows/schedules.py) and from Prefect's
task-run records, matched by their message templates (`record.msg`, with `record.args` as the
values), so the loop stays unchanged:

  "Training %s: %d rounds over %s with strategy ..."   the trainers, the number of rounds
  "Training round %d/%d"                                  a round starts: every trainer training
  task run `train-<worker>-rNN` "Finished in state ..."   that worker is done (or failed)
  "Round %d: %s dropped (%s): %s"                         that worker dropped
  "Round %d: update from %s rejected: %s"                 its update was rejected
  "%s %d/%d done in %.1fs (training loss: %s)"            a round's time, for the ETA
  "<model>: Average loss: ..., Accuracy: c/t (p%)"        the seed's evaluation line

On a terminal (`LiveProgress`) a rich Live panel shows round r/R, each worker's status, the ETA
and the last federated accuracy; above it go the lines a person reads: the start-up lines, the
seed's evaluation lines exactly as the seed printed them, warnings and errors. The per-round
lines (the loop's and each worker's "[alice] round 7: ..."), which the panel replaces, are not
printed, so a seed run fills about one screen per
evaluation round. Elsewhere (`PlainProgress`: a file, a pipe, CI) every line is written in
Prefect's own format, without colour or any control character. Either way Prefect's per-task
state lines ("Finished in state Completed()") are left out unless `verbose`.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

# The loop's message templates (flows/rounds.py, flows/schedules.py).
TRAINING = "Training %s: %d rounds over %s with strategy"
ROUND_START = "Training round %d/%d"
ROUND_DONE = "%s %d/%d done in %.1fs (training loss: %s)"
DROPPED = "Round %d: %s dropped (%s): %s"
REJECTED = "Round %d: update from %s rejected: %s"
EVALUATING = "Evaluating models (%s %d)"
FINISHED = "Finished in state "  # Prefect's task engine, on the `prefect.task_runs` logger

EVAL_LINE = re.compile(
    r"^(Federated model|Model update (?P<worker>\S+)): Average loss: [0-9.]+, "
    r"Accuracy: \d+/\d+ \((?P<pct>[0-9.]+)%\)$"
)
PERCENT_LINE = re.compile(r"^(Federated model|Model update \S+): Percentage numbers ")
TRAIN_TASK = re.compile(r"^train-(?P<worker>.+)-r(?P<round>\d+)$")
# A worker's per-round line, "[alice] round 7: 10 steps, ..." (fedcore/worker.py).
WORKER_ROUND = re.compile(r"^\[[^\]]+\] round \d+: ")
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # all but tab and newline

STATUS_STYLE = {
    "waiting": "dim",
    "training": "cyan",
    "done": "green",
    "dropped": "red",
    "rejected": "yellow",
}


def is_task_state_line(record: logging.LogRecord) -> bool:
    """Prefect's "Task run 'train-alice-r07' - Finished in state Completed()" record."""
    return record.name.startswith("prefect.task_runs") and str(record.msg).startswith(FINISHED)


def template(record: logging.LogRecord) -> str:
    return record.msg if isinstance(record.msg, str) else ""


@dataclass
class TrainingState:
    """What the records have said so far about one training."""

    rounds: int | None = None
    round: int = 0
    workers: dict[str, str] = field(default_factory=dict)
    round_seconds: list[float] = field(default_factory=list)
    done_round: int = 0
    last_done_at: float | None = None  # record time of the last finished round
    evaluated_round: int | None = None
    accuracy: dict[str, float] = field(default_factory=dict)  # model -> last accuracy (0-100)
    accuracy_round: int | None = None

    def observe(self, record: logging.LogRecord) -> None:
        """Update the state from one record (any record; unknown ones change nothing)."""
        msg = template(record)
        args: tuple[Any, ...] = record.args if isinstance(record.args, tuple) else ()
        try:
            if msg.startswith(TRAINING) and len(args) >= 3:
                self.rounds = int(args[1])
                for name in str(args[2]).split(", "):
                    self.workers.setdefault(name, "waiting")
            elif msg == ROUND_START and len(args) == 2:
                self.round, self.rounds = int(args[0]), int(args[1])
                for name in self.workers:
                    self.workers[name] = "training"
            elif msg == ROUND_DONE and len(args) == 5:
                self.round_seconds.append(float(args[3]))
                self.done_round = int(args[1])
                self.last_done_at = record.created
            elif msg == DROPPED and len(args) == 4:
                self.workers[str(args[1])] = "dropped"
            elif msg == REJECTED and len(args) == 3:
                self.workers[str(args[1])] = "rejected"
            elif msg == EVALUATING and len(args) == 2:
                self.evaluated_round = int(args[1])
            elif is_task_state_line(record):
                self._task_finished(record)
            else:
                found = EVAL_LINE.match(record.getMessage()) if not args else None
                if found:
                    self.accuracy[found.group("worker") or "federated"] = float(found.group("pct"))
                    self.accuracy_round = self.evaluated_round
        except (TypeError, ValueError):
            return  # a record that only looks like one of ours

    def _task_finished(self, record: logging.LogRecord) -> None:
        found = TRAIN_TASK.match(str(getattr(record, "task_run_name", "")))
        if not found or found.group("worker") not in self.workers:
            return
        if self.workers[found.group("worker")] == "training":
            completed = str(record.msg).startswith(FINISHED + "Completed")
            self.workers[found.group("worker")] = "done" if completed else "dropped"

    def eta_seconds(self, now: float | None = None) -> float | None:
        """Seconds left: the mean round time so far times the rounds left (None before the first
        round is done), less what the current round has already run."""
        if not self.round_seconds or self.rounds is None:
            return None
        mean = sum(self.round_seconds) / len(self.round_seconds)
        left = mean * max(self.rounds - self.done_round, 0)
        if now is not None and self.last_done_at is not None and self.rounds > self.done_round:
            left -= min(max(now - self.last_done_at, 0.0), mean)
        return max(left, 0.0)


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def render(state: TrainingState, now: float | None = None) -> Group:
    """The panel: one headline (round r/R, ETA, last federated accuracy), one row of workers."""
    head = Text()
    total = state.rounds if state.rounds is not None else "?"
    head.append(f"Round {state.round}/{total}", style="bold")
    eta = state.eta_seconds(now)
    head.append(f"   ETA {format_seconds(eta) if eta is not None else '-'}")
    fed = state.accuracy.get("federated")
    if fed is not None:
        head.append(f"   federated accuracy {fed:.2f}% (round {state.accuracy_round})")
    else:
        head.append("   federated accuracy -")
    table = Table.grid(padding=(0, 2))
    names = list(state.workers)
    for _ in names:
        table.add_column()
    cells = []
    for name in names:
        status = state.workers[name]
        cell = Text(f"{name} ")
        cell.append(status, style=STATUS_STYLE.get(status, ""))
        cells.append(cell)
    if cells:
        table.add_row(*cells)
    return Group(head, table)


def clean(text: str) -> str:
    """`text` with every control character but tab and newline replaced by '?' (a worker's log
    line is the worker's bytes: it must not move a terminal's cursor or hide a line)."""
    return CONTROL.sub("?", text)


def plain_formatter() -> logging.Formatter:
    """Prefect's console format (its `standard` formatter), without colour."""
    from prefect.logging.formatters import PrefectFormatter

    return PrefectFormatter(
        format="%(asctime)s.%(msecs)03d | %(levelname)-7s | %(name)s - %(message)s",
        flow_run_fmt=(
            "%(asctime)s.%(msecs)03d | %(levelname)-7s | Flow run %(flow_run_name)r - %(message)s"
        ),
        task_run_fmt=(
            "%(asctime)s.%(msecs)03d | %(levelname)-7s | Task run %(task_run_name)r - %(message)s"
        ),
        datefmt="%H:%M:%S",
    )


class PlainProgress(logging.Handler):
    """Every record as one plain line on `stream` (Prefect's format, no control characters);
    Prefect's task state lines only when `verbose`."""

    def __init__(self, stream: IO[str], verbose: bool = False) -> None:
        super().__init__(logging.NOTSET)
        self.stream = stream
        self.verbose = verbose
        self.setFormatter(plain_formatter())

    def emit(self, record: logging.LogRecord) -> None:
        if is_task_state_line(record) and not self.verbose:
            return
        try:
            self.stream.write(clean(self.format(record)) + "\n")
            self.stream.flush()
        except Exception:  # noqa: BLE001 - logging's contract: report, never raise
            self.handleError(record)


class LiveProgress(logging.Handler):
    """A rich Live panel on `console` fed by the records; the lines a person reads above it."""

    HIDDEN = (ROUND_START, ROUND_DONE)  # shown by the panel instead

    def __init__(self, console: Console, verbose: bool = False, refresh: bool = True) -> None:
        super().__init__(logging.NOTSET)
        self.console = console
        self.verbose = verbose
        self.state = TrainingState()
        self._state_lock = threading.Lock()
        self.live = Live(
            get_renderable=self._renderable,
            console=console,
            auto_refresh=refresh,
            refresh_per_second=2,
            transient=False,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self.setFormatter(plain_formatter())

    def _renderable(self) -> Group:
        with self._state_lock:
            return render(self.state, time.time())

    def start(self) -> None:
        self.live.start()

    def stop(self) -> None:
        self.live.stop()

    def line(self, record: logging.LogRecord) -> Text | None:
        """The line printed above the panel for `record`, or None."""
        if is_task_state_line(record):
            return Text(clean(self.format(record)), style="dim") if self.verbose else None
        if template(record) in self.HIDDEN:
            return None
        if record.levelno < logging.WARNING and record.name.startswith("fedcore.worker."):
            if WORKER_ROUND.match(record.getMessage()):
                return None
        message = clean(record.getMessage())
        if record.exc_info and record.levelno >= logging.ERROR:
            message = clean(self.format(record))
        if EVAL_LINE.match(message) or PERCENT_LINE.match(message):
            return Text(message)  # exactly the seed's line
        if record.levelno >= logging.ERROR:
            return Text(f"error: {message}", style="red")
        if record.levelno >= logging.WARNING:
            return Text(f"warning: {message}", style="yellow")
        return Text(message, style="" if record.name.startswith("prefect.flow_runs") else "dim")

    def emit(self, record: logging.LogRecord) -> None:
        try:
            with self._state_lock:
                self.state.observe(record)
            text = self.line(record)
            if text is not None:
                self.console.print(text, overflow="fold", crop=False, highlight=False)
            self.live.refresh()
        except Exception:  # noqa: BLE001 - logging's contract: report, never raise
            self.handleError(record)


def _console_handlers(logger: logging.Logger) -> list[logging.Handler]:
    from prefect.logging.handlers import PrefectConsoleHandler

    return [h for h in logger.handlers if isinstance(h, PrefectConsoleHandler)]


@contextmanager
def showing_progress(
    verbose: bool = False, stream: IO[str] | None = None, console: Console | None = None
) -> Iterator[logging.Handler]:
    """While the block runs, the training's records go to a `LiveProgress` on `stream` (stdout)
    when it is a terminal, else to a `PlainProgress`, in place of Prefect's console handler on
    the root logger (put back afterwards). Call after Prefect is imported (it configures
    logging on import)."""
    stream = stream or sys.stdout
    console = console or Console(file=stream)
    root = logging.getLogger()
    replaced = _console_handlers(root)
    handler: logging.Handler
    live = console.is_terminal and not console.is_dumb_terminal
    handler = LiveProgress(console, verbose) if live else PlainProgress(stream, verbose)
    for h in replaced:
        root.removeHandler(h)
    root.addHandler(handler)
    if isinstance(handler, LiveProgress):
        handler.start()
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        if isinstance(handler, LiveProgress):
            handler.stop()
        for h in replaced:
            root.addHandler(h)
