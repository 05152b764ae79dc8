"""FastFlow, CFlow and their shared flow parts: invertibility, training, shapes, seeds, errors, configs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Trainer
from tests.conftest import CONFIGS, quiet_cli, synthetic_cli

from adx.cli import main
from adx.data import MVTec
from adx.models import CFlow, FastFlow
from adx.models.cflow import CFlowModel
from adx.models.components.backbone import BackboneError
from adx.models.components.flows import (
    WarmupCosineLR,
    conv_subnet,
    coupling_flow,
    fc_subnet,
    positional_encoding_2d,
    random_rotation,
    seeded,
)
from adx.models.components.optim import build
from adx.models.fastflow import FastFlowModel

FLOW_CONFIGS = sorted([*CONFIGS.glob("fastflow/*.yaml"), *CONFIGS.glob("cflow/*.yaml")])


def _images(n: int = 4, h: int = 64, w: int = 64, seed: int = 0) -> torch.Tensor:
    """Smooth random images [n,3,h,w] in [0,1] (a fixed batch to train on)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, h // 8, w // 8, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)


def _fastflow(**kw) -> FastFlowModel:
    return FastFlowModel(**{"flow_steps": 2, **kw})


def _cflow(**kw) -> CFlowModel:
    return CFlowModel(**{"coupling_blocks": 2, "strides": (8, 16), "fiber_batch_size": 64, **kw})


# ---- shared parts ----------------------------------------------------------------------------------
@pytest.mark.parametrize("permute_soft", [False, True])
def test_coupling_flows_invert(permute_soft: bool) -> None:
    with seeded(1):
        maps = coupling_flow(
            (6, 1, 1), [conv_subnet(3, 1.0), conv_subnet(1, 1.0)] * 2, 2.0, permute_soft=permute_soft
        )
        fibres = coupling_flow((10,), [fc_subnet] * 3, 1.9, condition_dim=8, permute_soft=permute_soft)
        # random subnet outputs (FrEIA starts near the identity only through its init scale)
        for p in [*maps.parameters(), *fibres.parameters()]:
            if p.requires_grad:
                p.data.normal_(0, 0.2)
    x = torch.randn(3, 6, 5, 7)
    z, log_det = maps(x)
    x_back, log_det_back = maps(z, rev=True)
    assert not torch.allclose(z, x, atol=1e-2), "the flow should not be the identity"
    torch.testing.assert_close(x_back, x, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(log_det_back, -log_det, atol=1e-3, rtol=1e-4)
    e, c = torch.randn(20, 10), torch.randn(20, 8)
    z, log_det = fibres(e, [c])
    e_back, log_det_back = fibres(z, [c], rev=True)
    torch.testing.assert_close(e_back, e, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(log_det_back, -log_det, atol=1e-3, rtol=1e-4)
    z_other, _ = fibres(e, [c + 1.0])
    assert not torch.allclose(z_other, z), "the condition must change the mapping"


def test_log_det_matches_autograd_jacobian() -> None:
    with seeded(3):
        flow = coupling_flow((4,), [fc_subnet] * 2, 1.9, condition_dim=4, permute_soft=True)
    e, c = torch.randn(1, 4), torch.randn(1, 4)
    _, log_det = flow(e, [c])
    jac = torch.autograd.functional.jacobian(lambda x: flow(x, [c])[0], e).reshape(4, 4)
    assert float(log_det.detach()) == pytest.approx(float(torch.linalg.slogdet(jac)[1]), abs=1e-4)


def test_random_rotation_is_a_seeded_rotation() -> None:
    with seeded(0):
        q = random_rotation(50)
    with seeded(0):
        again = random_rotation(50)
    torch.testing.assert_close(q @ q.T, torch.eye(50), atol=1e-5, rtol=0)
    assert float(torch.linalg.det(q.double())) == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(q, again)
    assert q.abs().max() < 0.9, "a dense rotation, not a permutation"


def test_seeded_restores_global_rng() -> None:
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    with seeded(0):
        torch.rand(100)
    assert torch.equal(torch.rand(3), expected)


def test_positional_encoding() -> None:
    code = positional_encoding_2d(8, 3, 5)
    assert code.shape == (8, 3, 5)
    x, y = torch.arange(5.0), torch.arange(3.0)
    torch.testing.assert_close(code[0], torch.sin(x).expand(3, 5))  # lowest x frequency is 1
    torch.testing.assert_close(code[1], torch.cos(x).expand(3, 5))
    torch.testing.assert_close(code[4], torch.sin(y)[:, None].expand(3, 5))
    torch.testing.assert_close(code[2], torch.sin(x * 0.01).expand(3, 5))  # 1e4 ** (-2/4)
    with pytest.raises(ValueError, match="multiple of 4"):
        positional_encoding_2d(6, 3, 3)


def test_warmup_cosine_schedule() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupCosineLR(opt, max_epochs=10, warmup_epochs=2, min_ratio=1e-3, warmup_start_ratio=0.1)
    lrs = []
    for _ in range(11):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    cos = lambda e: 1e-3 + (1 - 1e-3) * 0.5 * (1 + math.cos(math.pi * e / 10))  # noqa: E731
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[1] == pytest.approx(0.1 + (cos(2) - 0.1) / 2)
    assert lrs[2:] == pytest.approx([cos(e) for e in range(2, 11)])
    assert lrs[10] == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="warmup_epochs"):
        WarmupCosineLR(opt, max_epochs=2, warmup_epochs=2)


def test_schedule_without_horizon_follows_the_trainer() -> None:
    from adx.models.components.optim import spec
    from adx.models.trained import TrainedModule

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupCosineLR(opt, warmup_epochs=1)  # horizon unknown until the trainer is
    assert sched.max_epochs is None and opt.param_groups[0]["lr"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="warmup_epochs"):
        sched.set_horizon(1)

    module = TrainedModule(
        spec("torch.optim.SGD", lr=1.0), spec("adx.models.components.flows.WarmupCosineLR")
    )
    module.model = torch.nn.Linear(2, 2)
    module.trainer = type("T", (), {"max_epochs": 7})()  # stands in for an attached Trainer
    out = module.configure_optimizers()
    assert out["lr_scheduler"]["scheduler"].max_epochs == 7


def test_new_horizon_applies_from_the_current_epoch() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupCosineLR(opt, warmup_epochs=0)
    sched.set_horizon(2)
    for _ in range(2):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)  # the end of a 2-epoch schedule
    resumed = WarmupCosineLR(opt, warmup_epochs=0)
    resumed.load_state_dict(sched.state_dict())  # as Lightning restores it: the old horizon comes back
    assert resumed.max_epochs == 2 and resumed.follows_trainer
    resumed.set_horizon(4)  # what TrainedModule.on_train_start does with the new trainer.max_epochs
    half = 1e-3 + (1 - 1e-3) * 0.5  # cosine at epoch 2 of 4
    assert opt.param_groups[0]["lr"] == pytest.approx(half) and resumed.get_last_lr() == pytest.approx([half])
    opt.step()
    resumed.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(
        1e-3 + (1 - 1e-3) * 0.5 * (1 + math.cos(math.pi * 3 / 4))
    )


# ---- models -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cls", "kwargs", "name"),
    [
        (FastFlowModel, {"flow_steps": 0}, "flow_steps"),
        (FastFlowModel, {"hidden_ratio": 0.0}, "hidden_ratio"),
        (FastFlowModel, {"clamp": -1.0}, "clamp"),
        (FastFlowModel, {"strides": ()}, "strides"),
        (CFlowModel, {"condition_dim": 6}, "condition_dim"),
        (CFlowModel, {"coupling_blocks": 0}, "coupling_blocks"),
        (CFlowModel, {"clamp_alpha": 0.0}, "clamp_alpha"),
        (CFlowModel, {"fiber_batch_size": 0}, "fiber_batch_size"),
    ],
)
def test_bad_arguments_are_named(cls, kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=rf"{name} must .*--model\.{name}"):
        cls(**kwargs)


@pytest.mark.parametrize("cls", [FastFlow, CFlow])
def test_vit_backbone_is_refused(cls) -> None:
    with pytest.raises(BackboneError, match="not a CNN"):
        cls(backbone="vit_tiny_patch16_224", strides=(16,))


def test_fastflow_shapes_loss_and_training() -> None:
    model = _fastflow()
    images = _images(4, 64, 96)
    feats = model.frozen_features(images)
    assert [f.shape[-2:] for f in feats] == [(16, 24), (8, 12), (4, 6)]
    for f in feats:  # the paper's LayerNorm over (C, h, w), per image
        assert f.mean(dim=(1, 2, 3)).abs().max() < 1e-4
        assert (f.std(dim=(1, 2, 3), unbiased=False) - 1).abs().max() < 1e-3
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(8):
        loss = model.loss({"image": images})
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.05 * abs(losses[0]), losses
    with pytest.raises(RuntimeError, match="fit"):
        model.check_fitted()
    model.trained_steps += 1
    model.check_fitted()
    cached = model.loss({"image": images[:0], "features": model.frozen_features(images)})
    assert float(cached) == pytest.approx(float(model.loss({"image": images})))  # cached features: same loss
    scores, maps = model(_images(2, 72, 40))
    assert scores.shape == (2,) and maps.shape == (2, 72, 40)
    assert float(maps.max()) <= 0.0 and float(maps.min()) >= -1.0
    torch.testing.assert_close(scores, maps.flatten(1).amax(1))


def test_fastflow_zscore_map_against_training_maps() -> None:
    model = _fastflow(zscore_map=True).eval()
    train = _images(6)
    model.trained_steps += 1
    with pytest.raises(RuntimeError, match="zscore_map"):
        model.check_fitted()  # no reference yet
    with torch.no_grad():
        model.fit_reference([{"image": train[:4]}, {"image": train[4:]}])
        model.check_fitted()
        raw = model.paper_map(model.encode(model.frozen_features(train))[0], (64, 64))
        assert model.map_mean.shape == model.map_std.shape == (64, 64)
        torch.testing.assert_close(model.map_mean, raw.mean(0), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(model.map_std, raw.std(0, unbiased=False), atol=1e-5, rtol=1e-4)
        scores, maps = model(train)
        # the training maps, standardised: mean 0 and std 1 at every pixel
        assert maps.mean(0).abs().max() < 1e-3 and (maps.std(0, unbiased=False) - 1).abs().max() < 1e-2
        torch.testing.assert_close(scores, maps.flatten(1).amax(1))
        loaded = _fastflow(zscore_map=True).eval()  # the reference travels in the state dict
        loaded.load_state_dict(model.state_dict())
        torch.testing.assert_close(loaded(train)[1], maps)
        assert loaded(_images(2, 72, 40))[1].shape == (2, 72, 40)  # resized reference
        plain = _fastflow().eval()
        plain.load_state_dict(model.state_dict())
        plain.fit_reference([{"image": train}])  # without zscore_map: nothing to compute
        assert plain(train)[1].max() <= 0.0
    with pytest.raises(ValueError, match="one training image size"), torch.no_grad():
        model.fit_reference([{"image": _images(2, 64, 64)}, {"image": _images(2, 64, 96)}])


def test_cflow_shapes_loss_and_fibre_batches() -> None:
    model = _cflow()
    images = _images(2, 64, 96)
    fibres = model.fibres(model.frozen_features(images))
    assert [(len(e), c.shape[1], hw) for e, c, hw in fibres] == [
        (2 * 96, 128, (8, 12)),
        (2 * 24, 128, (4, 6)),
    ]
    e, c, (h, w) = fibres[0]  # fibre k = (image, row, col) in row-major order, condition = its position
    torch.testing.assert_close(c[h * w + 5], positional_encoding_2d(128, h, w)[:, 0, 5])
    before = float(model.loss({"image": images}))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    sizes = []
    for _ in range(3):
        for _, loss, n in model.fibre_batches({"image": images}, torch.Generator().manual_seed(0)):
            opt.zero_grad()
            loss.backward()
            opt.step()
            sizes.append(n)
    assert sizes[:4] == [64, 64, 64, 48]  # 192 fibres -> 3 batches of 64; 48 fibres -> one batch
    assert float(model.loss({"image": images})) < before - 0.05 * abs(before)
    with pytest.raises(RuntimeError, match="fit"):
        model.check_fitted()  # the reference comes after training
    model.fit_reference([{"image": images[:1]}, {"image": images[1:]}])
    logp = torch.stack(
        [
            model.log_likelihood(i, e, c).max()
            for i, (e, c, _) in enumerate(model.fibres(model.frozen_features(images)))
        ]
    )
    torch.testing.assert_close(model.logp_ref, logp)  # the largest training-fibre likelihood per scale
    scores, maps = model(_images(3, 72, 40))
    assert scores.shape == (3,) and maps.shape == (3, 72, 40)
    assert float(maps.max()) <= 0.0  # minus summed relative likelihoods
    torch.testing.assert_close(scores, maps.flatten(1).amax(1))


@pytest.mark.parametrize("make", [_fastflow, _cflow])
def test_scores_do_not_depend_on_the_batch(make) -> None:
    model = make()
    images = _images(3)
    if isinstance(model, FastFlowModel):
        model.trained_steps += 1
    else:
        model.logp_ref.fill_(0.0)
    with torch.no_grad():
        scores, maps = model(images)
        alone = model(images[1:2])
    torch.testing.assert_close(alone[0], scores[1:2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone[1], maps[1:2], atol=1e-5, rtol=1e-5)


def _train_losses(make, seed: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    torch.manual_seed(123)  # the global state must not matter for the model's own seed
    model = make(seed=seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    images, losses = _images(2), []
    for step in range(2):
        if isinstance(model, CFlowModel):
            batches = (
                loss
                for _, loss, _ in model.fibre_batches({"image": images}, torch.Generator().manual_seed(step))
            )
        else:
            batches = iter([model.loss({"image": images})])
        for loss in batches:  # lazily: each fibre-batch loss is computed after the previous step
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss))
    return losses, model.state_dict()


@pytest.mark.parametrize("make", [_fastflow, _cflow])
def test_seeded_runs_reproduce_exactly(make) -> None:
    first, state = _train_losses(make, seed=0)
    second, state_again = _train_losses(make, seed=0)
    other, _ = _train_losses(make, seed=1)
    assert first == second
    for key, value in state.items():
        if isinstance(value, torch.Tensor):  # exactly equal (logp_ref stays NaN until the reference pass)
            torch.testing.assert_close(value, state_again[key], rtol=0, atol=0, equal_nan=True)
    assert other != first


def test_cflow_lightning_steps_per_fibre_batch_and_schedule(synthetic_root: Path, tmp_path: Path) -> None:
    model = CFlow(
        optimizer={"class_path": "torch.optim.Adam", "init_args": {"lr": 1e-3}},
        scheduler={
            "class_path": "adx.models.components.flows.WarmupCosineLR",
            "init_args": {"max_epochs": 4},
        },
        coupling_blocks=2,
        strides=(8, 16),
        fiber_batch_size=64,
    )
    dm = MVTec(
        root=str(synthetic_root.parent),
        category=synthetic_root.name,
        image_size=64,
        batch_size=4,
        num_workers=0,
        val_source="none",
    )
    trainer = Trainer(
        max_epochs=2,
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm)
    # 12 images in 3 batches of 4: stride 8 -> 4*8*8 = 256 fibres = 4 steps; stride 16 -> 64 fibres = 1 step
    assert trainer.global_step == 2 * 3 * (4 + 1)
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(1e-3 * (1e-3 + (1 - 1e-3) * 0.5 * (1 + math.cos(math.pi * 2 / 4))))
    assert torch.isfinite(model.model.logp_ref).all()
    assert trainer.callback_metrics["train/loss_epoch"] > -1e3


# ---- configs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", FLOW_CONFIGS, ids=[f"{p.parent.name}/{p.name}" for p in FLOW_CONFIGS])
def test_configs_parse(path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    model = cfg["model"]
    assert model["class_path"] in ("adx.models.FastFlow", "adx.models.CFlow")
    if model["init_args"]["scheduler"] is not None:  # the schedule must build with the configured args
        opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = build(model["init_args"]["scheduler"], opt)
        if getattr(sched, "max_epochs", 0) is None:  # follows the trainer (set by TrainedModule)
            sched.set_horizon(cfg["trainer"]["max_epochs"])
        assert sched.max_epochs == cfg["trainer"]["max_epochs"], "schedule length != trainer.max_epochs"
    if path.name == "demo.yaml":
        assert cfg["data"]["class_path"] == "adx.data.Synthetic"


def test_every_flow_method_has_its_three_configs() -> None:
    assert [f"{p.parent.name}/{p.stem}" for p in FLOW_CONFIGS] == [
        f"{m}/{n}" for m in ("cflow", "fastflow") for n in ("bottle", "demo", "offline")
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "extra"), [("fastflow", []), ("fastflow", ["--model.zscore_map", "true"]), ("cflow", [])]
)
def test_demo_fit_then_test_from_checkpoint(method: str, extra: list[str], tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    common = quiet_cli(runs)
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / method / "demo.yaml"),
            *synthetic_cli(tmp_path / "data", n_train=16, batch_size=8),
            "--trainer.max_epochs",
            "2",
            *extra,
            *common,
        ]
    )
    (run,) = runs.glob(f"{method}/synthetic/*/v0")
    fitted = yaml.safe_load((run / "metrics.json").read_text())
    assert fitted["metrics"]["image_AUROC"] > 0.6
    main(["test", "--ckpt", str(run / "checkpoints" / "last.ckpt"), *common])
    (again,) = runs.glob(f"{method}/synthetic/*/v1")
    tested = yaml.safe_load((again / "metrics.json").read_text())
    assert tested["metrics"] == pytest.approx(fitted["metrics"])  # same model, same scores
