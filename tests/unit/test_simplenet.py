"""SimpleNet: locally aware features, the noise, the truncated L1 loss, the map, training, errors, seeding, configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from tests.conftest import (
    CONFIGS,
    assert_deterministic_and_traceable,
    check_bf16_step,
    check_frozen_feature_cache,
)

from adx.models.components.local_features import ChannelPool, LocalFeatures, neighbourhoods
from adx.models.components.maps import to_image_size
from adx.models.simplenet import SimpleNet, SimpleNetModel

SIMPLENET_CONFIGS = sorted(CONFIGS.glob("simplenet/*.yaml"))
SMALL = {"embed_dim": 64, "hidden_dim": 32}


def _images(n: int = 4, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Smooth random images [n,3,size,size] in [0,1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, size // 8, size // 8, generator=g)
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


# ---- locally aware features ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("n_in", "n_out"), [(360, 1536), (1008, 1536), (3072, 1536), (4608, 1536), (7, 3), (5, 5)]
)
def test_channel_pool_is_adaptive_average_pooling(n_in: int, n_out: int) -> None:
    x = torch.randn(6, n_in)
    expected = F.adaptive_avg_pool1d(x[:, None], n_out)[:, 0]
    torch.testing.assert_close(ChannelPool(n_in, n_out)(x), expected, rtol=1e-5, atol=1e-6)


def test_local_features_are_the_authors_unfold_resize_pool() -> None:
    """Unfold 3x3 per level, resize the unfolded maps to the finest grid, pool each level to D, pool the
    concatenation to D: the authors' order, which LocalFeatures computes pooling first."""
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(2, 5, 8, 8, generator=g), torch.randn(2, 7, 4, 4, generator=g)]
    dim = 24
    unfolded = [F.unfold(f, 3, padding=1).reshape(2, -1, *f.shape[-2:]) for f in feats]
    resized = [F.interpolate(u, size=(8, 8), mode="bilinear", align_corners=False) for u in unfolded]
    rows = [r.permute(0, 2, 3, 1).reshape(-1, 1, r.shape[1]) for r in resized]
    per_level = torch.stack([F.adaptive_avg_pool1d(r, dim)[:, 0] for r in rows], dim=1)  # [N, L, D]
    expected = F.adaptive_avg_pool1d(per_level.reshape(-1, 1, 2 * dim), dim)[:, 0].reshape(2, 8, 8, dim)
    torch.testing.assert_close(LocalFeatures([5, 7], 3, dim)(feats), expected, rtol=1e-5, atol=1e-6)
    x = feats[0]
    torch.testing.assert_close(neighbourhoods(x, 3), unfolded[0].permute(0, 2, 3, 1))


def test_shapes() -> None:
    model = SimpleNetModel(**SMALL).eval()
    x = _images(2, 64)
    feats = model.frozen_features(x)
    assert [tuple(f.shape) for f in feats] == [(2, 40, 8, 8), (2, 112, 4, 4)]
    assert tuple(model.adapted(feats).shape) == (2, 8, 8, 64)
    assert model.adaptor.in_features == model.adaptor.out_features == 64
    assert [type(m).__name__ for m in model.discriminator] == ["Linear", "BatchNorm1d", "LeakyReLU", "Linear"]
    assert model.discriminator[3].out_features == 1 and model.discriminator[3].bias is None
    model.trained_steps += 1
    with torch.no_grad():
        scores, maps = model(_images(3, 96))
    assert scores.shape == (3,) and maps.shape == (3, 96, 96)


def test_papers_defaults() -> None:
    model = SimpleNetModel()
    assert (model.local.dim, model.local.patch_size, model.backbone.strides) == (1536, 3, (8, 16))
    assert model.discriminator[0].out_features == 1024 and model.discriminator[2].negative_slope == 0.2
    assert (model.noise_std, model.margin, model.blur_sigma) == (0.015, 0.5, 4.0)
    assert not any(p.requires_grad for p in model.backbone.parameters())


# ---- the noise, the loss, the map ------------------------------------------------------------------
def test_noise_is_seeded_per_step_and_image_and_has_the_papers_scale() -> None:
    model = SimpleNetModel(**SMALL)
    like = torch.zeros(2, 8, 8, 64)
    step = {"image": torch.zeros(2, 3, 8, 8), "anomaly_step": 3, "anomaly_rank": 0}
    a, b = model.noise(step, like), model.noise(step, like)
    assert torch.equal(a, b) and not torch.equal(a[0], a[1])
    assert not torch.equal(a, model.noise({**step, "anomaly_step": 4}, like)), "fresh noise every step"
    val = {"image": torch.zeros(2, 3, 8, 8), "path": ["a.png", "b.png"]}
    assert torch.equal(model.noise(val, like), model.noise(val, like))
    big = model.noise({"image": torch.zeros(4, 3, 8, 8), "anomaly_step": 0}, torch.zeros(4, 64, 64, 64))
    assert float(big.std()) == pytest.approx(0.015, rel=0.01) and abs(float(big.mean())) < 1e-4


def test_loss_is_the_truncated_l1_of_normal_and_noisy_features() -> None:
    model = SimpleNetModel(**SMALL).eval()  # eval: BatchNorm on running statistics, per row
    x = _images(3)
    batch = {"image": x, "anomaly_step": 0}
    with torch.no_grad():
        q = model.adapted(model.frozen_features(x))
        true, fake = model.normality(q), model.normality(q + model.noise(batch, q))
        expected = (0.5 - true).clamp_min(0).mean() + (0.5 + fake).clamp_min(0).mean()
        loss = model.loss(batch)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert float(model.loss_terms["p_true"]) == pytest.approx(float((true >= 0.5).float().mean()))
    assert float(model.loss_terms["p_fake"]) == pytest.approx(float((fake < -0.5).float().mean()))


def test_map_is_the_blurred_negative_discriminator_and_the_score_the_largest_patch() -> None:
    model = SimpleNetModel(**SMALL).eval()
    model.trained_steps += 1
    x = _images(2, 64)
    with torch.no_grad():
        patch = -model.normality(model.adapted(model.frozen_features(x)))
        scores, maps = model(x)
    torch.testing.assert_close(maps, to_image_size(patch, (64, 64), 4.0))
    torch.testing.assert_close(scores, patch.flatten(1).amax(1))
    assert_deterministic_and_traceable(model, x)


def test_cached_features_give_the_same_loss() -> None:
    model = SimpleNetModel(**SMALL).eval()
    x = _images(4)
    batch = {"image": x, "anomaly_step": 0}
    cached = model.loss({**batch, "features": model.frozen_features(x)})
    assert float(cached) == float(model.loss(batch))


def test_loss_decreases_with_the_papers_optimiser() -> None:
    module = SimpleNet(**SMALL)
    model = module.model.train()
    opt = module.configure_optimizers()
    assert type(opt) is torch.optim.Adam
    adaptor, disc = opt.param_groups
    assert (adaptor["lr"], disc["lr"], disc["weight_decay"]) == (1e-4, 2e-4, 1e-5)
    assert len(adaptor["params"]) == 2 and len(disc["params"]) == 5, "adaptor and discriminator only"
    x = _images(4)
    losses = []
    for step in range(15):
        loss = model.loss({"image": x, "anomaly_step": step})
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.96 * losses[0] and all(b < a for a, b in zip(losses, losses[1:], strict=False)), (
        losses
    )


# ---- errors, seeding -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"strides": ()}, "strides must name at least one"),
        ({"strides": (16, 8)}, "strides must be distinct and ascending"),
        ({"patch_size": 2}, "patch_size must be a positive odd"),
        ({"embed_dim": 0}, "embed_dim must be >= 1"),
        ({"hidden_dim": 0}, "hidden_dim must be >= 1"),
        ({"noise_std": 0.0}, "noise_std must be > 0"),
        ({"margin": -0.5}, "margin must be > 0"),
        ({"blur_sigma": -1.0}, "blur_sigma must be >= 0"),
        ({"adaptor_lr": 0.0}, "adaptor_lr must be > 0"),
    ],
)
def test_bad_hyperparameters_are_named_before_any_work(
    kwargs: dict, match: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_backbone(*args, **kw):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("a backbone was built before the arguments were checked")

    monkeypatch.setattr("adx.models.simplenet.torch_model.Backbone", no_backbone)
    with pytest.raises(ValueError, match=match):
        SimpleNet(**kwargs)


def test_untrained_model_refuses_to_score() -> None:
    with pytest.raises(RuntimeError, match="fit"):
        SimpleNetModel(**SMALL).check_fitted()


def test_initialisation_is_seeded_and_leaves_the_global_generator_alone() -> None:
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    a, b, c = (
        SimpleNetModel(seed=0, **SMALL),
        SimpleNetModel(seed=0, **SMALL),
        SimpleNetModel(seed=1, **SMALL),
    )
    assert torch.equal(torch.rand(3), expected)
    sa, sb, sc = (m.state_dict() for m in (a, b, c))
    heads = [k for k in sa if k.startswith(("adaptor.", "discriminator.")) and k.endswith("weight")]
    assert all(torch.equal(sa[k], sb[k]) for k in heads)
    assert not torch.equal(sa["adaptor.weight"], sc["adaptor.weight"])


# ---- training through Lightning: the feature cache, reproducibility, mixed precision ---------------
def _make(cache: str) -> SimpleNet:
    return SimpleNet(feature_cache=cache, **SMALL)


def test_cached_and_uncached_training_are_the_same(synthetic_root: Path, tmp_path: Path) -> None:
    check_frozen_feature_cache(_make, synthetic_root, tmp_path)


def test_bf16_mixed_smoke_step(synthetic_root: Path, tmp_path: Path) -> None:
    check_bf16_step(_make, synthetic_root, tmp_path)


# ---- configs ---------------------------------------------------------------------------------------
def test_paper_config_holds_the_papers_setting() -> None:
    raw = yaml.safe_load((CONFIGS / "simplenet" / "bottle.yaml").read_text())
    assert raw["model"]["init_args"] == {"backbone": "wide_resnet50_2", "strides": [8, 16]}
    assert raw["data"]["init_args"]["batch_size"] == 8
    assert raw["trainer"]["max_epochs"] == 160
    assert [p.name for p in SIMPLENET_CONFIGS] == ["bottle.yaml", "demo.yaml", "offline.yaml"]
