"""The training's pictures are PNG files of the expected sizes, redrawn in the run folder at
every evaluation round from its `evaluations.jsonl`, which is read back bounded and checked."""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

import pytest
from tracking_fakes import GROUPS, fake_result

from tasks import figures


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_figures_are_png_files(tmp_path: Path) -> None:
    history = {1: {"federated": 0.1, "alice": 0.2}, 11: {"federated": 0.9, "alice": 0.4}}
    acc = figures.save_png(figures.accuracy_by_round(history), tmp_path / "a.png")
    conf = figures.save_png(
        figures.confusion_matrix(fake_result([9] * 10).confusion, "round 40"), tmp_path / "c.png"
    )
    shares = figures.save_png(
        figures.group_shares({"federated": [0.4, 0.3, 0.3], "bob": [0, 1, 0]}, GROUPS, "r40"),
        tmp_path / "s.png",
    )
    assert _png_size(acc) == (700, 420)
    assert _png_size(conf) == (560, 500)
    assert _png_size(shares) == (700, 420)


def test_update_figures_records_each_evaluation_and_redraws_in_the_run_folder(
    tmp_path: Path,
) -> None:
    first = {"federated": fake_result([2] * 10), "alice": fake_result([5] * 4 + [0] * 6)}
    written = figures.update_figures(tmp_path, 1, first, GROUPS)
    names = [p.name for p in written]
    assert names == ["accuracy_by_round.png", "confusion_federated.png", "group_shares.png"]
    assert all(p.parent == tmp_path / "figures" for p in written)
    assert _png_size(written[0]) == (700, 420) and _png_size(written[1]) == (560, 500)

    second = {"federated": fake_result([9] * 10), "alice": fake_result([10] * 4 + [1] * 6)}
    figures.update_figures(tmp_path, 2, first, GROUPS)
    figures.update_figures(tmp_path, 2, second, GROUPS)  # recorded again: the last one counts
    evaluations, groups = figures.read_evaluations(tmp_path)
    assert sorted(evaluations) == [1, 2] and groups == GROUPS
    assert evaluations[2]["federated"].correct == 90 and evaluations[1]["alice"].correct == 20
    assert evaluations[2]["federated"].confusion == second["federated"].confusion
    assert len((tmp_path / "evaluations.jsonl").read_text().splitlines()) == 3
    assert not [p for p in (tmp_path / "figures").iterdir() if p.name.startswith(".")]


def test_no_groups_and_no_federated_model_draw_only_the_accuracy(tmp_path: Path) -> None:
    result = dataclasses.replace(fake_result([1] * 10), group_shares=[])
    written = figures.update_figures(tmp_path, 3, {"bob": result}, [])
    assert [p.name for p in written] == ["accuracy_by_round.png"]


def test_a_torn_last_line_is_left_out_and_a_damaged_one_is_named(tmp_path: Path) -> None:
    figures.record_evaluation(tmp_path, 1, {"federated": fake_result([3] * 10)}, GROUPS)
    record = tmp_path / "evaluations.jsonl"
    with record.open("a") as fh:
        fh.write('{"round": 2, "results": {"federated": {"corr')  # a crash while appending
    evaluations, _ = figures.read_evaluations(tmp_path)
    assert sorted(evaluations) == [1]

    good = record.read_text().splitlines()[0]
    bad = json.loads(good)
    bad["round"] = 2
    bad["results"]["federated"]["confusion"] = [[1] * 10] * 9  # 9 rows
    record.write_text("\n".join([good, json.dumps(bad), good]) + "\n")
    with pytest.raises(figures.RunFolderError, match=r"evaluations.jsonl: line 2 .*10x10"):
        figures.read_evaluations(tmp_path)
    bad["results"]["federated"] = {**json.loads(good)["results"]["federated"], "correct": 10**6}
    record.write_text("\n".join([good, json.dumps(bad), good]) + "\n")
    with pytest.raises(figures.RunFolderError, match="line 2 .*correct 1000000 of total 100"):
        figures.read_evaluations(tmp_path)


def test_an_oversized_record_is_refused_before_reading(tmp_path: Path) -> None:
    with (tmp_path / "evaluations.jsonl").open("wb") as fh:
        fh.truncate(figures.MAX_EVALUATIONS_BYTES + 1)
    with pytest.raises(figures.RunFolderError, match="more than the"):
        figures.read_evaluations(tmp_path)
