"""Backbone (CNN): the inference optimisation and input normalisation; weights in test_weights.py, ViTs in
test_extractor.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adx.models.components.backbone import Backbone, BackboneError, fold_batchnorm
from adx.models.components.extractor import IMAGENET_MEAN, IMAGENET_STD

RANDOM = pytest.mark.filterwarnings("ignore:backbone .* RANDOM")


def _randomise_batchnorm(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=gen) * 2 - 1)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=gen) - 0.5)


@RANDOM
@pytest.mark.parametrize(
    ("name", "strides"),
    [("tf_efficientnet_lite0", (8, 16)), ("tf_efficientnet_lite0", (4, 8)), ("resnet18", (8, 16))],
)
def test_optimised_backbone_matches_plain(name: str, strides: tuple[int, ...]) -> None:
    backbone = Backbone(name, strides, pretrained=False, optimize=False)
    _randomise_batchnorm(backbone)
    images = torch.rand(2, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = backbone(images)
        n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
        backbone.optimize()
        fast = backbone(images)
    assert backbone.fused
    assert n_bn > 0 and not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
    assert [f.shape for f in fast] == [f.shape for f in plain]
    for a, b in zip(plain, fast, strict=True):  # equal up to float rounding, relative to the map's scale
        assert (a - b).abs().max() <= 1e-4 * a.abs().max() + 1e-5


@RANDOM
def test_unused_stages_are_dropped() -> None:
    full = Backbone("tf_efficientnet_lite0", (8,), pretrained=False, optimize=False)
    lean = Backbone("tf_efficientnet_lite0", (8,), pretrained=False, optimize=True)
    assert len(lean.model.blocks) < len(full.model.blocks)
    n_params = sum(p.numel() for p in lean.parameters())
    assert n_params < sum(p.numel() for p in full.parameters())


class _NormBeforeConv(nn.Module):
    """BatchNorm registered after the conv but applied before it: folding would change the output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        _randomise_batchnorm(self)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(x))


def test_fold_is_refused_when_outputs_change() -> None:
    assert fold_batchnorm(_NormBeforeConv()) is None
    fresh = _NormBeforeConv()
    fresh.bn.reset_parameters()  # an identity BatchNorm folds "exactly" anywhere: the layout is checked too
    assert fold_batchnorm(fresh) is None
    assert fold_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 1))) is None  # nothing to fold


def test_fold_of_a_plain_pair() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    _randomise_batchnorm(model)
    model.eval()
    fused = fold_batchnorm(model)
    assert fused is not None and isinstance(fused[1], nn.Identity)
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)


@RANDOM
@pytest.mark.parametrize(
    ("normalization", "mean", "std"),
    [
        ("backbone", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # tf_efficientnet_lite0's pretrained config
        ("imagenet", IMAGENET_MEAN, IMAGENET_STD),
        ("none", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
        ("0.1,0.2,0.3/0.5,0.6,0.7", (0.1, 0.2, 0.3), (0.5, 0.6, 0.7)),
    ],
)
def test_normalization_options(normalization: str, mean: tuple, std: tuple) -> None:
    backbone = Backbone("tf_efficientnet_lite0", (8,), pretrained=False, normalization=normalization)
    torch.testing.assert_close(backbone.mean.flatten(), torch.tensor(mean))
    torch.testing.assert_close(backbone.std.flatten(), torch.tensor(std))
    assert {"mean", "std"} <= set(dict(backbone.named_buffers()))  # they travel with the checkpoint


@RANDOM
@pytest.mark.parametrize("bad", ["ImageNet", "0.1,0.2/0.5,0.5,0.5", "0,0,0/1,0,1", "x"])
def test_unknown_normalization_lists_the_options(bad: str) -> None:
    with pytest.raises(BackboneError, match="backbone, imagenet, none"):
        Backbone("tf_efficientnet_lite0", (8,), pretrained=False, normalization=bad)


@RANDOM
@pytest.mark.filterwarnings("ignore:`torch.jit.trace")
def test_backbone_traces() -> None:
    backbone = Backbone("tf_efficientnet_lite0", (8, 16), pretrained=False, normalization="imagenet")
    images = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        traced = torch.jit.trace(backbone, images, check_trace=False, strict=False)
        for a, b in zip(backbone(images), traced(images), strict=True):
            torch.testing.assert_close(a, b)


def test_cnn_only_callers_refuse_a_vit() -> None:
    with pytest.raises(BackboneError, match="not a CNN"):
        Backbone("vit_tiny_patch16_224", (16,), pretrained=False)
