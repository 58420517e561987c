"""`fedmnist report`: one self-contained HTML page built from a real training's run folder.

A real 3-round `fedmnist run configs/smoke.yaml` with tracking off (real worker processes,
Prefect's temporary server) makes the run folder. When the round loop has not written the
evaluations into it, the test does what the loop does at an evaluation round
(`figures.update_figures` with the run's own global models scored on the MNIST test set). The page
must embed the three figures, list every device and evaluated round, show the config, load
nothing from elsewhere, and escape every value taken from the folder.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import ROOT

from fedcore.checkpoint import load_weights
from fedcore.evaluation import evaluate
from fedcore.mnist import load_shard
from fedcore.model import build_model
from fedcore.shards import ShardSpec
from flows import report_cli
from tasks import figures, report
from tasks.figures import RunFolderError

GROUPS = [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, mnist_dir: Path) -> Path:
    """The run folder of a 3-round smoke training, tracking off, evaluations recorded."""
    home = tmp_path_factory.mktemp("report-home")
    env = dict(os.environ, FEDMNIST_HOME=str(home), PREFECT_HOME=str(home / "prefect"))
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(
        [
            str(ROOT / ".venv" / "bin" / "fedmnist"),
            "run",
            "configs/smoke.yaml",
            "--rounds",
            "3",
            "--set",
            f"data_dir={mnist_dir}",
            "--set",
            "tracking.enabled=false",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (folder,) = (home / "runs").iterdir()
    if not (folder / figures.EVALUATIONS_FILE).is_file():  # what the loop does when evaluating
        images, labels = load_shard(str(mnist_dir), ShardSpec(split="test"))
        for rnd in (1, 2, 3):
            weights, _ = load_weights(folder / f"global-r{rnd:03d}.safetensors")
            result = evaluate(build_model(weights), images, labels, GROUPS)
            figures.update_figures(folder, rnd, {"federated": result}, GROUPS)
    return folder


class _Page(HTMLParser):
    """Tags, image sources and table cells of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.images: list[str] = []
        self.cells: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs).get("src") or "")
        if tag == "td":
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None:
            self.cells.append("".join(self._cell))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def _parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    return page


def test_the_report_of_a_real_run_holds_figures_devices_rounds_and_config(run_dir: Path) -> None:
    out = report.write_report(run_dir)
    assert out == run_dir / "report.html"
    text = out.read_text()
    page = _parse(text)

    assert len(page.images) == 3
    for src in page.images:
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        assert base64.b64decode(src[len(prefix) :])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not {"script", "link", "iframe"} & set(page.tags)
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", text)  # nothing from elsewhere

    evaluations, _ = figures.read_evaluations(run_dir)
    assert sorted(evaluations) == [1, 2, 3]
    for rnd, results in evaluations.items():
        shown = f"{100 * results['federated'].accuracy:.2f}%"
        i = page.cells.index(str(rnd))
        assert page.cells[i + 1] == shown
    final = evaluations[3]["federated"]
    assert f"{100 * final.accuracy:.2f}% ({final.correct}/{final.total}, round 3)" in text

    for worker, shard, used in (
        ("alice", "digits 0-3", "3 of 3"),
        ("bob", "digits 4-6", "3 of 3"),
        ("charlie", "digits 7-9", "3 of 3"),
        ("testing", "test set", "-"),
    ):
        i = page.cells.index(worker)
        assert page.cells[i + 3] == shard and page.cells[i + 7] == used, page.cells[i : i + 15]
    state = json.loads((run_dir / "state.json").read_text())
    samples = int(state["metrics"]["train_samples/alice"])
    assert page.cells[page.cells.index("alice") + 8] == str(samples)
    assert "name: smoke" in text and "3 of 3" in text and "- (tracking off)" in text


def test_every_value_from_the_folder_is_escaped(run_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copied-run"
    shutil.copytree(run_dir, copy)
    state = json.loads((copy / "state.json").read_text())
    state["config"]["name"] = "<script>alert(1)</script>"
    state["config"]["workers"][0]["name"] = 'a"><img src=x onerror=alert(2)>'
    state["config_path"] = "</pre><b>bold</b>"
    (copy / "state.json").write_text(json.dumps(state))
    text = report.build_report(copy)
    page = _parse(text)
    assert "script" not in page.tags and "b" not in page.tags
    assert len(page.images) == 3  # only ours
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert 'a"><img src=x onerror=alert(2)>' in page.cells


def test_a_folder_without_evaluations_says_so(run_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "no-evals"
    shutil.copytree(run_dir, copy)
    (copy / figures.EVALUATIONS_FILE).unlink()
    text = report.build_report(copy)
    assert "No evaluation is recorded in this run folder" in text
    assert "<img" not in text and "alice" in text


def test_damaged_or_oversized_records_are_typed_errors(run_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "damaged"
    shutil.copytree(run_dir, copy)
    lines = (copy / "timeline.jsonl").read_text().splitlines()
    (copy / "timeline.jsonl").write_text("\n".join(["[1, 2]", *lines]) + "\n")
    with pytest.raises(RunFolderError, match=r"timeline.jsonl: line 1 is not a JSON object"):
        report.build_report(copy)
    with (copy / "state.json").open("wb") as fh:
        fh.truncate(report.MAX_STATE_BYTES + 1)
    with pytest.raises(RunFolderError, match="state.json is .* more than the"):
        report.build_report(copy)
    with pytest.raises(RunFolderError, match="holds no state.json"):
        report.build_report(tmp_path)


def test_the_command_finds_a_run_by_path_name_mlflow_id_or_as_the_newest(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "runs"
    older = runs / "20200101-000000-old-1"
    shutil.copytree(run_dir, older)
    state = json.loads((older / "state.json").read_text())
    state["mlflow_run_id"] = "0123456789abcdef"
    (older / "state.json").write_text(json.dumps(state))
    os.utime(older / "state.json", (1, 1))
    newer = runs / run_dir.name
    shutil.copytree(run_dir, newer)

    assert report_cli.find_run(None, runs) == newer
    assert report_cli.find_run(str(older), runs) == older
    assert report_cli.find_run(older.name, runs) == older
    assert report_cli.find_run("0123456789abcdef", runs) == older
    with pytest.raises(LookupError, match=r"no run 'nope'.*latest: 20200101-000000-old-1"):
        report_cli.find_run("nope", runs)

    out = tmp_path / "shared" / "page.html"
    code = report_cli.cmd_report(argparse.Namespace(run=str(newer), out=str(out)))
    assert code == 0 and out.read_text().startswith("<!DOCTYPE html>")
    assert f"wrote {out}" in capsys.readouterr().out
    code = report_cli.cmd_report(argparse.Namespace(run=str(tmp_path / "missing"), out=None))
    assert code == 1 and "error: no run" in capsys.readouterr().err
