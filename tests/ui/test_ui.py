"""What a person must find in the MLflow and Prefect UIs after a short training, checked in
headless Chromium against real servers (tests/ui/uikit.py starts them and trains), and the
registry's meaning checked through MlflowClient on the same MLflow server.

Every wait is a condition on the page (a text, or the plotted lines of a chart), never a fixed
time. Each check saves a screenshot (the folder is printed); a failed one also saves the page's
text beside it. Two of them illustrate the README (docs/img/). One training serves every check,
and each page is loaded once: the accuracy chart stands for the run's metrics, one task run's
page for the per-worker task runs (it also shows its worker's own log lines). The device lineage
and a worker's log lines on its task run are read through the MLflow and Prefect clients.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from uikit import NAME, ROUNDS, Trained, browser, screenshots, trained  # noqa: F401 - fixtures

from fedcore.checkpoint import save_weights
from fedcore.model import initial_weights
from tasks.tracking.links import metric_chart_url, runs_by_accuracy_route
from tasks.tracking.models import log_global_model, register

pytestmark = pytest.mark.slow

WORKERS = ("alice", "bob", "charlie")
PAGE_TIMEOUT = 60.0  # seconds a page may take to show what is asked (a loaded 2-core machine)


def _show(
    browser: Any,  # noqa: F811 - the fixture
    url: str,
    texts: list[str],
    shot: Path,
    absent: tuple[str, ...] = (),
    before: Callable[[Any], None] | None = None,
    drawn: Callable[[Any], bool] | None = None,
) -> str:
    """Open `url`, wait until the page's text holds every one of `texts` (and `drawn(browser)`
    holds, when given), save a screenshot to `shot`; returns the page's text. `before` acts on
    the page (a click) before the wait."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url)

    def body() -> str:
        return str(browser.find_element(By.TAG_NAME, "body").text)

    try:
        if before is not None:
            before(browser)
        WebDriverWait(browser, PAGE_TIMEOUT, poll_frequency=0.2).until(
            lambda _: all(t in body() for t in texts) and (drawn is None or drawn(browser))
        )
    except TimeoutException:
        browser.save_screenshot(str(shot.with_suffix(".failed.png")))
        shot.with_suffix(".failed.txt").write_text(body())
        missing = [t for t in texts if t not in body()] or ["the drawing it waits for"]
        pytest.fail(f"{url}: no {missing} after {PAGE_TIMEOUT:g}s (page text: {shot}.failed.txt)")
    browser.save_screenshot(str(shot))
    text = body()
    for t in absent:
        assert t not in text, f"{url} shows {t!r}"
    return text


def _lines_drawn(count: int) -> Callable[[Any], bool]:
    """Whether the page's plotly charts hold `count` drawn lines (MLflow draws its metric charts
    with plotly; until the data arrives a chart shows a spinner and no line)."""
    script = (
        "return Array.from(document.querySelectorAll('.js-plotly-plot .scatterlayer path.js-line'))"
        ".filter(p => (p.getAttribute('d') || '').length > 10).length"
    )
    return lambda driver: int(driver.execute_script(script) or 0) >= count


# --- the registry, through MlflowClient -------------------------------------------------------


def test_the_training_registered_its_rounds_and_current_is_its_final_model(
    trained: Trained,  # noqa: F811
) -> None:
    client = trained.client
    versions = sorted(client.search_model_versions(f"name='{NAME}'"), key=lambda v: int(v.version))
    assert [int(v.tags["round"]) for v in versions] == [1, 2, ROUNDS]
    assert [v.tags["final"] for v in versions] == ["false", "false", "true"]
    assert {v.tags["recipe"] for v in versions} == {"smoke"}
    aliases = {k: int(v) for k, v in client.get_registered_model(NAME).aliases.items()}
    best = max(versions, key=lambda v: (float(v.tags["accuracy"]), -int(v.version)))
    assert aliases == {"current": int(versions[-1].version), "champion": int(best.version)}
    for v in versions:  # each logged model lists its version: the UI shows it as registered
        model = client.get_logged_model(v.source.removeprefix("models:/"))
        assert v.source == f"models:/{model.model_id}"
        listed = json.loads(model.tags["mlflow.modelVersions"])  # the server writes ints
        assert (NAME, str(v.version)) in {(e["name"], str(e["version"])) for e in listed}
    tags = client.get_experiment(trained.experiment_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    assert runs_by_accuracy_route(trained.experiment_id) in tags["mlflow.note.content"]


# --- the MLflow UI ------------------------------------------------------------------------------


def test_mlflow_experiment_opens_on_its_runs_ordered_by_federated_accuracy(
    trained: Trained,  # noqa: F811
    browser: Any,  # noqa: F811
    screenshots: Path,  # noqa: F811
) -> None:
    # The list's columns are the browser's own state, which no store can set: ordering it by the
    # federated accuracy (the experiment description's link) is what MLflow allows; the page
    # then names that key on its "Sort" button.
    run = trained.client.get_run(trained.run_id)
    url = f"{trained.mlflow}/{runs_by_accuracy_route(trained.experiment_id)}"
    _show(
        browser,
        url,
        [run.info.run_name, "accuracy/federated"],
        screenshots / "mlflow-runs.png",
    )


def test_mlflow_run_charts_accuracy_of_the_federated_model_and_each_worker(
    trained: Trained,  # noqa: F811
    browser: Any,  # noqa: F811
    screenshots: Path,  # noqa: F811
) -> None:
    keys = [f"accuracy/{m}" for m in ("federated", *WORKERS)]
    url = f"{trained.mlflow}/{metric_chart_url(trained.experiment_id, trained.run_id, keys)}"
    _show(
        browser, url, keys, screenshots / "mlflow-accuracy-chart.png", drawn=_lines_drawn(len(keys))
    )


def test_mlflow_run_records_each_devices_lineage(trained: Trained) -> None:  # noqa: F811
    """Each worker's hello as `device.<worker>.*` tags, its memory after every round as
    `device/<worker>/rss_mb`, its shard as a dataset input digested from its label counts."""
    from tasks.tracking.lineage import label_digest

    client = trained.client
    run = client.get_run(trained.run_id)
    hellos = {line["worker"]: line for line in _devices(trained)}
    assert sorted(hellos) == sorted([*WORKERS, "testing"])
    for worker, hello in hellos.items():
        tags = {
            k.split(".", 2)[2]: v
            for k, v in run.data.tags.items()
            if k.startswith(f"device.{worker}.")
        }
        assert tags["python"] == hello["python"] and tags["torch"] == hello["torch"]
        assert tags["device"] == "cpu" and tags["torch_func"] == "yes"
        assert tags["cryptography"] == hello["facts"]["cryptography"]
    for worker in WORKERS:
        history = client.get_metric_history(trained.run_id, f"device/{worker}/rss_mb")
        assert sorted(m.step for m in history) == list(range(1, ROUNDS + 1))
        assert all(m.value > 50 for m in history)
    inputs = {i.dataset.name: i.dataset for i in run.inputs.dataset_inputs}
    assert sorted(inputs) == sorted(f"mnist-{w}" for w in hellos)
    for worker, hello in hellos.items():
        counts = {int(k): v for k, v in hello["label_counts"].items()}
        assert inputs[f"mnist-{worker}"].digest == label_digest(counts)


def _devices(done: Trained) -> list[dict[str, Any]]:
    from fedcore import timeline

    return timeline.read(Path(done.summary["checkpoint_dir"]), timeline.DEVICES_FILE)


def test_mlflow_registered_model_shows_current_and_champion(
    trained: Trained,  # noqa: F811
    browser: Any,  # noqa: F811
    screenshots: Path,  # noqa: F811
) -> None:
    _show(
        browser,
        f"{trained.mlflow}/#/models/{NAME}",
        ["current", "champion", "Version 3"],
        screenshots / "mlflow-registered-model.png",
    )
    champion = trained.client.get_model_version_by_alias(NAME, "champion")
    _show(
        browser,
        f"{trained.mlflow}/#/experiments/{trained.experiment_id}/models/"
        + champion.source.removeprefix("models:/"),
        [NAME, f"v{champion.version}"],  # its "Model versions" entry
        screenshots / "mlflow-champion-logged-model.png",
        absent=("Not registered",),
    )


# --- the Prefect UI -----------------------------------------------------------------------------


def test_prefect_flow_run_shows_per_worker_task_runs_and_the_evaluation_table(
    trained: Trained,  # noqa: F811
    browser: Any,  # noqa: F811
    screenshots: Path,  # noqa: F811
) -> None:
    page = f"{trained.prefect_ui}/runs/flow-run/{trained.flow_run_id}"
    tasks = [f"train-{w}-r{r:02d}" for w in WORKERS for r in range(1, ROUNDS + 1)]
    # The flow run's tabs switch client-side (a `?tab=` or a click did not switch them in
    # headless Chromium): the flow run page (its graph), each task run's and the artifact's own
    # pages are what a person reaches from it.
    _show(browser, page, ["Completed", "20 Task runs"], screenshots / "prefect-flow-run.png")
    ids = _task_run_ids(trained)
    assert set(tasks) <= set(ids)
    # One task run's page: its name, its state and the worker's own line of that round.
    _show(
        browser,
        f"{trained.prefect_ui}/runs/task-run/{ids[tasks[0]]}",
        [tasks[0], "Completed", "[alice] round 1: 2 steps"],
        screenshots / f"prefect-{tasks[0]}.png",
    )
    key = f"smoke-evaluation-r{ROUNDS:03d}"
    _show(
        browser,
        f"{trained.prefect_ui}/artifacts/key/{key}",
        [key, f"evaluation at round {ROUNDS} of {ROUNDS}"],  # the table itself renders below
        screenshots / "prefect-evaluation-table.png",
    )


def _task_run_ids(done: Trained) -> dict[str, str]:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with SyncPrefectClient(done.prefect_api) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[uuid.UUID(done.flow_run_id)]))
        )
    return {t.name: str(t.id) for t in runs}


def test_a_workers_log_lines_are_on_the_task_run_they_belong_to(trained: Trained) -> None:  # noqa: F811
    """What alice logged while training round r is in `train-alice-rNN`'s logs (and in no other
    task run's); what the evaluator logged while scoring round r is in `evaluate-rNN`'s."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId

    ids = _task_run_ids(trained)
    with SyncPrefectClient(trained.prefect_api) as client:

        def messages(task: str) -> list[str]:
            logs = client.read_logs(
                LogFilter(task_run_id=LogFilterTaskRunId(any_=[uuid.UUID(ids[task])]))
            )
            return [log.message for log in logs]

        for rnd in range(1, ROUNDS + 1):
            for worker in WORKERS:
                own = [m for m in messages(f"train-{worker}-r{rnd:02d}") if m.startswith("[")]
                assert any(m.startswith(f"[{worker}] round {rnd}: 2 steps") for m in own), own
                assert all(m.startswith(f"[{worker}] ") for m in own), own
            scored = messages(f"evaluate-r{rnd:02d}")
            assert any(m.startswith(f"[testing] round {rnd}: evaluated") for m in scored)
        started = messages("start-alice")
        assert any(m.startswith("[alice] alice holds 24754 images") for m in started), started


# --- last: it adds a version the screenshots above should not show ----------------------------


def test_a_partial_training_never_becomes_current_nor_a_worse_one_champion(
    trained: Trained,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A training stopped at round 2 of 40 registers round 2 (a real, evaluated model) but
    `current` stays on the last full training's final model; a version scored on a part of the
    test set does not beat one scored on all of it."""
    client = trained.client
    before = client.get_registered_model(NAME).aliases
    champion = client.get_model_version(NAME, before["champion"])
    run_id = client.create_run(trained.experiment_id, run_name="partial").info.run_id
    client.log_param(run_id, "rounds", "40")
    client.log_param(run_id, "name", "seed")
    file = save_weights(tmp_path / "w.safetensors", initial_weights(7), {"strategy": "mean"})
    model_id, _ = log_global_model(client, trained.experiment_id, run_id, 2, file, {"round": "2"})
    client.finalize_logged_model(model_id, "READY")
    tags = {"round": "2", "accuracy": "0.999000", "correct": "999", "total": "1000"}
    number = register(client, NAME, run_id, model_id, tags, 0.999, None)
    version = client.get_model_version(NAME, number)
    assert version.tags["final"] == "false" and version.tags["recipe"] == "seed"
    assert client.get_registered_model(NAME).aliases == before
    assert int(champion.tags["total"]) == 10000
