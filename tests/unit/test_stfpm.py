"""STFPM: the two networks, the paper's loss and map, training, the feature cache, errors, seeding, configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from tests.conftest import CONFIGS, check_bf16_step, check_frozen_feature_cache

from adx.models.components.optim import build_optimizers
from adx.models.stfpm import STFPM, STFPMModel

STFPM_CONFIGS = sorted(CONFIGS.glob("stfpm/*.yaml"))


def _images(n: int = 4, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Smooth random images [n,3,size,size] in [0,1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, size // 8, size // 8, generator=g)
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def _cosine_distance_maps(model: STFPMModel, images: torch.Tensor) -> list[torch.Tensor]:
    """The paper's per-position loss written another way: for unit vectors, 1/2 |a - b|^2 = 1 - cos(a, b)."""
    with torch.no_grad():
        teacher, student = model.teacher(images), model.student(images)
    return [
        1.0 - F.cosine_similarity(t.float(), s.float(), dim=1) for t, s in zip(teacher, student, strict=True)
    ]


# ---- the networks ----------------------------------------------------------------------------------
def test_frozen_teacher_and_trainable_student_of_one_architecture() -> None:
    model = STFPMModel()
    assert model.backbone is model.teacher  # what the feature cache and the run records read
    assert model.teacher.channels == model.student.channels == [24, 40, 112]
    assert model.teacher.strides == model.student.strides == (4, 8, 16)
    assert not any(p.requires_grad for p in model.teacher.parameters())
    assert all(p.requires_grad for p in model.student.parameters())
    assert model.teacher.weights_source.endswith(".pth") and model.student.weights_source == "random"
    model.train()
    assert model.student.training and not model.teacher.model.training, "the teacher stays in eval mode"
    keys = model.state_dict().keys()
    assert any(k.startswith("teacher.") for k in keys) and any(k.startswith("student.") for k in keys)


def test_shapes_and_normalised_features() -> None:
    model = STFPMModel().eval()
    x = _images(2, 64)
    feats = model.frozen_features(x)
    assert [tuple(f.shape) for f in feats] == [(2, 24, 16, 16), (2, 40, 8, 8), (2, 112, 4, 4)]
    for f in [*feats, *model.student_features(x)]:
        torch.testing.assert_close(f.norm(dim=1), torch.ones_like(f[:, 0]))
    model.trained_steps += 1
    with torch.no_grad():
        scores, maps = model(_images(3, 96))
    assert scores.shape == (3,) and maps.shape == (3, 96, 96)


# ---- the paper's loss and map ----------------------------------------------------------------------
def test_loss_is_the_sum_over_scales_of_the_mean_half_squared_distance() -> None:
    model = STFPMModel().eval()
    x = _images(3)
    expected = sum(d.mean() for d in _cosine_distance_maps(model, x))
    with torch.no_grad():
        loss = model.loss({"image": x})
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert 0.0 <= float(loss) <= 2.0 * 3  # 1/2 |a - b|^2 <= 2 for unit vectors, three scales


@pytest.mark.parametrize("combine", ["product", "sum"])
def test_map_combines_the_upsampled_distances_and_the_score_is_its_maximum(combine: str) -> None:
    model = STFPMModel(combine=combine).eval()
    model.trained_steps += 1
    x = _images(2, 64)
    up = [
        F.interpolate(d[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
        for d in _cosine_distance_maps(model, x)
    ]
    expected = up[0] * up[1] * up[2] if combine == "product" else up[0] + up[1] + up[2]
    with torch.no_grad():
        scores, maps = model(x)
    torch.testing.assert_close(maps, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(scores, expected.flatten(1).amax(1), rtol=1e-4, atol=1e-6)


def test_cached_features_give_the_same_loss() -> None:
    model = STFPMModel().train()
    x = _images(4)
    cached = model.loss({"image": x, "features": model.frozen_features(x)})
    assert float(cached) == float(model.loss({"image": x}))


def test_loss_decreases_with_the_papers_optimiser() -> None:
    module = STFPM()
    model = module.model.train()
    opt = build_optimizers(model.parameters(), module.optimizer_spec, None)
    assert type(opt) is torch.optim.SGD and len(opt.param_groups[0]["params"]) == len(
        list(model.student.parameters())
    ), "only the student is optimised"
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.4, 0.9, 1e-4)
    teacher_before = {
        k: v.clone() for k, v in model.teacher.state_dict().items() if isinstance(v, torch.Tensor)
    }
    x = _images(4)
    losses = []
    for _ in range(8):
        loss = model.loss({"image": x})
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0], losses
    for key, value in teacher_before.items():
        assert torch.equal(model.teacher.state_dict()[key], value), f"the teacher changed: {key}"


# ---- errors, seeding -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"combine": "mean"}, "combine must be 'product'"),
        ({"strides": ()}, "strides must name at least one"),
        ({"strides": (8, 8)}, "strides must be distinct"),
    ],
)
def test_bad_hyperparameters_are_named_before_any_work(
    kwargs: dict, match: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_backbone(*args, **kw):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("a backbone was built before the arguments were checked")

    monkeypatch.setattr("adx.models.stfpm.torch_model.Backbone", no_backbone)
    with pytest.raises(ValueError, match=match):
        STFPM(**kwargs)


def test_untrained_student_refuses_to_score() -> None:
    with pytest.raises(RuntimeError, match="fit"):
        STFPMModel().check_fitted()


def test_student_initialisation_is_seeded_and_leaves_the_global_generator_alone() -> None:
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    a, b, c = STFPMModel(seed=0), STFPMModel(seed=0), STFPMModel(seed=1)
    assert torch.equal(torch.rand(3), expected)
    sa, sb, sc = (m.student.state_dict() for m in (a, b, c))
    weights = [
        k for k, v in sa.items() if isinstance(v, torch.Tensor) and v.is_floating_point() and v.ndim == 4
    ]
    assert all(torch.equal(sa[k], sb[k]) for k in weights)
    assert not all(torch.equal(sa[k], sc[k]) for k in weights)


# ---- training through Lightning: the feature cache, mixed precision --------------------------------
def _make(cache: str) -> STFPM:
    return STFPM(feature_cache=cache)


def test_cached_and_uncached_training_are_the_same(synthetic_root: Path, tmp_path: Path) -> None:
    check_frozen_feature_cache(_make, synthetic_root, tmp_path)


def test_bf16_mixed_smoke_step(synthetic_root: Path, tmp_path: Path) -> None:
    check_bf16_step(_make, synthetic_root, tmp_path)


# ---- configs ---------------------------------------------------------------------------------------
def test_paper_config_holds_the_papers_setting() -> None:
    raw = yaml.safe_load((CONFIGS / "stfpm" / "bottle.yaml").read_text())
    assert raw["model"]["init_args"] == {"backbone": "resnet18", "strides": [4, 8, 16]}
    assert raw["data"]["init_args"]["image_size"] == 256 and raw["data"]["init_args"]["batch_size"] == 32
    assert raw["trainer"]["max_epochs"] == 100
    assert [p.name for p in STFPM_CONFIGS] == ["bottle.yaml", "demo.yaml", "offline.yaml"]
