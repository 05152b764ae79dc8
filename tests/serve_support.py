"""One small fitted PatchCore run + its ONNX bundle, shared by the serve API and browser tests.

Built once per pytest session under the session's base temp folder (the second module that asks finds it
there), with ``adx fit`` on small synthetic data (heatmap panels on, for the run gallery) and
:func:`adx.export.export`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import CONFIGS, synthetic_cli


@dataclass
class ServeRun:
    """A finished test run folder, its ONNX bundle and the synthetic test images."""

    run: Path
    bundle: Path
    data: Path

    @property
    def ckpt(self) -> Path:
        return self.run / "checkpoints" / "last.ckpt"

    def images(self) -> list[Path]:
        """The test images (good first, then defective), as files."""
        test = self.data / "test"
        return sorted(test.glob("good/*.png")) + sorted(
            p for p in test.glob("*/*.png") if p.parent.name != "good"
        )


def serve_run(tmp_path_factory: pytest.TempPathFactory) -> ServeRun:
    """The shared run (fitted and exported on first use in this session)."""
    base = tmp_path_factory.getbasetemp() / "adx_serve_run"
    data, runs = base / "data", base / "runs"
    found = sorted(runs.glob("*/*/*/v*/export/onnx/metadata.json"))
    if found:
        bundle = found[0].parent
        return ServeRun(bundle.parent.parent, bundle, data)
    from adx.cli import main
    from adx.deploy_cli import load_model
    from adx.export import export

    main(
        [
            "fit",
            "--config",
            str(CONFIGS / "patchcore" / "demo.yaml"),
            *synthetic_cli(data, size=64, n_train=12, n_good=4, n_bad=6),
            "--data.val_source",
            "test_split",
            "--model.coreset_ratio",
            "0.05",
            "--root_dir",
            str(runs),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    (ckpt,) = runs.glob("*/*/*/v*/checkpoints/last.ckpt")
    run = ckpt.parent.parent
    bundle = export(load_model(ckpt), run / "export" / "onnx", "onnx", ckpt_path=ckpt)
    return ServeRun(run, bundle, data)
