"""Where the record goes (config, environment, default), the health check of a server, and the
UI links.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from urllib.parse import parse_qs

import pytest
from tracking_fakes import closed_port

from tasks.tracking import (
    TrackingUnavailable,
    artifact_root_for,
    check_server,
    metric_chart_url,
    resolve_tracking_uri,
)


def test_tracking_uri_config_beats_env_beats_default(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FEDMNIST_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri(None) == "http://env:5000"
    assert resolve_tracking_uri("http://config:5000") == "http://config:5000"


def test_sqlite_artifacts_go_beside_the_database_and_servers_decide() -> None:
    assert artifact_root_for("sqlite:////data/x/mlflow.db") == Path("/data/x/mlartifacts")
    assert artifact_root_for("http://127.0.0.1:5000") is None


def test_a_closed_port_is_named_with_the_fix() -> None:
    uri = f"http://127.0.0.1:{closed_port()}"
    started = time.perf_counter()
    with pytest.raises(TrackingUnavailable) as err:
        check_server(uri)
    assert time.perf_counter() - started < 6
    assert uri in str(err.value) and "mlflow server" in str(err.value)
    assert "tracking.enabled=false" in str(err.value)


def test_metric_chart_url_plots_every_key_on_one_chart() -> None:
    keys = ["accuracy/federated", "accuracy/alice", "accuracy/bob"]
    url = metric_chart_url("7", "abc123", keys)
    assert url.startswith("#/metric?")
    q = {k: v[0] for k, v in parse_qs(url.split("?", 1)[1]).items()}
    assert json.loads(q["plot_metric_keys"]) == keys
    assert json.loads(q["runs"]) == ["abc123"] and json.loads(q["experiments"]) == ["7"]
    assert q["x_axis"] == "step"


def test_the_fix_for_a_store_that_does_not_answer_fits_the_kind_of_store() -> None:
    from tasks.tracking.store import fix_hint

    sqlite = fix_hint("sqlite:////srv/fed/mlflow.db")
    assert "may be locked by another program (`fuser /srv/fed/mlflow.db`" in sqlite
    assert "mlflow server" not in sqlite  # a file has no server to start
    assert "--port 5077`" in fix_hint("http://127.0.0.1:5077")
    assert "--port 5000`" in fix_hint("https://mlflow.lan/")
