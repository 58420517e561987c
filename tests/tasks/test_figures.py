"""The training's pictures are PNG files of the expected sizes."""

from __future__ import annotations

import struct
from pathlib import Path

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
