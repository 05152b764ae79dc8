"""Backbone: offline weights resolution is covered by the contract tests; here the inference optimisation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adx.models.components.backbone import Backbone, fold_batchnorm


def _randomise_batchnorm(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=gen) * 2 - 1)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=gen) - 0.5)


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
    assert fold_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 1))) is None  # nothing to fold


def test_fold_of_a_plain_pair() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    _randomise_batchnorm(model)
    model.eval()
    fused = fold_batchnorm(model)
    assert fused is not None and isinstance(fused[1], nn.Identity)
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)
