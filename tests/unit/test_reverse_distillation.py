"""Reverse Distillation: the layout built from the teacher, loss and map, the feature cache, errors, seeds, configs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from tests.conftest import CONFIGS, check_bf16_step, check_frozen_feature_cache

from adx.models.components.backbone import BackboneError
from adx.models.components.maps import gaussian_smooth
from adx.models.reverse_distillation import ReverseDistillation, ReverseDistillationModel
from adx.models.reverse_distillation.torch_model import Bottleneck

SMALL = {"oce_blocks": 1, "decoder_blocks": (1, 1, 1)}
RD_CONFIGS = sorted(CONFIGS.glob("reversedistillation/*.yaml"))


def _images(n: int = 4, h: int = 64, w: int | None = None, seed: int = 0) -> torch.Tensor:
    """Smooth random images [n,3,h,w] in [0,1] (a fixed batch to train on)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 8, 8, generator=g)
    return F.interpolate(coarse, size=(h, w or h), mode="bilinear", align_corners=False)


def _model(**kw) -> ReverseDistillationModel:
    return ReverseDistillationModel(**{**SMALL, **kw})


def _adam(model: ReverseDistillationModel) -> torch.optim.Adam:
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.005, betas=(0.5, 0.999))


# ---- layout ------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(64, 64), (72, 88)])
def test_student_restores_maps_of_the_teachers_shapes(size: tuple[int, int]) -> None:
    model = _model().eval()
    images = _images(2, *size)
    feats = model.frozen_features(images)
    assert [f.shape[1] for f in feats] == [24, 40, 112]  # lite0 at strides 4, 8, 16
    embedding = model.bottleneck(feats)
    # the compact embedding: twice the deepest map's channels at twice its stride (paper: 2048 at stride 32)
    assert embedding.shape[1] == 224 and embedding.shape[-2:] == tuple(math.ceil(s / 32) for s in size)
    students = model.student(feats)
    assert [s.shape for s in students] == [f.shape for f in feats]
    with torch.no_grad():
        scores, maps = model(images)
    assert scores.shape == (2,) and maps.shape == (2, *size)


def test_layout_follows_any_teacher() -> None:
    """A ResNet teacher (random weights) with a skipped stride: the MFF and decoder follow its channels."""
    with pytest.warns(UserWarning, match="RANDOM"):
        model = ReverseDistillationModel(
            backbone="resnet18", strides=(4, 16), pretrained=False, decoder_blocks=(2, 1), linear_output=False
        )
    assert model.channels == [64, 256] and model.embedding_channels == 512
    convs = [m for m in model.bottleneck.fuse[0] if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride) for c in convs] == [
        (64, 256, (2, 2)),
        (256, 256, (2, 2)),
    ]
    assert [len(stage) for stage in model.decoder.stages] == [2, 1]  # blocks per stage, in strides order
    assert all(stage[-1].activate for stage in model.decoder.stages)  # the paper's ReLU for a ResNet teacher
    feats = model.frozen_features(_images(1, 64))
    assert [s.shape for s in model.student(feats)] == [f.shape for f in feats]


def test_decoder_stages_end_linearly_for_signed_teacher_maps() -> None:
    model = _model(decoder_blocks=(2, 1, 1))
    assert not any(stage[-1].activate for stage in model.decoder.stages)
    assert model.decoder.stages[0][0].activate  # only the stage's last block is linear
    feats = model.frozen_features(_images(2))
    assert any(float(f.min()) < 0 for f in feats), "lite0's stages end in a linear projection"
    assert any(float(s.min()) < 0 for s in model.student(feats))


def test_embedding_width_narrows_only_the_embedding_blocks() -> None:
    """Half the embedding's channels inside its blocks by default (authors' code), or what is asked."""

    def inner(model: ReverseDistillationModel) -> list[int]:
        return [block.branch[0].out_channels for block in model.bottleneck.embed]

    wide, narrow = _model(oce_blocks=2), _model(oce_blocks=2, embedding_width=56)
    assert inner(wide) == [112, 112] and inner(narrow) == [56, 56]
    assert [m.weight.shape for m in wide.decoder.modules() if isinstance(m, torch.nn.Conv2d)] == [
        m.weight.shape for m in narrow.decoder.modules() if isinstance(m, torch.nn.Conv2d)
    ]
    feats = narrow.frozen_features(_images(1, 64))
    assert narrow.bottleneck(feats).shape == wide.bottleneck(feats).shape


def test_upsampling_block_shapes() -> None:
    up, down = Bottleneck(8, 4, factor=4, up=True), Bottleneck(8, 16, factor=2)
    assert up(torch.rand(1, 8, 3, 5)).shape == (1, 4, 12, 20)
    assert down(torch.rand(1, 8, 6, 10)).shape == (1, 16, 3, 5)


# ---- loss and map ------------------------------------------------------------------------------
def test_loss_forms_match_their_formulas() -> None:
    model = _model().train()
    images = _images(3)
    feats = model.frozen_features(images)
    g = torch.Generator().manual_seed(0)
    students = [
        t + torch.randn(t.shape, generator=g) * t.std() * torch.rand(t.shape[-2:], generator=g) for t in feats
    ]
    model.student = lambda _: students  # the same student maps for both forms
    model.loss_mode = "sample"
    sample = sum(
        (1 - F.cosine_similarity(t.flatten(1), s.flatten(1))).mean()
        for t, s in zip(feats, students, strict=True)
    )
    torch.testing.assert_close(model.loss({"image": images}), sample)
    model.loss_mode = "position"
    position = sum(
        (1 - F.cosine_similarity(t, s, dim=1)).mean() for t, s in zip(feats, students, strict=True)
    )
    torch.testing.assert_close(model.loss({"image": images}), position)
    assert not torch.allclose(sample, position)
    model.student = lambda f: [t.clone() for t in f]  # a perfect student
    assert float(model.loss({"image": images})) == pytest.approx(0.0, abs=1e-5)


def test_map_sums_the_upsampled_distances_and_the_score_is_its_maximum() -> None:
    model = _model(sigma=0.0).eval()
    images = _images(2)
    feats = model.frozen_features(images)
    with torch.no_grad():
        distances = model.distance_maps(feats, model.student(feats))
        scores, maps = model(images)
    up = [
        F.interpolate(d[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
        for d in distances
    ]
    torch.testing.assert_close(maps, up[0] + up[1] + up[2])
    torch.testing.assert_close(scores, maps.flatten(1).amax(1))
    model.map_mode = "multiply"
    torch.testing.assert_close(model.anomaly_map(distances, (64, 64)), up[0] * up[1] * up[2])
    model.map_mode, model.sigma = "add", 4.0
    torch.testing.assert_close(model.anomaly_map(distances, (64, 64)), gaussian_smooth(maps, 4.0))
    assert all(0 <= float(d.min()) and float(d.max()) <= 2 for d in distances)


def test_loss_decreases_on_a_tiny_batch() -> None:
    model = _model().train()
    opt, images = _adam(model), _images(4)
    feats = model.frozen_features(images)
    losses = []
    for _ in range(15):
        loss = model.loss({"image": images, "features": feats})
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0]
    teacher = model.backbone
    assert all(p.grad is None for p in teacher.parameters()), "the teacher stays frozen"


def test_inference_is_deterministic_and_traces() -> None:
    model = _model().eval()
    images = _images(2)
    with torch.no_grad():
        a, b = model(images), model(images)
        traced = torch.jit.trace(model, images, check_trace=False)
        c = traced(images)
    for x, y, z in zip(a, b, c, strict=True):
        assert torch.equal(x, y)
        torch.testing.assert_close(z, x, rtol=1e-4, atol=1e-5)


# ---- errors and seeds --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"oce_blocks": 0}, "oce_blocks"),
        ({"decoder_blocks": 3}, "decoder_blocks"),
        ({"decoder_blocks": (1, 0, 1)}, "decoder_blocks"),
        ({"decoder_blocks": (1, 1)}, "decoder_blocks"),
        ({"embedding_channels": 0}, "embedding_channels"),
        ({"embedding_width": 0}, "embedding_width"),
        ({"loss_mode": "flat"}, "loss_mode"),
        ({"map_mode": "max"}, "map_mode"),
        ({"sigma": -1.0}, "sigma"),
        ({"strides": (8, 4, 16)}, "strides"),
        ({"strides": (4, 12)}, "strides"),
    ],
)
def test_bad_hyperparameters_are_named(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        ReverseDistillationModel(**kwargs)


def test_unknown_teacher_stride_is_named_by_the_backbone() -> None:
    with pytest.raises(BackboneError, match="strides"):
        ReverseDistillationModel(strides=(4, 8, 64))


def test_same_seed_same_weights() -> None:
    torch.manual_seed(5)
    a = _model(seed=1)
    torch.manual_seed(6)  # the global generator does not matter: the seed argument does
    b, c = _model(seed=1), _model(seed=2)
    for (name, pa), (_, pb), (_, _pc) in zip(
        a.decoder.named_parameters(), b.decoder.named_parameters(), c.decoder.named_parameters(), strict=True
    ):
        assert torch.equal(pa, pb), name
    assert not all(
        torch.equal(pa, pc) for pa, pc in zip(a.decoder.parameters(), c.decoder.parameters(), strict=True)
    )


def test_untrained_model_refuses_to_score() -> None:
    with pytest.raises(RuntimeError, match="fit"):
        _model().check_fitted()


# ---- training through Lightning: the feature cache, mixed precision ----------------------------
def _make(cache: str) -> ReverseDistillation:
    return ReverseDistillation(feature_cache=cache, **SMALL)


def test_cached_and_uncached_training_are_the_same(synthetic_root: Path, tmp_path: Path) -> None:
    check_frozen_feature_cache(_make, synthetic_root, tmp_path, exact=False)


def test_bf16_mixed_smoke_step(synthetic_root: Path, tmp_path: Path) -> None:
    check_bf16_step(_make, synthetic_root, tmp_path)


# ---- configs -------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:backbone .* uses RANDOM weights")
@pytest.mark.parametrize(
    "config",
    [
        pytest.param(p, marks=pytest.mark.slow if p.name == "bottle.yaml" else (), id=p.name)
        for p in RD_CONFIGS
    ],
)
def test_configs_instantiate(config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.unit.test_configs import _instantiate

    cli = _instantiate(config, tmp_path, monkeypatch)
    assert type(cli.model) is ReverseDistillation
    for key, value in (yaml.safe_load(config.read_text())["model"].get("init_args") or {}).items():
        assert cli.model.hparams[key] == value, key
    opt = cli.config.model.init_args["optimizer"]
    assert opt.class_path == "torch.optim.Adam"
    assert opt.init_args["lr"] == 0.005 and tuple(opt.init_args["betas"]) == (0.5, 0.999)
