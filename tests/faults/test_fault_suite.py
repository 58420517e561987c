"""The fault suite: a training over the real SSH lab survives devices that die, drop off, stall
or lie, and a coordinator that is killed, and loses nothing.

Every device is a real sshd on loopback with its own user and shard (`fedcore.lab`); every
scenario runs `fedmnist run` (the flow, Prefect's temporary server, a real MLflow store) in its
own FEDMNIST_HOME; a fault-free training with the same seed is the reference. Faults are real
where they can be: a device's sshd is killed and restarted, a worker process is SIGSTOPped, garbage
bytes are written into a worker's stdin, the coordinator's process group is SIGKILLed. A worker
that lies runs `lying_worker.py` (the real worker whose train step misbehaves on cue) as the
device's Python. The table of what each scenario did and what survived is printed at the end
(`pytest -s tests/faults`).

The trainings use IID shards (a third of the training set each) and 8 rounds of 20 batches: on
the seed's label-skewed split, or with 10 batches, the accuracy after 8 rounds still swings by
1-4 points when one worker's update of one round is left out (measured in a plain loop), so
"within one point of the fault-free run" would measure that noise, not what the faults cost.
Here leaving out the scenarios' updates moves it by less than 0.1 point.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT
from liar_install import install as install_liar

from fedcore.checkpoint import load_weights
from fedcore.shards import ShardSpec
from fedlab import kill_host, lab_down, lab_up, restart_host

pytestmark = pytest.mark.slow
ROUNDS = 8
TRAINERS = ("alice", "bob", "charlie")
FEDMNIST = str(ROOT / ".venv" / "bin" / "fedmnist")
TABLE: list[tuple[str, str, str]] = []
Action = Callable[[], None]


# -- the lab and its trainings -----------------------------------------------------------------


@pytest.fixture(scope="module")
def lab(request: pytest.FixtureRequest, mnist_dir: Path):
    done = subprocess.run(
        [str(ROOT / "scripts" / "install-sshd.sh")], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"sshd cannot be installed: {done.stderr.strip()[-300:]}")
    # A folder the lab users can enter (pytest's tmp_path lies under a 700 folder).
    base = Path(tempfile.mkdtemp(prefix="fedmnist-faults-"))
    base.chmod(0o755)
    lab_dir = base / "lab"
    request.addfinalizer(lambda: shutil.rmtree(base, ignore_errors=True))
    request.addfinalizer(lambda: lab_down(lab_dir))
    shards = {n: ShardSpec.iid(i, len(TRAINERS), seed=1) for i, n in enumerate(TRAINERS)}
    shards["testing"] = ShardSpec(split="test")
    info = lab_up(lab_dir, shards, mnist_dir, evaluator="testing")
    device_python = install_liar(lab_dir, info.python)
    workers = yaml.safe_load(info.inventory.read_text())["workers"]
    for w in workers:
        w["ssh"]["keepalive"] = 2
        if w["role"] == "trainer":
            w["ssh"]["python"] = device_python
    config = base / "faults.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "faults",
                "seed": 1,
                "rounds": ROUNDS,
                "train": {"steps": 20, "batch_size": 32, "lr": 0.1, "lr_decay": 0.98},
                "strategy": {"name": "mean"},
                "evaluation": {"rounds": [ROUNDS], "workers": False},
                "quorum": 2,
                "timeouts": {"train": 15, "evaluate": 300},
                "workers": workers,
            }
        )
    )
    ref = base / "reference"
    out = _run([str(config), "--summary-json", str(ref / "summary.json")], _env(ref, lab_dir, {}))
    assert out.returncode == 0, out.output[-4000:]
    yield lab_dir, config, ref
    if TABLE:
        lines = ["| scenario | what happened | what survived |", "|---|---|---|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in TABLE]
        print("\n" + "\n".join(lines))


def _env(home: Path, lab_dir: Path, faults: dict[str, str], always: bool = False) -> dict:
    """The coordinator's environment; the devices' fault cues go to `<lab>/faults.env`."""
    home.mkdir(parents=True, exist_ok=True)
    markers = lab_dir / "fault-markers" / home.name
    markers.mkdir(parents=True, exist_ok=True)
    markers.chmod(0o1777)
    markers.parent.chmod(0o755)
    cues = {f"FEDMNIST_FAULT_{n.upper()}": spec for n, spec in faults.items()}
    cues["FEDMNIST_FAULT_DIR"] = str(markers)
    cues["FEDMNIST_FAULT_ALWAYS"] = "1" if always else "0"
    (lab_dir / "faults.env").write_text("".join(f"export {k}='{v}'\n" for k, v in cues.items()))
    env = dict(os.environ, FEDMNIST_HOME=str(home), PREFECT_HOME=str(home.parent / "prefect"))
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


class Killed(Exception):
    pass


class Finished:
    def __init__(self, returncode: int, output: str) -> None:
        self.returncode, self.output = returncode, output


def _run(args: list[str], env: dict, actions: list[tuple[str, Action]] | None = None) -> Finished:
    """`fedmnist run ARGS`; each action runs once, as soon as its marker is printed."""
    proc = subprocess.Popen(
        [FEDMNIST, "run", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    pending = list(actions or [])
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            while pending and pending[0][0] in line:
                pending.pop(0)[1]()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = "".join(lines)
    assert not pending, f"never printed {pending[0][0]!r}:\n{output[-4000:]}"
    return Finished(proc.returncode, output)


def _history(home: Path, run_id: str, key: str) -> dict[int, float]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def _summary(home: Path) -> dict:
    return json.loads((home / "summary.json").read_text())


def _final_weights(summary: dict) -> dict[str, torch.Tensor]:
    return load_weights(Path(summary["checkpoint_dir"]) / f"global-r{ROUNDS:03d}.safetensors")[0]


def _worker_pid(name: str) -> int:
    """The pid of device `name`'s worker program (found by its command line)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"lying_worker.py") for a in argv) and name.encode() in argv:
            found.append(int(entry.name))
    assert len(found) == 1, f"worker processes of {name}: {found}"
    return found[0]


def _within_a_point(label: str, s: dict, r: dict) -> None:
    diff = abs(s["final_accuracy"] - r["final_accuracy"])
    TABLE.append(
        (
            f"({label})",
            f"final accuracy {100 * s['final_accuracy']:.2f}% vs "
            f"{100 * r['final_accuracy']:.2f}% fault-free",
            f"{100 * diff:.2f} points apart",
        )
    )
    assert diff <= 0.01, TABLE[-1]


# -- the scenarios ------------------------------------------------------------------------------


def test_workers_that_die_stall_and_lie(lab) -> None:
    """1 a worker process killed mid-round, 3 a device stalled (SIGSTOP) past the deadline,
    4 NaN weights, 5 a wrong-shape update: one training, each in its own round."""
    lab_dir, config, ref = lab
    home = ref.parent / "lying"
    faults = {"alice": "exit@2", "charlie": "nan@2", "bob": "shape@3"}
    stalled: list[int] = []

    def stop_charlie() -> None:
        stalled.append(_worker_pid("charlie"))
        os.kill(stalled[0], signal.SIGSTOP)

    def continue_charlie() -> None:
        os.kill(stalled[0], signal.SIGCONT)  # it wakes to a closed session and exits

    out = _run(
        [str(config), "--summary-json", str(home / "summary.json")],
        _env(home, lab_dir, faults),
        [(f"Round 3/{ROUNDS} done", stop_charlie), (f"Round 4/{ROUNDS} done", continue_charlie)],
    )
    assert out.returncode == 0, out.output[-4000:]
    s = _summary(home)
    run_id = s["mlflow_run_id"]
    assert sorted(_history(home, run_id, "round_seconds")) == list(range(1, ROUNDS + 1))
    failed = _history(home, run_id, "workers_failed")
    assert failed == {r: 1.0 if r in (2, 3, 4) else 0.0 for r in range(1, ROUNDS + 1)}
    assert _history(home, run_id, "failed/alice")[2] == 0.0  # died, restarted, delivered
    assert _history(home, run_id, "failed/charlie") == {
        r: 1.0 if r in (2, 4) else 0.0 for r in range(1, ROUNDS + 1)
    }
    assert _history(home, run_id, "failed/bob")[3] == 1.0
    log = out.output
    assert "charlie dropped (rejected)" in log and "non-finite values" in log
    assert "bob dropped (rejected)" in log and "'fc1.weight' has shape [3, 3]" in log
    assert "charlie dropped (timeout)" in log
    TABLE.extend([
        ("1 worker process killed mid-round (alice, r2)", "reconnected by the task's retry",
         "round 2 with all 3 workers"),
        ("3 device stalled, SIGSTOP (charlie, r4)", "WorkerTimeout after 15 s, dropped",
         "round 4 with 2 of 3; charlie back in round 5"),
        ("4 NaN weights (charlie, r2)", "rejected: non-finite values", "round 2 with 2 of 3"),
        ("5 wrong-shape update (bob, r3)", "rejected: shape", "round 3 with 2 of 3"),
    ])  # fmt: skip
    _within_a_point("1, 3, 4, 5 in one training", s, _summary(ref))


def test_devices_that_drop_off_and_get_garbage(lab) -> None:
    """2 a device's sshd stopped for two rounds, then restarted; 8 garbage bytes written into a
    worker program's stdin between rounds."""
    lab_dir, config, ref = lab
    home = ref.parent / "dropping"
    garbage = b"\x00\xffGARBAGE not a frame\n" * 64

    def write_garbage() -> None:
        # /proc/PID/fd/0 of the worker is its end of the pipe from sshd: bytes written there
        # arrive on its stdin as if the coordinator had sent them.
        with open(f"/proc/{_worker_pid('alice')}/fd/0", "wb") as stdin:
            stdin.write(garbage)

    out = _run(
        [str(config), "--summary-json", str(home / "summary.json")],
        _env(home, lab_dir, {}),
        [
            (f"Round 1/{ROUNDS} done", lambda: kill_host(lab_dir, "bob")),
            (f"Round 3/{ROUNDS} done", lambda: restart_host(lab_dir, "bob") and None),
            (f"Round 4/{ROUNDS} done", write_garbage),
        ],
    )
    assert out.returncode == 0, out.output[-4000:]
    s = _summary(home)
    run_id = s["mlflow_run_id"]
    assert sorted(_history(home, run_id, "round_seconds")) == list(range(1, ROUNDS + 1))
    assert _history(home, run_id, "failed/bob") == {
        r: 1.0 if r in (2, 3) else 0.0 for r in range(1, ROUNDS + 1)
    }
    assert "bob dropped (unreachable)" in out.output
    alice = _history(home, run_id, "failed/alice")
    assert all(alice[r] == 0.0 for r in range(1, ROUNDS + 1) if r != 5)
    assert "alice" in out.output and "not a frame" not in out.output.split("Round 4/")[0]
    TABLE.extend([
        ("2 sshd stopped for rounds 2-3, then restarted (bob)", "connection refused, retried, "
         "dropped", "rounds 2-3 with 2 of 3; bob back in round 4"),
        ("8 garbage bytes on a worker's stdin (alice, after r4)", "worker rejected the frame and "
         "exited; restarted", f"round 5 with {3 - int(alice[5])} of 3"),
    ])  # fmt: skip
    _within_a_point("2 and 8 in one training", s, _summary(ref))


@pytest.mark.parametrize(
    ("marker", "label"),
    [
        (f"Round 3/{ROUNDS} done", "6 coordinator killed between rounds"),
        (f"Training round 4/{ROUNDS}", "7 coordinator killed mid-round"),
    ],
)
def test_coordinator_killed_then_resumed(lab, marker: str, label: str) -> None:
    lab_dir, config, ref = lab
    home = ref.parent / label.split()[0]
    env = _env(home, lab_dir, {})
    killed: list[str] = []

    def kill_coordinator() -> None:
        killed.append(marker)
        raise Killed  # leaves _run, which SIGKILLs the coordinator's whole process group

    with pytest.raises(Killed):
        _run([str(config)], env, [(marker, kill_coordinator)])
    assert killed
    runs = list((home / "runs").iterdir())
    assert len(runs) == 1
    state = json.loads((runs[0] / "state.json").read_text())
    assert state["round"] == 3
    out = _run(["--resume", runs[0].name, "--summary-json", str(home / "summary.json")], env)
    assert out.returncode == 0, out.output[-4000:]
    assert "resuming" in out.output and "after round 3" in out.output
    s = _summary(home)
    assert s["mlflow_run_id"] == state["mlflow_run_id"]  # the same MLflow run goes on
    steps = sorted(_history(home, s["mlflow_run_id"], "round_seconds"))
    assert steps == list(range(1, ROUNDS + 1))  # no round lost or counted twice
    mine, theirs = _final_weights(s), _final_weights(_summary(ref))
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)  # same seed, same model
    TABLE.append((label, "resumed from round 3 with --resume", "identical final weights"))


def test_all_workers_gone_fails_clearly(lab) -> None:
    lab_dir, config, ref = lab
    home = ref.parent / "gone"
    env = _env(home, lab_dir, {n: "exit@2" for n in TRAINERS}, always=True)
    out = _run([str(config)], env)
    assert out.returncode == 1
    assert "round 2: 0 of 3 workers returned an update, 2 needed" in out.output
    TABLE.append(("9 all workers gone (r2)", "QuorumNotReached, flow Failed", "round 1 kept"))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-s"]))
