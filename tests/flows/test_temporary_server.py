"""`fedmnist run` stops Prefect's temporary server once the run is recorded, without Prefect's
seconds of waiting at exit (flows/temporary_server.py): when the command returns, the server is
gone, and its database holds the flow run, every task run in a final state and the run's last
log line. A real run, a real temporary server, its real SQLite database."""

from __future__ import annotations

import os
import re
import socket
import sqlite3
import subprocess
from pathlib import Path

from conftest import ROOT


def test_the_run_is_recorded_whole_and_the_server_is_gone(mnist_dir: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = dict(os.environ, FEDMNIST_HOME=str(home))
    for name in ("PREFECT_API_URL", "PREFECT_HOME", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    proc = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "fedmnist"), "run", "configs/smoke.yaml"]
        + ["--set", f"data_dir={mnist_dir}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    port = int(re.search(r"Starting temporary server on http://127\.0\.0\.1:(\d+)", out)[1])
    assert re.search(rf"Stopping temporary server on http://127\.0\.0\.1:{port}\n", out)
    with socket.socket() as s:  # nothing listens there any more
        assert s.connect_ex(("127.0.0.1", port)) != 0

    db = sqlite3.connect(home / "prefect-server" / "prefect.db")
    try:
        flows = db.execute("SELECT id, state_type FROM flow_run").fetchall()
        assert [state for _, state in flows] == ["COMPLETED"]
        query = "SELECT name, state_type FROM task_run WHERE flow_run_id = ?"
        tasks = dict(db.execute(query, (flows[0][0],)))
        assert set(tasks.values()) == {"COMPLETED"}, tasks
        assert {"start-alice", "train-alice-r01", "aggregate-r02", "evaluate-r02"} <= set(tasks)
        last = db.execute(
            "SELECT count(*) FROM log WHERE flow_run_id = ? AND task_run_id IS NULL "
            "AND message LIKE 'Finished in state Completed()%'",
            (flows[0][0],),
        ).fetchone()
        assert last == (1,)
    finally:
        db.close()
