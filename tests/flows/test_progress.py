"""What `fedmnist run` shows: the live panel on a terminal, plain lines in a file.

The panel is driven with records made the way the training makes them (the loop's templates on
`prefect.flow_runs`, Prefect's task state lines on `prefect.task_runs`, the seed's evaluation
lines from fedcore.report) into a recording rich Console that believes it is a terminal. The
plain mode runs a real short `fedmnist run` with its output to a file.
"""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT
from rich.console import Console

from fedcore import report
from fedcore.evaluation import EvalResult
from flows.progress import LiveProgress, TrainingState, showing_progress

BIN = ROOT / ".venv" / "bin"
FLOW = logging.getLogger("prefect.flow_runs")
TASKS = logging.getLogger("prefect.task_runs")
ALICE = logging.getLogger("fedcore.worker.alice")
RUN = {"flow_run_name": "daffy-orca", "flow_run_id": "0"}
GROUPS = [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
WORKERS = ("alice", "bob", "charlie")


def result(correct: int) -> EvalResult:
    return EvalResult(
        loss=0.5,
        seed_loss=0.0123,
        correct=correct,
        total=10000,
        confusion=[[0] * 10 for _ in range(10)],
        group_shares=[0.4, 0.3, 0.3],
    )


def eval_lines(model: str, correct: int) -> list[str]:
    return report.evaluation_lines(model, result(correct), GROUPS)


def task_finished(name: str, state: str, level: int = logging.INFO) -> None:
    TASKS.log(
        level, f"Finished in state {state}", extra={"task_run_name": name, "task_run_id": "1"}
    )


def drive_round(rnd: int, total: int, seconds: float) -> None:
    FLOW.info("Training round %d/%d", rnd, total, extra=RUN)
    ALICE.info("[alice] round %d: 2 steps, loss 2.0473, 18.86s", rnd)
    task_finished(f"train-alice-r{rnd:02d}", "Completed()")
    FLOW.warning("Round %d: %s dropped (%s): %s", rnd, "bob", "unreachable", "EOF", extra=RUN)
    losses = "alice 0.300, charlie 0.400"
    FLOW.info("%s %d/%d done in %.1fs (training loss: %s)", "Round", rnd, total, seconds, losses)


def screen(raw: str) -> list[str]:
    """What a terminal shows after `raw`: the lines left once rich's cursor moves (up one line,
    erase the line, carriage return) are applied; other escape sequences (colour, cursor
    visibility) change no text."""
    lines, row = [""], 0
    for token in re.findall(r"\x1b\[[0-9;?]*[A-Za-z]|\r|\n|[^\x1b\r\n]+", raw):
        if token == "\n":
            row += 1
            if row == len(lines):
                lines.append("")
        elif token == "\r":
            continue  # rich writes whole lines after erasing them
        elif token == "\x1b[1A":
            row = max(row - 1, 0)
        elif token == "\x1b[2K":
            lines[row] = ""
        elif not token.startswith("\x1b"):
            lines[row] += token
    return [line for line in lines if line]


@pytest.fixture
def live() -> Iterator[tuple[LiveProgress, Console]]:
    console = Console(
        file=io.StringIO(), record=True, force_terminal=True, width=200, color_system=None
    )
    handler = LiveProgress(console, refresh=False)
    for logger in (FLOW, TASKS, ALICE):
        logger.setLevel(logging.INFO)
        logger.addHandler(handler)
    handler.start()
    yield handler, console
    handler.stop()
    for logger in (FLOW, TASKS, ALICE):
        logger.removeHandler(handler)


def test_panel_shows_round_statuses_eta_and_accuracy(live: tuple[LiveProgress, Console]) -> None:
    handler, console = live
    FLOW.info(
        "Training %s: %d rounds over %s with strategy %s (%d parameters); evaluator: %s",
        "seed",
        40,
        "alice, bob, charlie",
        "mean",
        431080,
        "testing",
        extra=RUN,
    )
    ALICE.info("[alice] alice holds 24754 images (train digits 0-3) on cpu")
    drive_round(1, 40, 10.0)
    FLOW.info("Evaluating models (%s %d)", "round", 1, extra=RUN)
    lines = eval_lines("alice", 3012) + eval_lines("federated", 8123)
    for line in lines:
        FLOW.info(line, extra=RUN)
    FLOW.info("Training round %d/%d", 2, 40, extra=RUN)
    task_finished("train-charlie-r02", "Completed()")

    state = handler.state
    assert (state.round, state.rounds) == (2, 40)
    assert state.workers == {"alice": "training", "bob": "training", "charlie": "done"}
    assert state.accuracy == {"alice": 30.12, "federated": 81.23}
    assert state.eta_seconds() == pytest.approx(390.0)  # 39 rounds left at 10 s each

    handler.live.refresh()
    assert isinstance(console.file, io.StringIO)
    on_screen = screen(console.file.getvalue())
    shown = "\n".join(on_screen)
    # The ETA counts down from 6m30s (39 rounds of 10 s) as the current round runs.
    assert re.fullmatch(
        r"Round 2/40   ETA 6m[23]\ds   federated accuracy 81\.23% \(round 1\)", on_screen[-2]
    )
    assert on_screen[-1] == "alice training  bob training  charlie done"
    assert "Round 2/40" in shown
    assert "federated accuracy 81.23% (round 1)" in shown
    assert "ETA 6m" in shown
    for status in ("alice training", "bob training", "charlie done"):
        assert status in shown
    for line in lines:  # the seed's lines, exactly, each on a line of its own
        assert line in on_screen
    assert "warning: Round 1: bob dropped (unreachable): EOF" in shown
    assert "Finished in state" not in shown  # task state lines: only with -v
    assert "Training round" not in shown and "done in" not in shown  # the panel says it
    assert "[alice] round 1" not in shown
    assert "[alice] alice holds 24754 images (train digits 0-3) on cpu" in on_screen


def test_panel_marks_dropped_and_failed_workers(live: tuple[LiveProgress, Console]) -> None:
    handler, console = live
    FLOW.info(
        "Training %s: %d rounds over %s with strategy %s (%d parameters); evaluator: %s",
        "smoke",
        2,
        "alice, bob",
        "mean",
        1,
        "none",
        extra=RUN,
    )
    drive_round(1, 2, 3.0)
    assert handler.state.workers == {"alice": "done", "bob": "dropped"}
    FLOW.info("Training round %d/%d", 2, 2, extra=RUN)
    task_finished("train-bob-r02", "Failed('boom')", logging.ERROR)
    FLOW.warning("Round %d: update from %s rejected: %s", 2, "alice", "nan", extra=RUN)
    handler.live.refresh()
    assert handler.state.workers == {"alice": "rejected", "bob": "dropped"}
    assert isinstance(console.file, io.StringIO)
    shown = "\n".join(screen(console.file.getvalue()))
    assert "alice rejected" in shown and "bob dropped" in shown
    assert "federated accuracy -" in shown


def test_verbose_panel_prints_task_state_lines() -> None:
    console = Console(record=True, force_terminal=True, width=120, color_system=None)
    handler = LiveProgress(console, verbose=True, refresh=False)
    record = TASKS.makeRecord(
        TASKS.name,
        logging.INFO,
        __file__,
        1,
        "Finished in state Completed()",
        (),
        None,
        extra={"task_run_name": "train-alice-r07", "task_run_id": "1"},
    )
    handler.emit(record)
    assert "Task run 'train-alice-r07' - Finished in state Completed()" in console.export_text()


def test_eta_counts_the_time_the_current_round_has_run() -> None:
    state = TrainingState(rounds=10, round=4, round_seconds=[8.0, 12.0], done_round=3)
    state.last_done_at = 100.0
    assert state.eta_seconds() == pytest.approx(70.0)
    assert state.eta_seconds(now=104.0) == pytest.approx(66.0)


def test_plain_mode_when_stdout_is_a_file(tmp_path: Path) -> None:
    out = (tmp_path / "out.txt").open("w")
    with showing_progress(stream=out) as handler:
        FLOW.info("Federated model: Average loss: 0.0100, Accuracy: 9/10 (90.00%)", extra=RUN)
        FLOW.info("evil \x1b[2J\rline", extra=RUN)
        task_finished("train-alice-r01", "Completed()")
        assert handler in logging.getLogger().handlers
    assert handler not in logging.getLogger().handlers
    out.close()
    text = (tmp_path / "out.txt").read_text()
    assert "Flow run 'daffy-orca' - Federated model: Average loss: 0.0100" in text
    assert "evil ?[2J?line" in text
    assert "\x1b" not in text and "\r" not in text
    assert "Finished in state" not in text


def fedmnist_run(tmp_path: Path, mnist_dir: Path, *extra: str) -> str:
    home = tmp_path / "home"
    env = dict(os.environ, FEDMNIST_HOME=str(home), PREFECT_HOME=str(tmp_path / "prefect"))
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "300"  # a loaded machine
    env.pop("PREFECT_API_URL", None)
    out = tmp_path / "run.txt"
    with out.open("w") as stream:
        proc = subprocess.run(
            [str(BIN / "fedmnist"), "run", "configs/smoke.yaml", "--rounds", "1"]
            + ["--set", "tracking.enabled=false", "--set", f"data_dir={mnist_dir}", *extra],
            cwd=ROOT,
            env=env,
            stdout=stream,
            stderr=subprocess.PIPE,
            text=True,
            timeout=600,
        )
    text = out.read_text()
    assert proc.returncode == 0, text[-3000:] + proc.stderr[-3000:]
    return text


@pytest.mark.slow
@pytest.mark.parametrize("verbose", [False, True], ids=["default", "verbose"])
def test_fedmnist_run_to_a_file_gives_plain_lines(
    tmp_path: Path, mnist_dir: Path, verbose: bool
) -> None:
    text = fedmnist_run(tmp_path, mnist_dir, *(["-v"] if verbose else []))
    assert "\x1b" not in text and "\r" not in text
    assert "Evaluating models (round 1)" in text
    evaluated = [line for line in text.splitlines() if ": Average loss: " in line]
    models = {line.split(" - ", 1)[1].split(":", 1)[0] for line in evaluated}
    assert models == {"Federated model", *(f"Model update {w}" for w in WORKERS)}
    assert any("Federated model: Percentage numbers 0-3: " in line for line in text.splitlines())
    assert "Round 1/1 done in" in text
    state_lines = [line for line in text.splitlines() if "Finished in state" in line]
    if verbose:
        for worker in WORKERS:
            shown = f"Task run 'train-{worker}-r01' - Finished in state Completed()"
            assert any(shown in line for line in state_lines), state_lines
    else:
        assert not [x for x in state_lines if "Task run" in x], state_lines
