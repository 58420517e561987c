"""Fixtures of the UI checks (tests/ui/test_ui.py imports them; a conftest.py here would shadow
tests/conftest.py): a real MLflow server and a real Prefect server (each in its own process
group, stopped at the end pass or fail), one short training recorded to both (3 rounds of
configs/smoke.yaml, every worker's model evaluated, registering), and headless Chromium driven
through Debian's chromedriver (scripts/install-chromium.sh installs both; the tests are skipped,
saying so, where they are missing).

Screenshots go to $FEDMNIST_UI_SCREENSHOTS, else $FEDMNIST_HOME/ui-screenshots (the checkout's
.fedmnist/ui-screenshots under `make test`); the module prints the folder.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / ".venv" / "bin"
NAME = "federated-mnist-cnn"
ROUNDS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


class Service:
    """A server process in its own process group, its output in a log file."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path, health: str) -> None:
        self.log = log
        self.health = health
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                argv,
                cwd=log.parent,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_healthy(self, what: str, timeout: float = 240) -> None:
        def healthy() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(f"{what} exited: {self.log.read_text()[-3000:]}")
            return _answers(self.health)

        wait_until(healthy, timeout, f"{what} healthy", lambda: self.log.read_text()[-3000:])

    def terminate(self) -> None:
        """Ask the server's process group to stop (`stop` waits for it)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)

    def stop(self) -> None:
        self.terminate()
        if self.proc.poll() is not None:
            return
        try:
            self.proc.wait(5)  # a throwaway server: a short grace, then SIGKILL
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@dataclass
class Trained:
    """What the short training left: its summary, the two UIs' addresses and ids to open."""

    summary: dict[str, Any]
    mlflow: str  # the MLflow server (and UI) base URL
    prefect_ui: str  # the Prefect UI base URL
    prefect_api: str
    experiment_id: str
    run_id: str
    flow_run_id: str
    client: Any  # an MlflowClient on the server


@pytest.fixture(scope="module")
def screenshots() -> Path:
    from fedcore.config import fedmnist_home

    folder = Path(os.environ.get("FEDMNIST_UI_SCREENSHOTS") or fedmnist_home() / "ui-screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nUI screenshots: {folder}")
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, mnist_dir: Path) -> Iterator[Trained]:
    base = tmp_path_factory.mktemp("ui-stack")
    env = dict(os.environ)
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    mport, pport = _free_port(), _free_port()
    mlflow_uri = f"http://127.0.0.1:{mport}"
    prefect_api = f"http://127.0.0.1:{pport}/api"
    (base / "mlflow").mkdir()
    (base / "prefect").mkdir()
    mlflow = Service(
        [
            str(BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{base / 'mlflow' / 'mlflow.db'}",
            "--artifacts-destination",
            str(base / "mlflow" / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(mport),
            "--workers",
            "1",
        ],
        env,
        base / "mlflow" / "server.log",
        f"{mlflow_uri}/health",
    )
    prefect_env = dict(
        env,
        PREFECT_HOME=str(base / "prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_API_URL=prefect_api,  # the UI asks the API at :4200 otherwise
        PREFECT_SERVER_UI_API_URL=prefect_api,
    )
    prefect = Service(
        [
            str(BIN / "python"),
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(pport),
        ],
        prefect_env,
        base / "prefect" / "server.log",
        f"{prefect_api}/health",
    )
    try:
        mlflow.wait_healthy("mlflow server")
        prefect.wait_healthy("prefect server")
        home = base / "home"
        run_env = dict(
            env,
            FEDMNIST_HOME=str(home),
            PREFECT_API_URL=prefect_api,
            PREFECT_HOME=str(base / "prefect-client"),
        )
        summary_file = base / "summary.json"
        proc = subprocess.run(
            [
                str(BIN / "fedmnist"),
                "run",
                "configs/smoke.yaml",
                "--rounds",
                str(ROUNDS),
                "--set",
                f"tracking.uri={mlflow_uri}",
                "--set",
                f"tracking.registered_model={NAME}",
                "--set",
                "evaluation.workers=true",
                "--set",
                "evaluation.rounds=[1,2,3]",
                "--set",
                f"data_dir={mnist_dir}",
                "--summary-json",
                str(summary_file),
            ],
            cwd=ROOT,
            env=run_env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        summary = json.loads(summary_file.read_text())
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=mlflow_uri, registry_uri=mlflow_uri)
        run = client.get_run(summary["mlflow_run_id"])
        yield Trained(
            summary=summary,
            mlflow=mlflow_uri,
            prefect_ui=f"http://127.0.0.1:{pport}",
            prefect_api=prefect_api,
            experiment_id=run.info.experiment_id,
            run_id=run.info.run_id,
            flow_run_id=run.data.tags["prefect.flow_run_id"],
            client=client,
        )
    finally:
        for service in (mlflow, prefect):  # both wind down at once
            service.terminate()
        mlflow.stop()
        prefect.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium through Debian's chromedriver (never a downloaded browser)."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("chromium/chromedriver missing: run scripts/install-chromium.sh (as root)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1920,1080",
        "--disable-gpu",
    ):
        options.add_argument(arg)
    # Every check waits on its own condition: no need to wait for a page's last image as well.
    options.page_load_strategy = "eager"
    browser = webdriver.Chrome(service=webdriver.ChromeService(driver), options=options)
    try:
        yield browser
    finally:
        browser.quit()
