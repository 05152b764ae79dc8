"""GANomaly: network sizes, the latent score and the map, the two-optimizer step, errors, seeding, checkpoints."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tests.conftest import small_datamodule, small_trainer

from adx.models.components.autoencoder import InputSizeError
from adx.models.ganomaly import GANomaly, GANomalyModel
from adx.models.ganomaly.torch_model import dcgan_init, stage_sizes

SMALL = {"latent_dim": 8, "width": 4}


def _images(n: int = 4, h: int = 32, w: int | None = None, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w or h, generator=g)


def _adam(params) -> torch.optim.Adam:  # noqa: ANN001
    return torch.optim.Adam(params, lr=2e-3, betas=(0.5, 0.999))


# ---- networks ----------------------------------------------------------------------------------
def test_stage_sizes_follow_dcgan_and_any_multiple_of_16() -> None:
    assert stage_sizes((32, 32)) == [(16, 16), (8, 8), (4, 4)]  # the paper's 32 px: final 4x4 kernel
    assert stage_sizes((64, 64))[-1] == (4, 4) and len(stage_sizes((64, 64))) == 4
    assert stage_sizes((48, 48))[-1] == (6, 6)
    assert stage_sizes((64, 96))[-1] == (4, 6)
    assert stage_sizes((208, 208))[-1] == (13, 13)  # 16 x 13: an odd map ends the halving


@pytest.mark.parametrize("size", [(32, 32), (48, 48), (64, 96), (80, 80)])
def test_shapes_at_any_multiple_of_16(size: tuple[int, int]) -> None:
    model = GANomalyModel(input_size=size, **SMALL).eval()
    x = _images(2, *size)
    with torch.no_grad():
        out = model.generate(x)
        scores, maps = model(x)
    assert out.x_hat.shape == x.shape and float(out.x_hat.abs().max()) <= 1.0
    assert out.z.shape == out.z_hat.shape == (2, 8, 1, 1)
    assert scores.shape == (2,)
    assert maps.shape == (2, *size), "the map has the input's spatial size"
    _, d = model._networks()
    assert d(out.x).shape == (2, 1, 1, 1)
    n_down = len(stage_sizes(size))
    assert d.features[-3].out_channels == 4 * 2 ** (n_down - 1), "width doubles at every halving"


def test_latent_score_is_the_l1_distance_of_the_latents() -> None:
    model = GANomalyModel(input_size=32, **SMALL).eval()
    x = _images(3)
    with torch.no_grad():
        scores, _ = model(x)
        out = model.generate(x)
    z, z_hat = out.z.double().tolist(), out.z_hat.double().tolist()
    for i in range(3):
        brute = sum(abs(z[i][k][0][0] - z_hat[i][k][0][0]) for k in range(8))
        assert float(scores[i]) == pytest.approx(brute, rel=1e-5)
    squared = GANomalyModel(input_size=32, latent_distance="l2", **SMALL).eval()
    with torch.no_grad():
        got, _ = squared(x)
    torch.testing.assert_close(got, (out.z - out.z_hat).pow(2).flatten(1).mean(1))


def test_map_is_the_contextual_error_and_the_scores_read_it() -> None:
    x = _images(2)
    plain = GANomalyModel(input_size=32, map_sigma=0.0, **SMALL).eval()
    with torch.no_grad():
        _, maps = plain(x)
        out = plain.generate(x)
    expected = (x - (out.x_hat + 1) / 2).abs().mean(dim=1)
    torch.testing.assert_close(maps, expected)
    for score, reduce in (("contextual", lambda m: m.amax(1)), ("contextual_mean", lambda m: m.mean(1))):
        model = GANomalyModel(input_size=32, score=score, **SMALL).eval()
        with torch.no_grad():
            scores, blurred = model(x)
        torch.testing.assert_close(scores, reduce(blurred.flatten(1)))
        assert float(blurred.std()) < float(maps.std()), "map_sigma blurs"


def test_inference_traces_and_is_deterministic() -> None:
    model = GANomalyModel(input_size=32, **SMALL).eval()
    x = _images(2)
    with torch.no_grad():
        first, again = model(x), model(x)
        traced = torch.jit.trace(model, x, check_trace=False)(x)
    for a, b, c in zip(first, again, traced, strict=True):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


# ---- training ----------------------------------------------------------------------------------
def test_one_step_moves_both_networks_and_keeps_their_gradients_apart() -> None:
    model = GANomalyModel(input_size=32, **SMALL).train()
    g, d = model._networks()
    x = _images(4)
    # the generator loss gives the discriminator no gradient, the discriminator loss none to the generator
    out = model.generate(x)
    model.generator_loss(out).backward()
    assert all(p.grad is None for p in d.parameters())
    assert all(p.grad is not None for p in g.parameters())
    assert all(p.requires_grad for p in d.parameters()), "D is trainable again after the generator loss"
    g.zero_grad(set_to_none=True)
    model.discriminator_loss(out.x.detach(), out.x_hat).backward()
    assert all(p.grad is None for p in g.parameters())
    assert all(p.grad is not None for p in d.parameters())
    d.zero_grad(set_to_none=True)

    g_before = [p.detach().clone() for p in g.parameters()]
    d_before = [p.detach().clone() for p in d.parameters()]
    g_loss, d_loss = model.train_step(x, _adam(g.parameters()), _adam(d.parameters()))
    assert math.isfinite(float(g_loss)) and math.isfinite(float(d_loss))
    assert all(not torch.equal(a, p) for a, p in zip(g_before, g.parameters(), strict=True))
    assert all(not torch.equal(a, p) for a, p in zip(d_before, d.parameters(), strict=True))
    assert set(model.loss_terms) == {"adv", "con", "enc", "d_real", "d_fake"}


def test_generator_loss_weights_its_terms() -> None:
    model = GANomalyModel(input_size=32, w_adv=2.0, w_con=3.0, w_enc=5.0, **SMALL)
    with torch.no_grad():
        loss = model.loss({"image": _images(2)})
    t = model.loss_terms
    torch.testing.assert_close(loss, 2.0 * t["adv"] + 3.0 * t["con"] + 5.0 * t["enc"])


def test_loss_decreases_on_a_tiny_batch() -> None:
    torch.manual_seed(0)
    model = GANomalyModel(input_size=32, **SMALL).train()
    g, d = model._networks()
    opt_g, opt_d = _adam(g.parameters()), _adam(d.parameters())
    x = torch.nn.functional.avg_pool2d(_images(8, seed=3), 5, 1, 2)  # smooth-ish targets
    contextual = []
    for _ in range(25):
        model.train_step(x, opt_g, opt_d)
        contextual.append(float(model.loss_terms["con"]))
    assert sum(contextual[-3:]) < 0.8 * sum(contextual[:3]), contextual


def test_collapsed_discriminator_is_reinitialised() -> None:
    torch.manual_seed(0)
    model = GANomalyModel(input_size=32, d_reinit_below=100.0, **SMALL)  # any loss counts as collapsed
    g, d = model._networks()
    model.train_step(_images(4), _adam(g.parameters()), _adam(d.parameters()))
    assert int(model.d_reinits) == 1
    never = GANomalyModel(input_size=32, d_reinit_below=0.0, **SMALL)
    g, d = never._networks()
    never.train_step(_images(4), _adam(g.parameters()), _adam(d.parameters()))
    assert int(never.d_reinits) == 0


def test_same_seed_same_weights_and_same_training() -> None:
    def run(seed: int) -> tuple[GANomalyModel, list[float]]:
        torch.manual_seed(123)
        model = GANomalyModel(input_size=32, seed=seed, **SMALL)
        g, d = model._networks()
        opt_g, opt_d = _adam(g.parameters()), _adam(d.parameters())
        return model, [float(model.train_step(_images(4), opt_g, opt_d)[0]) for _ in range(3)]

    (a, la), (b, lb), (c, _) = run(1), run(1), run(2)
    assert la == lb
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    fresh_1, fresh_2 = (
        GANomalyModel(input_size=32, seed=1, **SMALL),
        GANomalyModel(input_size=32, seed=2, **SMALL),
    )
    assert not all(torch.equal(p, q) for p, q in zip(fresh_1.parameters(), fresh_2.parameters(), strict=True))
    assert c is not None


def test_precise_bn_recomputes_the_generator_statistics() -> None:
    model = GANomalyModel(input_size=32, precise_bn=True, **SMALL)
    g, _ = model._networks()
    images = _images(4)
    model.eval()
    model.fit_reference([{"image": images[:2]}, {"image": images[2:]}])
    conv, bn = g.encoder.features[2], g.encoder.features[3]  # first pyramid conv and its BatchNorm
    assert not bn.training and bn.momentum == 0.1
    with torch.no_grad():
        feats = conv(g.encoder.features[1](g.encoder.features[0](images * 2 - 1)))
    expected = (feats[:2].mean(dim=(0, 2, 3)) + feats[2:].mean(dim=(0, 2, 3))) / 2
    torch.testing.assert_close(bn.running_mean, expected, rtol=1e-4, atol=1e-5)
    off = GANomalyModel(input_size=32, **SMALL)
    before = off.generator.encoder.features[3].running_mean.clone()
    off.fit_reference([{"image": images}])
    assert torch.equal(off.generator.encoder.features[3].running_mean, before)


# ---- sizes, building and checkpoints -----------------------------------------------------------
def test_networks_are_built_lazily_and_restored_at_their_size() -> None:
    lazy = GANomalyModel(**SMALL)
    assert not lazy.built and lazy.size is None
    with pytest.raises(RuntimeError, match="fit"):
        lazy.check_fitted()
    with pytest.raises(RuntimeError, match="not built"):
        lazy(_images(1))
    trained = GANomalyModel(input_size=(32, 48), **SMALL)
    trained.trained_steps += 1
    fresh = GANomalyModel(**SMALL)
    fresh.load_state_dict(trained.state_dict())
    assert fresh.size == (32, 48)
    fresh.check_fitted()
    x = _images(2, 32, 48)
    trained.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), trained(x))


def test_input_sizes_are_checked_before_any_work() -> None:
    with pytest.raises(InputSizeError, match="--model.input_size 16"):
        GANomalyModel(input_size=12)
    with pytest.raises(InputSizeError, match="even sides"):
        GANomalyModel(**SMALL).build((33, 64))
    model = GANomalyModel(input_size=32, **SMALL)
    with pytest.raises(InputSizeError, match="built for 32x32"):
        model(_images(1, 64))
    with pytest.raises(InputSizeError, match=r"\[B,3,H,W\]"):
        model(torch.rand(1, 1, 32, 32))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"latent_dim": 0}, "latent_dim"),
        ({"width": 2.5}, "width"),
        ({"extra_layers": -1}, "extra_layers"),
        ({"w_adv": -1.0}, "w_adv"),
        ({"w_con": float("nan")}, "w_con"),
        ({"w_enc": -0.1}, "w_enc"),
        ({"score": "max"}, "score"),
        ({"latent_distance": "cosine"}, "latent_distance"),
        ({"map_sigma": -1.0}, "map_sigma"),
        ({"d_reinit_below": -1.0}, "d_reinit_below"),
        ({"brightness": 1.5}, "brightness"),
        ({"input_size": (32, 32, 32)}, "input_size"),
    ],
)
def test_bad_hyperparameters_are_named(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        GANomaly(**kwargs)


def _fake_trainer(image_size: tuple[int, int]) -> SimpleNamespace:
    dm = SimpleNamespace(image_size=image_size, tiling=None, train_on_tiles=False)
    return SimpleNamespace(datamodule=dm, max_epochs=1, lr_scheduler_configs=[])


def test_adapter_builds_for_the_data_and_configures_two_adams() -> None:
    module = GANomaly(**SMALL)
    module._trainer = _fake_trainer((48, 64))
    module.configure_model()
    assert module.model.size == (48, 64)
    opt_g, opt_d = module.configure_optimizers()
    for opt in (opt_g, opt_d):
        assert isinstance(opt, torch.optim.Adam)
        assert opt.defaults["lr"] == 2e-4 and tuple(opt.defaults["betas"]) == (0.5, 0.999)
    g_ids = {id(p) for group in opt_g.param_groups for p in group["params"]}
    d_ids = {id(p) for group in opt_d.param_groups for p in group["params"]}
    assert g_ids == {id(p) for p in module.model.generator.parameters()}
    assert d_ids == {id(p) for p in module.model.discriminator.parameters()}
    fixed = GANomaly(input_size=32, **SMALL)
    fixed._trainer = _fake_trainer((64, 64))
    fixed.configure_model()
    with pytest.raises(ValueError, match="input_size"):
        fixed.on_fit_start()


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_fit_test_and_checkpoint_round_trip(precision: str, synthetic_root: Path, tmp_path: Path) -> None:
    module = GANomaly(**SMALL)
    dm = small_datamodule(synthetic_root, image_size=32)
    trainer = small_trainer(tmp_path, writer=False, precision=precision)
    trainer.fit(module, datamodule=dm)
    assert int(module.model.trained_steps) == 3  # 12 images, batch 4
    assert {"train/loss", "train/d_loss", "train/con", "val/loss"} <= set(trainer.callback_metrics)
    assert all(math.isfinite(float(v)) for v in trainer.callback_metrics.values())
    if precision != "32-true":
        return
    path = tmp_path / "ganomaly.ckpt"
    trainer.save_checkpoint(path)
    restored = GANomaly.load_from_checkpoint(path)
    assert restored.model.size == (32, 32)
    batch = next(iter(dm.test_dataloader()))
    module.eval(), restored.eval()
    with torch.no_grad():
        for a, b in zip(module.model(batch["image"]), restored.model(batch["image"]), strict=True):
            torch.testing.assert_close(a, b)


def test_training_steps_see_relit_images(synthetic_root: Path, tmp_path: Path) -> None:
    module = GANomaly(**SMALL, brightness=0.3)
    assert GANomaly(**SMALL).model.brightness == 0.0, "the paper's setting by default"
    seen: list[tuple[torch.Tensor, torch.Tensor, int]] = []
    relight, train_step = module.model.relight, module.model.train_step

    def record_relight(batch: dict) -> torch.Tensor:
        out = relight(batch)
        seen.append((batch["image"], out, batch["anomaly_step"]))
        return out

    def record_step(images: torch.Tensor, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        assert images is seen[-1][1], "the generator and discriminator train on the relit images"
        return train_step(images, *args, **kwargs)

    module.model.relight, module.model.train_step = record_relight, record_step
    small_trainer(tmp_path, writer=False).fit(
        module, datamodule=small_datamodule(synthetic_root, image_size=32)
    )
    assert len(seen) == 3 and len({step for *_, step in seen}) == 3, "a fresh draw every step"
    for raw, lit, _ in seen:
        inside = (raw > 0.05) & (raw < 0.7)  # neither clipped nor too dark to divide
        ratios = [float((lit[i][inside[i]] / raw[i][inside[i]]).median()) for i in range(len(raw))]
        assert all(0.7 - 1e-4 <= r <= 1.3 + 1e-4 for r in ratios) and max(abs(r - 1) for r in ratios) > 1e-3


def test_dcgan_init_statistics() -> None:
    model = GANomalyModel(input_size=64, width=16)
    dcgan_init(model)
    conv = model.generator.encoder.features[2].weight
    bn = model.generator.encoder.features[3]
    assert abs(float(conv.std()) - 0.02) < 0.002 and abs(float(conv.mean())) < 0.002
    assert torch.equal(bn.bias, torch.zeros_like(bn.bias)) and abs(float(bn.weight.mean()) - 1) < 0.01
