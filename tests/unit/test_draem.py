"""DRAEM: networks, synthetic batches, losses, schedule, named errors, seeding and the data-source record."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import assert_deterministic_and_traceable, small_datamodule, small_trainer

from adx.callbacks.results import data_sources
from adx.models.components.focal import focal_loss
from adx.models.components.optim import FractionStepLR, build_optimizers, spec
from adx.models.components.sources import SourceError
from adx.models.draem import Draem, DraemModel

SMALL = {"reconstructive_width": 4, "discriminative_width": 4}


def _images(n: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


# ---- networks and inference --------------------------------------------------------------------
def test_shapes_and_ranges_at_any_size() -> None:
    model = DraemModel(**SMALL).eval()
    for h, w in ((64, 64), (48, 80), (33, 45)):
        x = _images(2, 80)[:, :, :h, :w].contiguous()
        with torch.no_grad():
            scores, maps = model(x)
            recon = model.reconstruct(x)
        assert scores.shape == (2,) and maps.shape == (2, h, w) and recon.shape == x.shape
        assert 0.0 <= float(maps.min()) and float(maps.max()) <= 1.0
        assert float(scores.max()) <= float(maps.amax()) + 1e-6  # the mean filter never raises the maximum


def test_score_is_the_max_of_the_mean_filtered_map() -> None:
    model = DraemModel(**SMALL, smoothing=5).eval()
    x = _images(2, 64)
    with torch.no_grad():
        scores, maps = model(x)
    padded = F.pad(maps[:, None], (2, 2, 2, 2))  # zero padding, counted in the mean
    brute = padded.unfold(2, 5, 1).unfold(3, 5, 1).mean(dim=(-1, -2)).flatten(1).amax(1)
    torch.testing.assert_close(scores, brute)
    with torch.no_grad():
        raw_max = DraemModel(**SMALL, smoothing=1).eval()(x)
    torch.testing.assert_close(raw_max[0], raw_max[1].flatten(1).amax(1))


def test_forward_traces_and_is_deterministic() -> None:
    model = DraemModel(**SMALL).eval()
    x = _images(2, 64)
    assert_deterministic_and_traceable(model, x)


def test_same_seed_same_weights() -> None:
    a, b, c = DraemModel(**SMALL, seed=1), DraemModel(**SMALL, seed=1), DraemModel(**SMALL, seed=2)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters(), strict=True))


def test_unfitted_model_says_so() -> None:
    with pytest.raises(RuntimeError, match="fit"):
        DraemModel(**SMALL).check_fitted()


# ---- synthetic anomalies -----------------------------------------------------------------------
def test_synthetic_masks_match_the_corruption() -> None:
    model = DraemModel(**SMALL, p_anomaly=1.0)
    images = _images(6, 64)
    corrupted, masks = model.synthesize(images, list(range(6)))
    assert corrupted.shape == images.shape and masks.shape == (6, 1, 64, 64)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    outside = (masks == 0).expand_as(images)
    assert torch.equal(corrupted[outside], images[outside]), "pixels outside the mask are untouched"
    changed = (corrupted - images).abs().amax(dim=1, keepdim=True) > 1e-6
    assert not (changed & (masks == 0)).any()
    for i in range(6):
        assert masks[i].sum() > 0, "p_anomaly = 1: every image gets an anomaly"
        assert changed[i].sum() > 0.5 * masks[i].sum(), "the masked pixels really change"

    clean, empty = DraemModel(**SMALL, p_anomaly=0.0).synthesize(images, list(range(6)))
    assert torch.equal(clean, images) and not empty.any()


def test_grey_textures_keep_grey_images_grey() -> None:
    grey = _images(3, 64)[:, :1].expand(-1, 3, -1, -1).contiguous()
    corrupted, masks = DraemModel(**SMALL, p_anomaly=1.0, grey_textures=True).synthesize(grey, [0, 1, 2])
    assert masks.sum() > 0
    assert torch.equal(corrupted[:, 0], corrupted[:, 1]) and torch.equal(corrupted[:, 1], corrupted[:, 2])


def test_seeded_anomalies_reproduce() -> None:
    model = DraemModel(**SMALL, p_anomaly=1.0)
    images = _images(4, 64)
    batch = {"image": images, "anomaly_step": 7, "anomaly_rank": 0}
    seeds = model.anomaly_seeds(batch)
    assert seeds == DraemModel(**SMALL, p_anomaly=1.0).anomaly_seeds(batch), "stable across instances"
    assert len(set(seeds)) == 4
    first, again = model.synthesize(images, seeds), model.synthesize(images, seeds)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    other = model.anomaly_seeds({**batch, "anomaly_step": 8})
    assert not set(other) & set(seeds), "each step draws new anomalies"
    assert model.anomaly_seeds({**batch, "anomaly_rank": 1}) != seeds
    assert DraemModel(**SMALL, seed=3).anomaly_seeds(batch) != seeds

    # without a step (validation loss): one seed per image path, whatever the batch order
    paths = ["a.png", "b.png", "c.png", "d.png"]
    forward = model.anomaly_seeds({"image": images, "path": paths})
    backward = model.anomaly_seeds({"image": images, "path": paths[::-1]})
    assert forward == backward[::-1]


def test_relighting_scales_each_image_and_leaves_the_anomalies_alone() -> None:
    images = _images(6, 32) * 0.5  # no clipping at 1.5x
    batch = {"image": images, "anomaly_step": 3, "anomaly_rank": 0}
    plain = DraemModel(**SMALL, p_anomaly=1.0)
    assert plain.relight(batch) is images, "brightness 0 passes the images through"
    lit = DraemModel(**SMALL, p_anomaly=1.0, brightness=0.2)
    relit = lit.relight(batch)
    factors = (relit / images).flatten(1)
    torch.testing.assert_close(factors.amin(1), factors.amax(1))  # one factor per image
    f = factors[:, 0]
    assert float(f.min()) >= 0.8 - 1e-6 and float(f.max()) <= 1.2 + 1e-6
    assert len(set(f.tolist())) == 6 and torch.equal(lit.relight(batch), relit), "per image, seeded"
    assert not torch.equal(lit.relight({**batch, "anomaly_step": 4}), relit), "a new draw each step"
    # the same anomaly masks as without relighting: the factors come from generators of their own
    seeds = plain.anomaly_seeds(batch)
    assert seeds == lit.anomaly_seeds(batch)
    assert torch.equal(plain.synthesize(images, seeds)[1], lit.synthesize(relit, seeds)[1])

    # the relit image is the reconstruction target: a network returning it has zero L2
    class Oracle(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return relit

    lit.reconstructive = Oracle()
    lit.loss(batch)
    assert float(lit.loss_terms["l2"]) == 0.0


def test_loss_terms_and_validation_loss_repeat() -> None:
    model = DraemModel(**SMALL).eval()
    batch = {"image": _images(4, 32), "path": ["a", "b", "c", "d"]}
    with torch.no_grad():
        first, again = model.loss(batch), model.loss(batch)
    assert torch.equal(first, again), "validation anomalies are fixed per image"
    assert set(model.loss_terms) == {"l2", "ssim", "focal"}
    total = model.loss_terms["l2"] + model.loss_terms["ssim"] + model.loss_terms["focal"]
    torch.testing.assert_close(first, total)


def test_loss_decreases_on_a_tiny_batch() -> None:
    torch.manual_seed(0)
    model = DraemModel(reconstructive_width=8, discriminative_width=4, p_anomaly=1.0).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = {"image": _images(4, 32), "anomaly_step": 0}  # the same anomalies every step
    losses = []
    for _ in range(12):
        loss = model.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert min(losses[-3:]) < 0.8 * losses[0], losses


def test_focal_alpha_weighs_the_two_classes() -> None:
    """[1, 1] is the default loss; [0, 1] (anomalib 2.7's weighting under kornia 0.9) leaves normal pixels out."""
    batch = {"image": _images(2, 32), "path": ["a", "b"]}
    plain = DraemModel(**SMALL, p_anomaly=1.0).eval()
    ones = DraemModel(**SMALL, p_anomaly=1.0, focal_alpha=(1.0, 1.0)).eval()
    only_anomalous = DraemModel(**SMALL, p_anomaly=1.0, focal_alpha=(0.0, 1.0)).eval()
    with torch.no_grad():
        plain.loss(batch), ones.loss(batch), only_anomalous.loss(batch)
        corrupted, masks = plain.synthesize(batch["image"], plain.anomaly_seeds(batch))
        logits = plain.discriminative(torch.cat([corrupted, plain.reconstructive(corrupted)], dim=1))
    assert masks.any() and not masks.all()
    torch.testing.assert_close(ones.loss_terms["focal"], plain.loss_terms["focal"])
    target = masks[:, 0].long()
    log_pt = torch.log_softmax(logits, dim=1).gather(1, target[:, None])[:, 0]
    expected = -((1 - log_pt.exp()) ** 2 * log_pt * target).mean()
    torch.testing.assert_close(only_anomalous.loss_terms["focal"], expected)
    assert float(only_anomalous.loss_terms["focal"]) < float(plain.loss_terms["focal"])


# ---- losses ------------------------------------------------------------------------------------
def test_focal_loss_matches_a_brute_force_reference() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64) * 3
    target = torch.randint(0, 3, (2, 4, 5), generator=g)
    for gamma, alpha in ((2.0, None), (0.5, None), (2.0, [0.25, 0.5, 1.0])):
        total, count = 0.0, 0
        for b in range(2):
            for y in range(4):
                for x in range(5):
                    z = [float(logits[b, k, y, x]) for k in range(3)]
                    t = int(target[b, y, x])
                    p = math.exp(z[t]) / sum(math.exp(v) for v in z)
                    w = 1.0 if alpha is None else alpha[t]
                    total += -w * (1.0 - p) ** gamma * math.log(p)
                    count += 1
        got = focal_loss(logits, target, gamma, alpha)
        assert abs(float(got) - total / count) < 1e-6, (gamma, alpha)
    # gamma 0 is cross-entropy; a [B,1,H,W] target is accepted
    torch.testing.assert_close(
        focal_loss(logits.float(), target[:, None], 0.0), F.cross_entropy(logits.float(), target)
    )
    with pytest.raises(ValueError, match="gamma"):
        focal_loss(logits, target, -1.0)
    with pytest.raises(ValueError, match="does not match"):
        focal_loss(logits, target[:, :2], 2.0)


# ---- schedule ----------------------------------------------------------------------------------
def test_fraction_step_schedule() -> None:
    params = [torch.nn.Parameter(torch.zeros(1))]
    out = build_optimizers(params, spec("torch.optim.Adam", lr=1e-4), Draem(**SMALL).scheduler_spec)
    sched = out["lr_scheduler"]["scheduler"]
    assert isinstance(sched, FractionStepLR) and sched.follows_trainer
    sched.set_horizon(700)
    assert sched.milestone_epochs() == [560, 630]
    assert [sched.factor(e) for e in (0, 559, 560, 629, 630, 699)] == pytest.approx(
        [1, 1, 0.2, 0.2, 0.04, 0.04]
    )
    sched.set_horizon(10)
    lrs = []
    for _ in range(10):
        lrs.append(out["optimizer"].param_groups[0]["lr"])
        out["optimizer"].step()
        sched.step()
    assert lrs == pytest.approx([1e-4] * 8 + [2e-5, 4e-6])
    with pytest.raises(ValueError, match="milestones"):
        FractionStepLR(torch.optim.SGD(params, lr=0.1), milestones=[0.5, 1.5])
    with pytest.raises(ValueError, match="gamma"):
        FractionStepLR(torch.optim.SGD(params, lr=0.1), gamma=0.0)
    with pytest.raises(ValueError, match="max_epochs"):
        FractionStepLR(torch.optim.SGD(params, lr=0.1), max_epochs=0)


# ---- named errors before work ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"reconstructive_width": 0}, "reconstructive_width"),
        ({"discriminative_width": 2.5}, "discriminative_width"),
        ({"p_anomaly": 1.5}, "p_anomaly"),
        ({"opacity": (0.9, 0.1)}, "opacity"),
        ({"ssim_weight": -1.0}, "ssim_weight"),
        ({"focal_gamma": -2.0}, "focal_gamma"),
        ({"smoothing": 4}, "smoothing"),
        ({"smoothing": 0}, "smoothing"),
        ({"brightness": 1.0}, "brightness"),
        ({"brightness": -0.1}, "brightness"),
        ({"focal_alpha": (0.0, 0.0)}, "focal_alpha"),
        ({"focal_alpha": (-1.0, 1.0)}, "focal_alpha"),
        ({"focal_alpha": (1.0, 1.0, 1.0)}, "focal_alpha"),
    ],
)
def test_bad_hyperparameters_are_named(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        Draem(**kwargs)


def _fake_trainer(image_size: tuple[int, int]) -> SimpleNamespace:
    dm = SimpleNamespace(image_size=image_size, tiling=None, train_on_tiles=False)
    return SimpleNamespace(datamodule=dm, max_epochs=1, lr_scheduler_configs=[])


def test_fit_start_checks_size_and_source_before_training(tmp_path: Path) -> None:
    model = Draem(**SMALL)
    model.trainer = _fake_trainer((16, 16))
    with pytest.raises(ValueError, match="image_size"):
        model.on_fit_start()
    missing = tmp_path / "no_dtd_here"
    model = Draem(**SMALL, anomaly_source=str(missing))  # building the model does not need the folder
    model.trainer = _fake_trainer((64, 64))
    with pytest.raises(SourceError, match="no_dtd_here"):
        model.on_fit_start()


# ---- provenance of the anomaly source ----------------------------------------------------------
def test_data_sources_hook() -> None:
    assert data_sources(SimpleNamespace(model=torch.nn.Linear(1, 1))) is None
    model = Draem(**SMALL)
    assert data_sources(model) == {}
    model.model.anomalies()
    record = data_sources(model)
    assert record["anomalies"]["method"] == "perlin"
    assert record["anomalies"]["textures"]["kind"] in ("package", "procedural")
    json.dumps(record)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fit_records_sources_in_metrics_and_checkpoint(synthetic_root: Path, tmp_path: Path) -> None:
    model = Draem(**SMALL, optimizer=spec("torch.optim.Adam", lr=1e-3))
    dm = small_datamodule(synthetic_root)
    trainer = small_trainer(tmp_path)
    trainer.fit(model, datamodule=dm)
    assert int(model.model.trained_steps) == 3  # 12 images, batch 4
    trainer.test(model, datamodule=dm, verbose=False)
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["sources"] == model.model.data_sources()
    assert report["sources"]["anomalies"]["p_anomaly"] == 0.5
    assert {"train/l2", "train/ssim", "train/focal"} <= set(report["fit"])

    path = tmp_path / "draem.ckpt"
    trainer.save_checkpoint(path)
    restored = Draem.load_from_checkpoint(path)
    assert restored.model._anomalies is None, "restoring does not rebuild the source"
    assert restored.model.data_sources() == report["sources"]


def test_precise_bn_recomputes_the_statistics_from_one_pass() -> None:
    model = DraemModel(**SMALL, precise_bn=True)
    images = _images(4, 32)
    batches = [{"image": images[:2], "path": ["a", "b"]}, {"image": images[2:], "path": ["c", "d"]}]
    model.eval()
    model.fit_reference(batches)
    bn = model.reconstructive.encoder.blocks[0][1]
    assert not bn.training and bn.momentum == 0.1, "modes and momentum are restored"
    assert int(bn.num_batches_tracked) == 2
    # the first BatchNorm sees conv(corrupted images): its mean is the average of the two batch means
    corrupted, _ = model.synthesize(images, model.anomaly_seeds({"image": images, "path": list("abcd")}))
    with torch.no_grad():
        feats = model.reconstructive.encoder.blocks[0][0](corrupted)
    expected = (feats[:2].mean(dim=(0, 2, 3)) + feats[2:].mean(dim=(0, 2, 3))) / 2
    torch.testing.assert_close(bn.running_mean, expected, rtol=1e-4, atol=1e-5)
    untouched = DraemModel(**SMALL)  # off (the paper): the running averages stay
    before = untouched.reconstructive.encoder.blocks[0][1].running_mean.clone()
    untouched.fit_reference(batches)
    assert torch.equal(untouched.reconstructive.encoder.blocks[0][1].running_mean, before)


def test_evaluation_anomalies_do_not_depend_on_where_the_dataset_lies() -> None:
    model = DraemModel(**SMALL)
    images = _images(3, 32)
    here = ["/tmp/pytest-7/contract0/demo/test/good/000.png", "/a/test/bad/001.png", "/a/train/good/000.png"]
    moved = [p.replace("/tmp/pytest-7/contract0/demo", "/data/copy").replace("/a/", "/b/") for p in here]
    seeds = model.anomaly_seeds({"image": images, "path": here})
    assert seeds == model.anomaly_seeds({"image": images, "path": moved})
    assert len(set(seeds)) == 3  # different images in the dataset, different anomalies
    first, again = model.synthesize(images, seeds), model.synthesize(images, seeds)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    step = model.anomaly_seeds({"image": images, "path": here, "anomaly_step": 5})
    assert not set(step) & set(seeds)  # training steps draw their own
