"""``adx predict`` writes each batch's rows as it comes and keeps no outputs in memory."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import torch

from adx.callbacks import ResultsWriter


def test_prediction_rows_are_on_disk_after_each_batch(tmp_path: Path) -> None:
    writer = ResultsWriter()
    trainer = SimpleNamespace(default_root_dir=str(tmp_path))
    writer.on_predict_epoch_start(trainer, None)
    for start in range(0, 6, 2):
        batch = {
            "path": [f"img{i}.png" for i in range(start, start + 2)],
            "defect_type": ["unknown"] * 2,
            "label": torch.tensor([-1, -1]),
            "image_score": torch.tensor([0.1 * start, 0.2]),
            "pred_score": torch.tensor([0.3, 0.9]),
            "pred_label": torch.tensor([False, True]),
            "anomaly_map": torch.rand(2, 8, 8),  # not a row value: never kept
        }
        writer.on_outputs(trainer, None, "predict", batch)
        rows = list(csv.DictReader(open(tmp_path / "predictions.csv")))
        assert len(rows) == start + 2, "rows reach the file batch by batch"
    assert len(writer.collector) == 0, "nothing is accumulated in memory"
    writer.on_predict_epoch_end(trainer, None)
    rows = list(csv.DictReader(open(tmp_path / "predictions.csv")))
    assert [r["path"] for r in rows] == [f"img{i}.png" for i in range(6)]
    assert rows[1]["pred_label"] == "True"
