"""Every run config under configs/ parses and instantiates through the real ``adx`` parser (no weights, no data)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.conftest import CONFIGS

from adx.cli import AdxCLI
from adx.data.dataset import to_hw
from adx.models import MODELS

# sweep files are another format (adx.sweep); tests/integration/test_sweep.py loads and checks them
SWEEPS = CONFIGS / "sweeps"
RUN_CONFIGS = sorted(p for p in CONFIGS.glob("**/*.yaml") if SWEEPS not in p.parents)
# the papers' configs build large backbones and flows (CFlow's WideResNet-50 one takes about 15 s)
CASES = [
    pytest.param(p, marks=pytest.mark.slow if p.name == "bottle.yaml" else (), id=str(p.relative_to(CONFIGS)))
    for p in RUN_CONFIGS
]


def _class(path: str) -> type:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _instantiate(config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AdxCLI:
    """The objects ``adx fit --config config`` would run, with random backbone weights and no data read."""
    monkeypatch.setattr(sys, "argv", ["adx"])  # LightningCLI warns when pytest's own arguments are there
    monkeypatch.delenv("ADX_DATA_ROOT", raising=False)
    # Synthetic would generate its images here (at setup, never at instantiation)
    monkeypatch.setenv("ADX_CACHE_DIR", str(tmp_path / "cache"))
    args = ["--config", str(config), "--root_dir", str(tmp_path)]
    if _has_backbone(config):  # methods that learn from scratch (DRAEM) have no pretrained weights to skip
        args += ["--model.init_args.pretrained", "false"]
    return AdxCLI(args=args, run=False)


def _has_backbone(config: Path) -> bool:
    return getattr(_class(yaml.safe_load(config.read_text())["model"]["class_path"]), "has_backbone", True)


def test_every_registered_model_ships_demo_and_offline_configs() -> None:
    names = {p.parent.name for p in RUN_CONFIGS}
    for model in map(str.lower, MODELS):
        assert model in names, f"configs/{model}/ is missing"
        for name in ("demo.yaml", "offline.yaml"):
            assert (CONFIGS / model / name).is_file(), f"configs/{model}/{name} is missing"


@pytest.mark.filterwarnings("ignore:backbone .* uses RANDOM weights")
@pytest.mark.parametrize("config", CASES)
def test_config_instantiates(config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw: dict[str, Any] = yaml.safe_load(config.read_text())
    cli = _instantiate(config, tmp_path, monkeypatch)

    model, data = raw["model"], raw["data"]
    assert type(cli.model) is _class(model["class_path"])
    assert type(cli.model).__name__.lower() == config.parent.name, "a config lives in its model's folder"
    for key, value in (model.get("init_args") or {}).items():
        if isinstance(value, dict) and "class_path" in value:  # optimizer / scheduler: checked as parsed
            parsed = cli.config.model.init_args[key]
            assert parsed.class_path == value["class_path"], key
            for arg, arg_value in (value.get("init_args") or {}).items():
                assert parsed.init_args[arg] == arg_value, f"{key}.{arg}"
        else:
            assert cli.model.hparams[key] == value, f"model.{key}"
    if _has_backbone(config):
        assert cli.model.hparams["pretrained"] is False

    dm = cli.datamodule
    assert type(dm) is _class(data["class_path"])
    for key, value in (data.get("init_args") or {}).items():
        if key == "image_size":
            assert dm.image_size == to_hw(value)
        else:
            assert getattr(dm, key) == value, f"data.{key}"
    assert not dm.train_samples and not dm.test_samples, "instantiation must not list files"
    assert not (tmp_path / "cache").exists(), "instantiation must not generate data"

    for key, value in (raw.get("trainer") or {}).items():
        assert getattr(cli.trainer, key) == value, f"trainer.{key}"
