"""One source of truth for the deployments: prefect.yaml (what `prefect deploy --all` reads) is
rendered from configs/deployments.yaml (what `fedmnist serve` reads), and the checked-in file is
that rendering, field for field: the same names, parameters, schedules, limits and tags, each on
its site's queue of the work pool. No server needed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from fedcore.errors import ConfigError
from flows.deployments import (
    ENTRYPOINT,
    enter_checkout,
    load_deployments,
    main,
    prefect_yaml,
)

SHIPPED = ROOT / "configs" / "deployments.yaml"


def test_prefect_yaml_is_the_rendering_of_deployments_yaml() -> None:
    assert (ROOT / "prefect.yaml").read_text() == prefect_yaml(load_deployments(SHIPPED))
    assert main(["--deployments", str(SHIPPED), "--check", str(ROOT / "prefect.yaml")]) == 0


def test_each_deployment_carries_the_same_definition() -> None:
    spec = load_deployments(SHIPPED)
    rendered = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    by_name = {d["name"]: d for d in rendered["deployments"]}
    assert list(by_name) == list(spec.deployments) == ["seed", "lab", "jetsons"]
    for name, dep in spec.deployments.items():
        got = by_name[name]
        assert got["entrypoint"] == ENTRYPOINT
        assert got["parameters"] == {"config_path": dep.config_path, **dep.parameters}
        assert got["work_pool"] == {"name": "fedmnist", "work_queue_name": dep.queue}
        assert got["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
        assert dep.schedule is not None
        assert got["schedules"] == [
            {"cron": dep.schedule.cron, "timezone": "UTC", "active": False, "slug": f"{name}-cron"}
        ]
    assert {d["work_pool"]["work_queue_name"] for d in by_name.values()} == {"lab", "fleet"}
    assert rendered["pull"] == [{"flows.deployments.enter_checkout": {}}]


def test_a_stale_prefect_yaml_is_reported(tmp_path: Path, capsys) -> None:
    stale = tmp_path / "prefect.yaml"
    stale.write_text((ROOT / "prefect.yaml").read_text().replace("0 2 * * *", "0 5 * * *"))
    assert main(["--deployments", str(SHIPPED), "--check", str(stale)]) == 1
    assert f"python -m flows.deployments --write {stale}" in capsys.readouterr().out
    main(["--deployments", str(SHIPPED), "--write", str(stale)])
    assert main(["--deployments", str(SHIPPED), "--check", str(stale)]) == 0


def test_a_queue_outside_the_pool_is_named(tmp_path: Path) -> None:
    text = SHIPPED.read_text().replace("queue: fleet", "queue: flete")
    (tmp_path / "deployments.yaml").write_text(text)
    with pytest.raises(ConfigError) as err:
        load_deployments(tmp_path / "deployments.yaml")
    assert "deployment jetsons: queue 'flete' is not one of work_pool.queues ['lab', 'fleet']" in (
        str(err.value)
    )


def test_the_pull_step_enters_the_checkout(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert enter_checkout() == {"directory": str(ROOT)}
    assert Path(os.getcwd()) == ROOT
    assert Path(ENTRYPOINT.split(":")[0]).is_file()
