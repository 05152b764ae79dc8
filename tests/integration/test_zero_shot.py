"""The zero-shot module kind: ``adx fit`` with no normal images calibrates, saves, tests and says so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tests.conftest import CONFIGS, quiet_cli, synthetic_cli
from torch import Tensor, nn

from adx.cli import main
from adx.models import ZeroShotModule


class _ColourDistance(nn.Module):
    """A pixel's distance to its image's median colour; the image score is the map's maximum."""

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        median = images.flatten(2).median(dim=2).values[..., None, None]
        maps = (images - median).abs().sum(dim=1)
        return maps.flatten(1).amax(dim=1), maps


class ColourOutlier(ZeroShotModule):
    """A test double of a zero-shot method: it needs no normal image (the synthetic defects are stains)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = _ColourDistance()


MODEL = f"{__name__}.ColourOutlier"


def _fit(tmp_path: Path, *extra: str) -> Path:
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / "patchcore" / "demo.yaml"),
            "--model",
            MODEL,
            *synthetic_cli(tmp_path / "data", size=64),
            "--data.val_source",
            "test_split",
            "--data.val_ratio",
            "0.4",
            *quiet_cli(tmp_path / "runs"),
            *extra,
        ]
    )
    (run,) = (tmp_path / "runs").glob("colouroutlier/synthetic/*/v*")
    return run


def test_zero_shot_fit_calibrates_saves_and_tests(tmp_path: Path) -> None:
    run = _fit(tmp_path, "--data.k_shot", "0")
    report = json.loads((run / "metrics.json").read_text())
    source = report["calibration"]["source"]
    assert "model fitted on no normal images (zero-shot)" in source and "test_split" in source, source
    assert report["calibration"]["n_normal"] + report["calibration"]["n_anomalous"] > 0
    assert 0.0 <= report["metrics"]["image_AUROC"] <= 1.0
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    state = torch.load(ckpt, weights_only=True)
    assert state["adx_model"] == "ColourOutlier"
    assert state["state_dict"]["calibrator.image_threshold"] == pytest.approx(
        report["calibration"]["image_threshold"]
    )
    # the checkpoint alone tests again, with the same thresholds and the same metrics
    main(["test", "--ckpt", str(ckpt), *quiet_cli(tmp_path / "again")])
    (again,) = (tmp_path / "again").rglob("metrics.json")
    assert json.loads(again.read_text())["metrics"] == pytest.approx(report["metrics"])


def test_zero_shot_ignores_training_images(tmp_path: Path) -> None:
    run = _fit(tmp_path)  # no k_shot: the training images exist, and nothing is trained on them
    assert "zero-shot" in json.loads((run / "metrics.json").read_text())["calibration"]["source"]


def test_k_shot_zero_needs_a_zero_shot_model(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="k_shot 0 gives no training images"):
        main(
            [
                "fit",
                "--config",
                str(CONFIGS / "patchcore" / "demo.yaml"),
                *synthetic_cli(tmp_path / "data", size=64),
                "--data.k_shot",
                "0",
                "--data.val_source",
                "test_split",
                *quiet_cli(tmp_path / "runs"),
            ]
        )
