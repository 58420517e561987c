"""The MLflow record through a real tracking server: a 3-round training recorded over HTTP, read
back with the REST client, and the `champion` version loaded and scored again.

Starts `mlflow server` (SQLite store, proxied artifacts, one worker) in its own process group and
stops the group at the end, pass or fail. While it starts, a training against a closed port shows
that a store that is down stops the training before round 1.

The training's `tracking.uri` carries credentials (`http://ann:s3cret@...`; the server has no
auth and ignores them): they are used to connect and appear nowhere in what is recorded or shown
(params, config.json, tags, the summary, the output of the run and of `fedmnist models`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT
from waiting import wait_until

import fedcore
from fedcore.checkpoint import load_weights

pytestmark = pytest.mark.slow

MODELS = ("federated", "alice", "bob", "charlie")
WORKERS = ("alice", "bob", "charlie")
ROUNDS = [1, 2, 3]
NAME = "federated-mnist-cnn"
SECRET = "s3cret"


def _with_creds(uri: str) -> str:
    return uri.replace("http://", f"http://ann:{SECRET}@", 1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home: Path, prefect_home: Path) -> dict[str, str]:
    env = dict(os.environ, FEDMNIST_HOME=str(home), PREFECT_HOME=str(prefect_home))
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    return env


def _fedmnist(args: list[str], env: dict[str, str], timeout: float = 600):
    return subprocess.run(
        [str(ROOT / ".venv" / "bin" / "fedmnist"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class Server:
    def __init__(self, base: Path) -> None:
        self.port = _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        base.mkdir(parents=True, exist_ok=True)
        self.log = base / "mlflow-server.log"
        env = dict(os.environ)
        env.pop("MLFLOW_TRACKING_URI", None)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    str(ROOT / ".venv" / "bin" / "mlflow"),
                    "server",
                    "--backend-store-uri",
                    f"sqlite:///{base / 'mlflow.db'}",
                    "--artifacts-destination",
                    str(base / "artifacts"),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--workers",
                    "1",
                ],
                cwd=base,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopped whole at the end
            )

    def wait_healthy(self, timeout: float = 180) -> None:
        def healthy() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(f"mlflow server exited: {self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as resp:
                    return resp.status == 200
            except OSError:
                return False

        wait_until(healthy, timeout, "mlflow server healthy", lambda: self.log.read_text()[-3000:])

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mlflow-server")


@pytest.fixture(scope="module")
def server(base: Path):
    srv = Server(base / "server")
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def trained(server: Server, base: Path, mnist_dir: Path):
    server.wait_healthy()
    home = base / "home"
    proc = _fedmnist(
        [
            "run",
            "configs/smoke.yaml",
            "--rounds",
            "3",
            "--set",
            f"tracking.uri={_with_creds(server.uri)}",
            "--set",
            f"data_dir={mnist_dir}",
            "--set",
            "tracking.registered_model=federated-mnist-cnn",  # smoke runs register nothing
            "--summary-json",
            str(home / "summary.json"),
        ],
        _env(home, base / "prefect"),
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert SECRET not in proc.stdout + proc.stderr
    summary = json.loads((home / "summary.json").read_text())
    from mlflow.tracking import MlflowClient

    uri = _with_creds(server.uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    return summary, client, client.get_run(summary["mlflow_run_id"]), home


def _steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_a_server_that_is_down_stops_the_training_before_round_1(
    server: Server, base: Path, mnist_dir: Path
) -> None:
    # Runs while the real server starts (the fixture starts it; this test does not wait for it).
    uri = f"http://127.0.0.1:{_free_port()}"  # closed: nothing listens there
    home = base / "down"
    shown = uri.replace("http://", "http://***@")
    proc = _fedmnist(
        [
            "run",
            "configs/smoke.yaml",
            "--set",
            f"tracking.uri={_with_creds(uri)}",
            "--set",
            f"data_dir={mnist_dir}",
        ],
        _env(home, base / "prefect"),
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-4000:]
    assert f"MLflow tracking server {shown} is not reachable" in out
    assert SECRET not in out
    assert "mlflow server --backend-store-uri" in out and "tracking.enabled=false" in out
    assert "Training round 1/2" not in out
    assert not list(home.glob("runs/*/global-r*.safetensors"))


def test_run_is_named_tagged_and_has_the_config(trained) -> None:
    summary, client, run, _ = trained
    assert run.info.status == "FINISHED"
    assert re.fullmatch(r"smoke-mean-\d{8}-\d{6}", run.info.run_name)
    tags = run.data.tags
    assert tags["prefect.flow_run_id"] not in ("", "local") and tags["prefect.flow_run_name"]
    assert tags["config_hash"] == run.data.params["config_hash"]
    if (ROOT / ".git").exists():
        version = re.escape(fedcore.__version__)
        assert re.fullmatch(rf"{version}\+g[0-9a-f]{{7}}(\.dirty)?", tags["code_version"])
        assert tags["code_version"].split("+g")[1][:7] == tags["git_commit"]
        assert tags["mlflow.source.git.commit"].startswith(tags["git_commit"])
    else:
        assert tags["code_version"] == fedcore.__version__
    assert "prefect.deployment" not in tags  # no deployment ran this one
    assert "#/metric?" in tags["mlflow.note.content"]
    p = run.data.params
    assert (p["rounds"], p["train.steps"], p["strategy.name"]) == ("3", "2", "mean")
    assert p["tracking.uri"].startswith("http://***@127.0.0.1:")
    config = client.download_artifacts(run.info.run_id, "config.json", str(trained[3]))
    raw = json.loads(Path(config).read_text())
    assert raw["rounds"] == 3 and raw["data_dir"] == p["data_dir"]
    assert raw["tracking"]["uri"] == p["tracking.uri"]
    recorded = json.dumps([p, tags, raw, trained[0]], default=str)
    assert SECRET not in recorded and "ann:" not in recorded
    text = json.dumps(raw, sort_keys=True)
    assert hashlib.sha256(text.encode()).hexdigest()[:12] == tags["config_hash"]


def test_metrics_are_stepped_by_round_for_every_model(trained) -> None:
    _, client, run, _ = trained
    run_id = run.info.run_id
    quantities = ["accuracy", "loss", "seed_loss", "share_0-3", "share_4-6", "share_7-9"]
    quantities += [f"digit_{d}_accuracy" for d in range(10)]
    for model in MODELS:
        for q in quantities:
            assert _steps(client, run_id, f"{q}/{model}") == ROUNDS, f"{q}/{model}"
    for worker in WORKERS:
        for q in ("train_loss", "train_samples", "train_seconds", "wire_bytes", "failed"):
            assert _steps(client, run_id, f"{q}/{worker}") == ROUNDS, f"{q}/{worker}"
        samples = client.get_metric_history(run_id, f"train_samples/{worker}")
        assert {m.value for m in samples} == {64.0}  # 2 batches of 32
    for key in ("round_seconds", "round_bytes", "workers_ok", "lr"):
        assert _steps(client, run_id, key) == ROUNDS, key
    bytes_ = {m.step: m.value for m in client.get_metric_history(run_id, "round_bytes")}
    assert all(v > 3 * 2 * 1_700_000 for v in bytes_.values())  # 3 x (model out + model back)


def test_every_round_has_a_model_artifact_and_figures(trained) -> None:
    _, client, run, _ = trained
    arts = [a.path for a in client.list_artifacts(run.info.run_id, "models")]
    assert arts == [f"models/global-r{r:03d}.safetensors" for r in ROUNDS]
    figs = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert figs == {
        "figures/accuracy_by_round.png",
        "figures/confusion_federated_r003.png",
        "figures/group_shares_r003.png",
    }


def test_evaluated_models_are_logged_models_with_their_metrics(trained) -> None:
    _, client, run, _ = trained
    acc = {
        m.step: m.value for m in client.get_metric_history(run.info.run_id, "accuracy/federated")
    }
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert sorted(m.name for m in models) == [f"global-r{r:03d}" for r in ROUNDS]
    for m in models:
        rnd = int(m.params["round"])
        assert m.source_run_id == run.info.run_id and str(m.status).endswith("READY")
        linked = {x.key: (x.step, x.value) for x in m.metrics}
        assert linked["accuracy/federated"] == (rnd, acc[rnd])
        assert "accuracy/alice" not in linked  # a worker's score is not this model's
        files = [f.path for f in client.list_logged_model_artifacts(m.model_id)]
        assert "MLmodel" in files and not [f for f in files if f.endswith(".pkl")], files


def test_versions_are_registered_with_moving_aliases(trained) -> None:
    _, client, run, _ = trained
    acc = {
        m.step: m.value for m in client.get_metric_history(run.info.run_id, "accuracy/federated")
    }
    versions = sorted(client.search_model_versions(f"name='{NAME}'"), key=lambda v: int(v.version))
    assert [int(v.tags["round"]) for v in versions] == ROUNDS
    assert all(v.run_id == run.info.run_id for v in versions)
    for v in versions:
        assert float(v.tags["accuracy"]) == pytest.approx(acc[int(v.tags["round"])], abs=1e-6)
    best = max(versions, key=lambda v: (float(v.tags["accuracy"]), -int(v.version)))
    aliases = {k: int(v) for k, v in client.get_registered_model(NAME).aliases.items()}
    assert aliases == {"current": int(versions[-1].version), "champion": int(best.version)}


def test_champion_loaded_back_reproduces_its_logged_accuracy(trained, base, mnist_dir) -> None:
    _, client, run, home = trained
    uri = client.tracking_uri
    env = _env(home, base / "prefect")
    champion = client.get_model_version_by_alias(NAME, "champion")
    proc = _fedmnist(
        ["models", "evaluate", "champion", "--tracking-uri", uri, "--data-dir", str(mnist_dir)],
        env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    correct, total = map(int, re.search(r"Accuracy: (\d+)/(\d+)", proc.stdout).groups())
    assert (correct, total) == (int(champion.tags["correct"]), int(champion.tags["total"]))
    logged = {
        m.step: m.value for m in client.get_metric_history(run.info.run_id, "accuracy/federated")
    }
    assert correct == round(logged[int(champion.tags["round"])] * total)
    assert "Federated model: Percentage numbers 0-3: " in proc.stdout

    listed = _fedmnist(["models", "list", "--tracking-uri", uri], env)
    assert listed.returncode == 0, listed.stderr
    assert SECRET not in listed.stdout + listed.stderr + proc.stdout + proc.stderr
    assert "in http://***@127.0.0.1:" in listed.stdout
    assert re.search(r"^\s+3\s+3\s+\d+\.\d\d%\s+\S*current", listed.stdout, re.M), listed.stdout

    out = home / "current.safetensors"
    exported = _fedmnist(
        ["models", "export", "current", "--tracking-uri", uri, "--out", str(out)], env
    )
    assert exported.returncode == 0, exported.stderr
    weights, meta = load_weights(out)
    assert meta["round"] == "3" and meta["mlflow_run_id"] == run.info.run_id
    original = client.download_artifacts(
        run.info.run_id, "models/global-r003.safetensors", str(home)
    )
    expected, _ = load_weights(Path(original))
    assert all((weights[k] == expected[k]).all() for k in expected)


def test_ui_serves_the_project_store_with_its_artifacts(tmp_path: Path, monkeypatch) -> None:
    from flows.models_cli import ui_command

    monkeypatch.setenv("FEDMNIST_HOME", str(tmp_path))
    cmd = ui_command(f"sqlite:///{tmp_path / 'mlflow.db'}", "127.0.0.1", 5000)
    assert cmd[0].endswith("mlflow") and cmd[1] == "ui"
    assert cmd[cmd.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert cmd[cmd.index("--artifacts-destination") + 1] == str(tmp_path / "mlartifacts")
    assert cmd[cmd.index("--port") + 1] == "5000"


def test_an_unknown_alias_lists_the_known_ones(trained) -> None:
    from flows.models_cli import resolve_version

    _, client, _, _ = trained
    assert resolve_version(client, NAME, "1").version in ("1", 1)
    with pytest.raises(LookupError, match=r"no alias 'latest' \(aliases: champion, current\)"):
        resolve_version(client, NAME, "latest")
    with pytest.raises(LookupError, match="has no version 99"):
        resolve_version(client, NAME, "99")
