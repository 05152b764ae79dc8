"""EfficientAD: PDN / autoencoder geometry, losses, map normalisation, the teacher file / cache, errors, seeding."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tests.conftest import assert_deterministic_and_traceable, small_datamodule, small_trainer

from adx.models.components.optim import spec
from adx.models.efficient_ad import EfficientAd, EfficientAdModel
from adx.models.efficient_ad.networks import AutoEncoder, pdn, pdn_output_size
from adx.models.efficient_ad.teacher import TeacherWeightsError
from adx.models.efficient_ad.torch_model import colour_jitter, hard_mean, quantile

SMALL = {"pretrained": False, "teacher_steps": 2, "teacher_batch_size": 2, "teacher_crop_size": 64}


def _images(n: int = 2, size: int | tuple[int, int] = 64, seed: int = 0) -> torch.Tensor:
    h, w = (size, size) if isinstance(size, int) else size
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private cache folder (distilled teachers are cached there)."""
    monkeypatch.setenv("ADX_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "efficientad"


def _ready(**kw) -> EfficientAdModel:
    """A small model with a random (not distilled) teacher, its statistics measured on two images."""
    model = EfficientAdModel(**{**SMALL, **kw})
    model.teacher_ready.fill_(1)
    model.fit_teacher_stats([_images(2, 64, seed=1)])
    return model


# ---- geometry ----------------------------------------------------------------------------------
@pytest.mark.parametrize("size", ["small", "medium"])
@pytest.mark.parametrize("padding", [True, False])
def test_pdn_output_size_formula(size: str, padding: bool) -> None:
    net = pdn(size, 8, padding)
    with torch.no_grad():
        for h, w in ((64, 64), (72, 96)):
            assert tuple(net(torch.zeros(1, 3, h, w)).shape[-2:]) == pdn_output_size(h, w, padding)
    # the paper's table gives 64 x 64 for 256 px; without padding 56 x 56
    assert pdn_output_size(256, 256, padding) == ((64, 64) if padding else (56, 56))


def test_pdn_layouts_match_the_paper() -> None:
    small, medium = pdn("small", 384), pdn("medium", 384)
    convs = [m for m in small if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size[0], c.padding[0]) for c in convs] == [
        (128, 4, 3),
        (256, 4, 3),
        (256, 3, 1),
        (384, 4, 0),
    ]
    assert [c.out_channels for c in medium if isinstance(c, torch.nn.Conv2d)] == [
        256,
        512,
        512,
        512,
        384,
        384,
    ]
    assert list(small.state_dict())[:4] == ["0.weight", "0.bias", "3.weight", "3.bias"]


@pytest.mark.parametrize("size", [64, (64, 96), 256])
def test_autoencoder_reaches_the_pdn_grid_through_a_1x1_code(size) -> None:
    ae = AutoEncoder(16)
    x = _images(1, size)
    grid = pdn_output_size(*x.shape[-2:], padding=True)
    codes = []
    ae.to_code.register_forward_hook(lambda m, i, o: codes.append(o.shape))
    with torch.no_grad():
        out = ae(x, grid)
    assert out.shape == (1, 16, *grid) and codes[0][-2:] == (1, 1) and codes[0][1] == 64


@pytest.mark.parametrize("padding", [True, False])
def test_forward_shapes_and_map_is_mean_of_normalised_maps(padding: bool) -> None:
    model = _ready(padding=padding).eval()
    model.quantiles_st.copy_(torch.tensor([0.5, 2.5]))
    model.quantiles_ae.copy_(torch.tensor([0.0, 0.1]))
    x = _images(2, (64, 80))
    with torch.no_grad():
        score, amap = model(x)
        st, ae = model.raw_maps(x)
    assert score.shape == (2,) and amap.shape == (2, 64, 80) and st.shape == (2, 1, 64, 80)
    expected = 0.5 * (0.1 * (st - 0.5) / 2.0 + 0.1 * ae / 0.1)[:, 0]
    torch.testing.assert_close(amap, expected)
    torch.testing.assert_close(score, amap.flatten(1).amax(1))


# ---- losses ------------------------------------------------------------------------------------
def test_hard_mean_keeps_the_elements_above_the_quantile() -> None:
    d = torch.rand(3, 5, 7, 11, generator=torch.Generator().manual_seed(0))
    q = 0.99
    expected = d[d >= torch.quantile(d.flatten(), q)].mean()
    torch.testing.assert_close(hard_mean(d, q), expected)
    assert float(hard_mean(d, 0.0)) == pytest.approx(float(d.mean()), rel=1e-6)


def test_quantile_matches_torch() -> None:
    v = torch.randn(10_001, generator=torch.Generator().manual_seed(0))
    for q in (0.0, 0.9, 0.995, 1.0):
        torch.testing.assert_close(quantile(v, q), torch.quantile(v, q))


def test_loss_terms_and_decrease_on_a_tiny_batch() -> None:
    torch.manual_seed(0)
    model = _ready(hard_quantile=0.5)  # the 0.999 quantile's few elements move from step to step
    batch = {"image": _images(2, 64), "anomaly_step": 0, "anomaly_rank": 0}
    params = [p for p in model.parameters() if p.requires_grad]
    assert not any(p.requires_grad for p in model.teacher.parameters())
    opt = torch.optim.Adam(params, lr=3e-4)
    teacher = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    losses = []
    for _ in range(6):
        loss = model.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert set(model.loss_terms) == {"hard", "penalty", "autoencoder", "student_autoencoder"}
    assert losses[-1] < 0.95 * losses[0], losses  # 2.96 -> 2.78 when written
    assert all(torch.equal(v, model.teacher.state_dict()[k]) for k, v in teacher.items()), "teacher is frozen"
    model.train()
    assert not model.teacher.training


@pytest.mark.parametrize("size", ["small", "medium"])
def test_loss_computes_only_the_student_channels_it_reads(size: str) -> None:
    """The loss runs the student's last layer for one half of its channels per part (the image and the penalty
    image: the teacher's half; the autoencoder's image: the other): the same loss and gradients as slicing the
    full student output, as the paper's losses are written."""
    from adx.models.components.seeding import batch_seeds, mix
    from adx.models.efficient_ad.torch_model import CHANNELS

    model = _ready(model_size=size)
    model.autoencoder.eval()  # no dropout: both computations see the same autoencoder output
    batch = {"image": _images(2, 64, seed=4), "anomaly_step": 3, "anomaly_rank": 0}
    model.loss(batch).backward()
    split = [p.grad.clone() for p in model.student.parameters()]
    model.zero_grad()
    images, n = batch["image"], 2
    seeds = batch_seeds(batch, ("efficientad", model.seed), ("efficientad-eval", model.seed))
    parts = [
        images,
        model.augment(images, [mix("augment", s) for s in seeds]),
        model.penalty_batch(images, [mix("penalty", s) for s in seeds]),
    ]
    x = model.prepare(torch.cat(parts))
    t, s = model.teacher_features(x[: 2 * n]), model.student(x)
    a = model.autoencoder(x[n : 2 * n], tuple(t.shape[-2:]))
    full = (
        hard_mean((t[:n] - s[:n, :CHANNELS]).pow(2), model.hard_quantile)
        + (t[n:] - a).pow(2).mean()
        + (a - s[n : 2 * n, CHANNELS:]).pow(2).mean()
        + s[2 * n :, :CHANNELS].pow(2).mean()
    )
    full.backward()
    for ours, reference in zip(split, (p.grad for p in model.student.parameters()), strict=True):
        torch.testing.assert_close(ours, reference)
    assert any(float(g.abs().max()) > 0 for g in split)


def test_cached_teacher_maps_give_the_same_loss() -> None:
    """With the frozen-feature cache the teacher's maps of the images come from the batch: same loss."""
    model = _ready()
    x = _images(2, 64, seed=5)
    batch = {"image": x, "anomaly_step": 1, "anomaly_rank": 0}
    torch.manual_seed(0)  # the autoencoder's dropout
    plain = model.loss(batch)
    (feats,) = model.frozen_features(x)
    assert feats.shape == (2, 384, *model.teacher_features(model.prepare(x)).shape[-2:])
    torch.manual_seed(0)
    cached = model.loss({**batch, "features": [feats]})
    torch.testing.assert_close(cached, plain)
    torch.manual_seed(0)
    wrong = model.loss({**batch, "features": [feats + 1.0]})
    assert float(wrong) > float(plain) + 0.5  # the cached maps are what the loss reads


def test_penalty_images_and_augmentation_are_seeded_by_step() -> None:
    model = _ready(penalty_weight=1.0)
    x = _images(2, 64)
    a = model.penalty_batch(x, [1, 2])
    assert a.shape == x.shape and not torch.equal(a[0], a[1])
    torch.testing.assert_close(a, model.penalty_batch(x, [1, 2]))
    jittered = colour_jitter(x[0], 0.2, torch.Generator().manual_seed(3))
    torch.testing.assert_close(jittered, colour_jitter(x[0], 0.2, torch.Generator().manual_seed(3)))
    assert 0.0 <= float(jittered.min()) and float(jittered.max()) <= 1.0
    assert torch.equal(model.augment(x, [5, 6]), model.augment(x, [5, 6]))
    off = _ready(penalty_weight=0.0)
    off.loss({"image": x, "anomaly_step": 0})
    assert "penalty" not in off.loss_terms
    assert model.data_sources()["penalty_images"]["role"] == "natural images"


# ---- map normalisation -------------------------------------------------------------------------
def test_map_quantiles_send_a_to_zero_and_b_to_one_tenth() -> None:
    model = _ready().eval()
    model.trained_steps.fill_(1)
    images = [_images(2, 64, seed=s) for s in range(2)]
    assert model.fit_map_quantiles(images) == 4
    st, ae = zip(*(model.raw_maps(x) for x in images), strict=True)
    for maps, q in ((torch.cat(st), model.quantiles_st), (torch.cat(ae), model.quantiles_ae)):
        norm = 0.1 * (maps - q[0]) / (q[1] - q[0])
        assert float(quantile(norm, 0.9)) == pytest.approx(0.0, abs=1e-5)
        assert float(quantile(norm, 0.995)) == pytest.approx(0.1, abs=1e-5)
    model.record_quantiles({"source": "test"})
    assert model.data_sources()["map_quantiles"]["quantiles"] == [0.9, 0.995]


def test_forward_is_deterministic_and_traces() -> None:
    model = _ready().eval()
    model.trained_steps.fill_(1)
    assert_deterministic_and_traceable(model, _images(2, 64))


# ---- the teacher -------------------------------------------------------------------------------
def test_teacher_is_distilled_once_and_cached(cache: Path) -> None:
    model = EfficientAdModel(**SMALL)
    record = model.prepare_teacher(torch.device("cpu"), log=lambda msg: None)
    assert (
        record["kind"] == "distilled"
        and record["reused"] is False
        and record["extractor"] == "tf_efficientnet_lite0"
    )
    assert Path(record["cache_file"]).parent == cache and record["images"]["role"] == "natural images"
    again = EfficientAdModel(**SMALL)
    second = again.prepare_teacher(torch.device("cpu"), log=lambda msg: None)
    assert second["reused"] is True and second["cache_file"] == record["cache_file"]
    for k, v in model.teacher.state_dict().items():
        assert torch.equal(v, again.teacher.state_dict()[k])
    assert again.prepare_teacher(torch.device("cpu")) == second  # ready: nothing more to do
    other = EfficientAdModel(**{**SMALL, "teacher_steps": 3})
    assert (
        other.prepare_teacher(torch.device("cpu"), log=lambda msg: None)["cache_file"] != record["cache_file"]
    )
    assert "distilled here from tf_efficientnet_lite0" in model.backbone.weights_source


def test_teacher_weights_file_plain_or_adx(cache: Path, tmp_path: Path) -> None:
    source = EfficientAdModel(**SMALL)
    source.prepare_teacher(torch.device("cpu"), log=lambda msg: None)
    plain = tmp_path / "teacher.pth"
    torch.save(source.teacher.state_dict(), plain)
    for path in (plain, Path(source.data_sources()["teacher"]["cache_file"])):
        model = EfficientAdModel(**SMALL, teacher_weights=str(path))
        record = model.prepare_teacher(torch.device("cpu"), log=lambda msg: None)
        assert record["kind"] == "file" and len(record["sha256"]) == 64
        assert torch.equal(model.teacher[0].weight, source.teacher[0].weight)
    with pytest.raises(TeacherWeightsError, match="does not exist"):
        EfficientAdModel(**SMALL, teacher_weights=str(tmp_path / "none.pth")).prepare_teacher(
            torch.device("cpu")
        )
    with pytest.raises(TeacherWeightsError, match="model_size"):
        EfficientAdModel(**SMALL, model_size="medium", teacher_weights=str(plain)).prepare_teacher(
            torch.device("cpu")
        )


# ---- errors and seeding ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"model_size": "large"}, "model_size"),
        ({"hard_quantile": 1.0}, "hard_quantile"),
        ({"penalty_weight": -1.0}, "penalty_weight"),
        ({"map_quantiles": (0.995, 0.9)}, "map_quantiles"),
        ({"augment_strength": 1.5}, "augment_strength"),
        ({"teacher_steps": 0}, "teacher_steps"),
        ({"teacher_crop_size": 32}, "teacher_crop_size"),
        ({"backbone": "no_such_net"}, "no_such_net"),
        ({"strides": (8, 64)}, "strides"),
    ],
)
def test_bad_hyperparameters_are_named(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        EfficientAd(**kwargs)


def test_fit_start_checks_size_before_work(cache: Path) -> None:
    model = EfficientAd(**SMALL)
    dm = SimpleNamespace(image_size=(48, 48), tiling=None, train_on_tiles=False)
    model.trainer = SimpleNamespace(datamodule=dm, max_epochs=1, lr_scheduler_configs=[])
    with pytest.raises(ValueError, match="at least 64"):
        model.on_fit_start()
    assert not cache.exists(), "no teacher was distilled"


def test_seed_alone_sets_the_weights_and_leaves_the_global_generator() -> None:
    state = torch.random.get_rng_state()
    a, b, c = EfficientAdModel(**SMALL), EfficientAdModel(**SMALL), EfficientAdModel(**SMALL, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.student[0].weight, b.student[0].weight)
    assert not torch.equal(a.student[0].weight, c.student[0].weight)
    batch = {"image": _images(2, 64), "anomaly_step": 3, "anomaly_rank": 0}
    ra, rb = _ready(), _ready()
    torch.testing.assert_close(ra.loss(batch), rb.loss(batch))


# ---- a whole fit (bf16-mixed on the CPU) -------------------------------------------------------
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fit_in_bf16_records_teacher_and_quantiles(
    synthetic_root: Path, tmp_path: Path, cache: Path, capfd: pytest.CaptureFixture
) -> None:
    """Every stage of a fit under bf16 autocast: teacher statistics, a training step, validation, the map
    quantiles, test, checkpoint. One step of batch 1: a CPU without bf16 instructions runs the PDN's
    convolutions about 20 times slower in bf16 than in float32 (a 3-step epoch of batch 4 took 274 s in CI)."""
    model = EfficientAd(**SMALL, optimizer=spec("torch.optim.Adam", lr=1e-3))
    dm = small_datamodule(synthetic_root, batch_size=1, eval_batch_size=2)
    trainer = small_trainer(tmp_path, max_epochs=1, precision="bf16-mixed", limit_train_batches=1)
    trainer.fit(model, datamodule=dm)
    assert int(model.model.trained_steps) == 1 and int(model.model.stats_ready) == 1
    assert "frozen features cached in memory" in capfd.readouterr().err  # the teacher's maps of the images
    sources = model.model.data_sources()
    assert sources["map_quantiles"]["source"] == "held-out normal images"
    assert sources["map_quantiles"]["images"] == sum(s.label == 0 for s in dm.val_samples)
    q = model.model.quantiles_st
    assert torch.isfinite(q).all() and float(q[1]) > float(q[0])
    trainer.test(model, datamodule=dm, verbose=False)
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["sources"]["teacher"]["kind"] == "distilled"
    path = tmp_path / "efficientad.ckpt"
    trainer.save_checkpoint(path)
    restored = EfficientAd.load_from_checkpoint(path)
    assert restored.model.data_sources()["teacher"] == sources["teacher"]
    x = _images(2, 64)
    model.eval(), restored.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.model(x), restored.model(x))
