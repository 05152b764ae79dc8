"""Reconstruction methods (AutoEncoder, DAE, VAE) and their shared parts: SSIM, the conv autoencoder."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from adx.models.autoencoder import AutoEncoder, AutoEncoderModel
from adx.models.components.autoencoder import InputSizeError, check_datamodule_size, error_map
from adx.models.components.ssim import ssim, ssim_map, ssim_window
from adx.models.dae import DAE, DAEModel
from adx.models.vae import VAE, VAEModel, kl_divergence
from adx.tiling import make_grid

MODELS = {"AutoEncoder": AutoEncoderModel, "DAE": DAEModel, "VAE": VAEModel}
SMALL = {"bottleneck_kernel": 4}  # 64 px inputs -> 1x1 latent


def _images(b: int = 2, h: int = 64, w: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g)


# ---- SSIM ------------------------------------------------------------------------------------------


def _brute_ssim(x: np.ndarray, y: np.ndarray, i: int, j: int, size: int = 11, sigma: float = 1.5) -> float:
    """SSIM of one pixel of single-channel images, from the reflect-padded window, loop by loop."""
    pad = size // 2
    xp, yp = np.pad(x, pad, mode="reflect"), np.pad(y, pad, mode="reflect")
    r = np.arange(size) - pad
    g = np.exp(-0.5 * (r / sigma) ** 2)
    g /= g.sum()
    mx = my = sxx = syy = sxy = 0.0
    for a in range(size):
        for b in range(size):
            wgt = g[a] * g[b]
            px, py = xp[i + a, j + b], yp[i + a, j + b]
            mx, my = mx + wgt * px, my + wgt * py
            sxx, syy, sxy = sxx + wgt * px * px, syy + wgt * py * py, sxy + wgt * px * py
    vx, vy, cov = sxx - mx * mx, syy - my * my, sxy - mx * my
    c1, c2 = 0.01**2, 0.03**2
    return ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))


def test_ssim_of_identical_images_is_one() -> None:
    x = _images()
    torch.testing.assert_close(ssim_map(x, x), torch.ones_like(x), rtol=0, atol=1e-5)
    torch.testing.assert_close(ssim(x, x), torch.ones(2), rtol=0, atol=1e-5)
    assert error_map(x, x, "ssim").abs().max() < 1e-5
    assert error_map(x, x, "l2").abs().max() == 0


def test_ssim_matches_a_brute_force_reference() -> None:
    x = _images(1, 32, 40, seed=1)
    y = (0.7 * x + 0.3 * _images(1, 32, 40, seed=2)).clamp(0, 1)
    got = ssim_map(x.double(), y.double())
    xs, ys = x[0, 1].double().numpy(), y[0, 1].double().numpy()
    for i, j in ((0, 0), (3, 38), (16, 20), (31, 39), (10, 5)):  # corners and borders use the reflection
        assert float(got[0, 1, i, j]) == pytest.approx(_brute_ssim(xs, ys, i, j), abs=1e-9)


def test_ssim_is_accurate_in_float32_on_flat_images() -> None:
    """Centred moments: float32 stays within 1e-5 of float64 where windows are nearly flat (export parity)."""
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.avg_pool2d(torch.rand(2, 3, 64, 64, generator=g), 9, 1, 4) * 0.3 + 0.6
    y = (x + 0.01 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    err = (ssim_map(x, y).double() - ssim_map(x.double(), y.double())).abs().max()
    assert float(err) < 1e-5


def test_ssim_computes_in_float32_under_mixed_precision() -> None:
    x, y = _images(seed=6), _images(seed=7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ssim_map(x, y)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ssim_map(x, y))


def test_ssim_properties() -> None:
    x, y = _images(seed=3), _images(seed=4)
    m = ssim_map(x, y)
    assert m.shape == x.shape and float(m.max()) <= 1 + 1e-6 and float(m.min()) >= -1 - 1e-6
    torch.testing.assert_close(m, ssim_map(y, x))
    assert float(ssim(x, y).max()) < 0.5  # independent noise images are dissimilar
    gray = x[:, :1].expand(-1, 3, -1, -1)  # grayscale arrives as 3 equal channels
    torch.testing.assert_close(
        ssim_map(gray, y[:, :1].expand(-1, 3, -1, -1))[:, 0], ssim_map(x[:, :1], y[:, :1])[:, 0]
    )
    uniform = ssim_window(5, None)
    assert torch.allclose(uniform, torch.full((5,), 0.2, dtype=torch.float64))
    assert ssim_window(11).sum().item() == pytest.approx(1.0)


def test_ssim_errors_are_named() -> None:
    with pytest.raises(ValueError, match="odd"):
        ssim_window(10)
    with pytest.raises(ValueError, match="too small"):
        ssim_map(torch.rand(1, 3, 4, 4), torch.rand(1, 3, 4, 4))
    with pytest.raises(ValueError, match="one shape"):
        ssim_map(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 8))


# ---- the models ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize(("size", "kw"), [((64, 64), SMALL), ((64, 96), SMALL), ((128, 128), {})])
def test_shapes(name: str, size: tuple[int, int], kw: dict) -> None:
    model = MODELS[name](**kw).eval()
    x = _images(2, *size)
    with torch.no_grad():
        scores, maps = model(x)
        recon = model.reconstruct(x)
    assert scores.shape == (2,) and maps.shape == (2, *size) and recon.shape == x.shape
    assert float(recon.min()) >= 0 and float(recon.max()) <= 1
    torch.testing.assert_close(scores, maps.flatten(1).amax(1))
    assert model.loss({"image": x}).ndim == 0


@pytest.mark.parametrize("name", sorted(MODELS))
def test_input_size_is_checked_before_any_work(name: str) -> None:
    model = MODELS[name](**SMALL)
    with pytest.raises(InputSizeError, match="multiples of 16.*--data.image_size 64"):
        model(_images(1, 72, 64))
    with pytest.raises(InputSizeError, match="multiples of 16"):
        model.loss({"image": _images(1, 64, 70)})
    big = MODELS[name]()  # bottleneck_kernel 8: at least 128 px
    with pytest.raises(InputSizeError, match="at least 128 px.*bottleneck_kernel"):
        big(_images(1, 64, 64))
    assert issubclass(InputSizeError, ValueError)


def test_datamodule_and_tile_sizes_are_checked() -> None:
    model = AutoEncoderModel()
    check_datamodule_size(model, SimpleNamespace(image_size=(128, 256), tiling=None))
    with pytest.raises(InputSizeError, match="--data.image_size 128, or a smaller --model.bottleneck_kernel"):
        check_datamodule_size(model, SimpleNamespace(image_size=(100, 128), tiling=None))
    with pytest.raises(InputSizeError, match="multiples of 16.*--data.image_size 112$"):
        check_datamodule_size(AutoEncoderModel(**SMALL), SimpleNamespace(image_size=(110, 128), tiling=None))
    grid = make_grid(256, 120, 120)
    with pytest.raises(InputSizeError, match="--data.tile_size"):
        check_datamodule_size(model, SimpleNamespace(image_size=(256, 256), tiling=grid))


def test_fit_refuses_a_bad_image_size_before_training(synthetic_root, tmp_path) -> None:
    from lightning.pytorch import Trainer

    from adx.data import MVTec

    module = AutoEncoder(bottleneck_kernel=4)
    dm = MVTec(root=str(synthetic_root.parent), category=synthetic_root.name, image_size=72, num_workers=0)
    trainer = Trainer(max_epochs=1, default_root_dir=tmp_path, logger=False, enable_progress_bar=False)
    with pytest.raises(InputSizeError, match="--data.image_size is 72x72.*use --data.image_size 64"):
        trainer.fit(module, datamodule=dm)
    assert int(module.model.trained_steps) == 0


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (AutoEncoderModel, {"loss": "l1"}, "loss"),
        (AutoEncoderModel, {"latent_dim": 0}, "latent_dim"),
        (AutoEncoderModel, {"bottleneck_kernel": 0}, "bottleneck_kernel"),
        (AutoEncoderModel, {"map_metric": "l1"}, "map_metric"),
        (AutoEncoderModel, {"score": "median"}, "score"),
        (AutoEncoderModel, {"ssim_window": 4}, "ssim_window"),
        (AutoEncoderModel, {"pretrained": True}, "pretrained"),
        (DAEModel, {"corruption": "blur"}, "corruption"),
        (DAEModel, {"noise_std": 0.0}, "noise_std"),
        (DAEModel, {"cutout_size": 1.5}, "cutout_size"),
        (DAEModel, {"mask_patch": 0}, "mask_patch"),
        (DAEModel, {"mask_ratio": 1.0}, "mask_ratio"),
        (VAEModel, {"beta": -1.0}, "beta"),
    ],
)
def test_bad_hyperparameters_are_named(cls: type, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


@pytest.mark.parametrize(
    ("name", "kw"),
    [
        ("AutoEncoder", {}),
        ("AutoEncoder", {"loss": "l2"}),
        ("DAE", {"corruption": "cutout"}),
        ("VAE", {}),
    ],
)
def test_loss_decreases_on_a_tiny_batch(name: str, kw: dict) -> None:
    torch.manual_seed(0)
    model = MODELS[name](**SMALL, **kw)
    x = _images(4, seed=5) * 0.5 + 0.25  # smooth-ish target away from the sigmoid's ends
    x = torch.nn.functional.avg_pool2d(x, 5, 1, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss = model.loss({"image": x})
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses


def test_map_metric_and_score_options() -> None:
    model = AutoEncoderModel(**SMALL, loss="l2", map_metric="ssim", score="mean").eval()
    x = _images()
    with torch.no_grad():
        scores, maps = model(x)
        expected = error_map(x, model.reconstruct(x), "ssim")
    torch.testing.assert_close(maps, expected)
    torch.testing.assert_close(scores, expected.flatten(1).mean(1))


# ---- DAE corruption --------------------------------------------------------------------------------


def test_gaussian_corruption_adds_noise_of_the_given_std() -> None:
    model = DAEModel(**SMALL, noise_std=0.05)
    x = torch.full((2, 3, 64, 64), 0.5)
    y = model.corrupt(x, torch.Generator().manual_seed(0))
    assert (y - x).std().item() == pytest.approx(0.05, rel=0.05)
    torch.testing.assert_close(y, model.corrupt(x, torch.Generator().manual_seed(0)))  # seeded: reproduces
    assert not torch.equal(y, model.corrupt(x, torch.Generator().manual_seed(1)))


def test_cutout_corruption_zeroes_one_square_per_image() -> None:
    model = DAEModel(**SMALL, corruption="cutout", cutout_size=0.25)
    x = _images(3) * 0.9 + 0.1  # no zero pixels of its own
    y = model.corrupt(x, torch.Generator().manual_seed(0))
    for img in y:
        hole = (img == 0).all(0)
        assert (img == 0).any(0).eq(hole).all(), "every channel is cut out"
        ys, xs = hole.nonzero(as_tuple=True)
        assert hole.sum() == 16 * 16 and int(ys.max() - ys.min()) == 15 and int(xs.max() - xs.min()) == 15
    keep = (y != 0).all(1, keepdim=True).expand_as(x)
    assert torch.equal(y[keep], x[keep]), "pixels outside the square are untouched"


def test_mask_corruption_zeroes_grid_cells() -> None:
    model = DAEModel(**SMALL, corruption="mask", mask_patch=8, mask_ratio=0.3)
    x = _images(8) * 0.9 + 0.1
    y = model.corrupt(x, torch.Generator().manual_seed(0))
    hole = (y == 0).all(1)
    cells = hole.view(8, 8, 8, 8, 8).permute(0, 1, 3, 2, 4).flatten(3)  # [B, cell row, cell col, 64 px]
    assert (cells.all(-1) | ~cells.any(-1)).all(), "cells are masked whole"
    assert 0.2 < hole.float().mean().item() < 0.4


def test_dae_is_trained_on_corrupted_inputs_but_scores_clean_ones() -> None:
    model = DAEModel(**SMALL, noise_std=0.2).eval()
    x = _images()
    with torch.no_grad():
        clean = model.error(x, model.reconstruct(x)).mean()
        torch.manual_seed(0)
        a = model.loss({"image": x})
        torch.manual_seed(1)
        b = model.loss({"image": x})
    assert float(a) != float(b) and float(a) != float(clean), "the loss sees a fresh corruption"
    with torch.no_grad():
        torch.testing.assert_close(model(x)[1], error_map(x, model.reconstruct(x), "ssim"))


# ---- VAE -------------------------------------------------------------------------------------------


def test_kl_divergence() -> None:
    zero = torch.zeros(3, 100, 1, 1)
    assert torch.equal(kl_divergence(zero, zero), torch.zeros(3))
    assert kl_divergence(torch.ones(2, 4, 1, 1), torch.zeros(2, 4, 1, 1)).tolist() == [2.0, 2.0]
    logvar = torch.full((1, 1, 1, 1), 1.0)
    assert float(kl_divergence(torch.zeros_like(logvar), logvar)) == pytest.approx(0.5 * (np.e - 2))


def test_vae_beta_weights_the_kl_term() -> None:
    x = _images().double()
    losses = []
    for beta in (0.0, 1.0):
        model = VAEModel(**SMALL, beta=beta).double()
        torch.manual_seed(0)
        losses.append(float(model.loss({"image": x})))
        mu, logvar = model.posterior(x)
        kl = float(kl_divergence(mu, logvar.clamp(-30, 20)).mean())
    assert losses[1] - losses[0] == pytest.approx(kl, rel=1e-9)


# ---- inference -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
def test_inference_is_deterministic_and_traces(name: str) -> None:
    model = MODELS[name](**SMALL, loss="ssim")
    x = _images()
    with torch.no_grad():
        train_mode = model.train()(x)
        a, b = model.eval()(x), model(x)
        traced = torch.jit.trace(model, x, check_trace=False)(x)
    for one in (b, train_mode, traced):
        torch.testing.assert_close(one[0], a[0])
        torch.testing.assert_close(one[1], a[1])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_unfitted_model_says_so(name: str) -> None:
    model = MODELS[name](**SMALL)
    with pytest.raises(RuntimeError, match="fit"):
        model.check_fitted()
    model.trained_steps += 1
    model.check_fitted()


@pytest.mark.parametrize(
    ("cls", "extra"), [(AutoEncoder, {}), (DAE, {"corruption": "mask"}), (VAE, {"beta": 0.5})]
)
def test_lightning_adapters(cls: type, extra: dict) -> None:
    module = cls(bottleneck_kernel=4, **extra)
    assert module.hparams["bottleneck_kernel"] == 4
    for key, value in extra.items():
        assert module.hparams[key] == value and getattr(module.model, key) == value
    opt = module.configure_optimizers()
    assert isinstance(opt, torch.optim.Adam)
    assert opt.defaults["lr"] == 2e-4 and opt.defaults["weight_decay"] == 1e-5
