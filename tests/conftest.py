"""Shared fixtures: offline mode, a small synthetic dataset, the real data folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NoReturn

import pytest

os.environ.setdefault("ADX_OFFLINE", "1")  # never wait on a model hub in tests
if os.environ.get("PYTEST_XDIST_WORKER"):
    # one torch thread per worker (and per `adx` process a test starts): two workers fill two cores
    os.environ.setdefault("OMP_NUM_THREADS", "1")

SHARED_DATA = Path(os.environ.get("ADX_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny MVTec-layout category (12 train, 4 good + 6 defective test images of 64 px)."""
    from adx.data import make_synthetic

    return make_synthetic(
        tmp_path_factory.mktemp("synthetic") / "demo", n_train=12, n_test_good=4, n_test_bad=6, size=64
    )


def in_ci() -> bool:
    """True when the CI runner runs the tests (it sets CI=true)."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def has_shared_data() -> bool:
    return (SHARED_DATA / "mvtec_ad" / "screw").is_dir()


def no_shared_data() -> NoReturn:
    """Skip a test that needs ../shared/data when it is absent, or fail it in CI, where it must run."""
    message = f"real data not found at {SHARED_DATA} (set ADX_SHARED_DATA=/path/to/shared/data)"
    if in_ci():
        pytest.fail(f"{message}: with CI=true, tests that need real data must run, not skip", pytrace=False)
    pytest.skip(message)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """In CI a ``real_data`` test fails, instead of skipping itself, when ../shared/data is absent."""
    if in_ci() and item.get_closest_marker("real_data") is not None and not has_shared_data():
        no_shared_data()


# files whose tests take minutes: collected first, so that with ``pytest -n 2 --dist loadfile`` (the README's
# command) one worker starts on them at once while the other takes everything else
LONG_FILES = ("tests/integration/test_quality_floor.py",)


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the collection order of the files
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Move the tests of LONG_FILES to the front, keeping the order within each part."""
    items.sort(key=lambda item: item.nodeid.split("::")[0] not in LONG_FILES)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real MVTec-layout images of ../shared/data (skip when absent; in CI, fail)."""
    if not has_shared_data():
        no_shared_data()
    return SHARED_DATA


def synthetic_cli(
    root: Path, size: int = 64, n_train: int = 12, n_good: int = 4, n_bad: int = 6, batch_size: int = 4
) -> list[str]:
    """``--data.*`` arguments of a small synthetic dataset at ``root`` for ``adx`` command tests."""
    values = {
        "root": root,
        "image_size": size,
        "size": size,
        "n_train": n_train,
        "n_test_good": n_good,
        "n_test_bad": n_bad,
        "batch_size": batch_size,
        "num_workers": 0,
    }
    return [arg for key, value in values.items() for arg in (f"--data.{key}", str(value))]


def quiet_cli(runs: Path) -> list[str]:
    """``adx`` arguments of a test run: run folders under ``runs``, no progress bar, no heatmap panels."""
    return ["--root_dir", str(runs), "--trainer.enable_progress_bar", "false", "--heatmaps.enabled", "false"]


def small_datamodule(root: Path, image_size: int = 64, **kw: Any) -> Any:
    """An MVTec data module over a synthetic category, batches of 4, 30 % of the test split validating."""
    from adx.data import MVTec

    settings = {"batch_size": 4, "eval_batch_size": 4, "num_workers": 0, "val_source": "test_split"}
    settings.update(val_ratio=0.3, **kw)
    return MVTec(root=str(root.parent), category=root.name, image_size=image_size, **settings)


def small_trainer(folder: Path, max_epochs: int = 1, writer: bool = True, **kw: Any) -> Any:
    """A quiet trainer (no logger, checkpoints, progress bar or sanity check) with adx's calibration and,
    unless ``writer=False``, its results writer (metrics.json in ``folder``)."""
    from lightning.pytorch import Trainer

    from adx.callbacks import Calibration, ResultsWriter

    return Trainer(
        max_epochs=max_epochs,
        default_root_dir=folder,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        callbacks=[Calibration(), ResultsWriter()] if writer else [Calibration()],
        **kw,
    )


def fit_counting_frozen_passes(
    module: Any, root: Path, folder: Path, epochs: int = 2, **trainer_kw: Any
) -> tuple[list[float], int]:
    """Fit ``module`` on ``root`` (batch 4) and return its training losses, one per step, and how many
    training steps ran its torch model's ``frozen_features`` (validation runs in eval mode and is not
    counted): the frozen-feature cache should spare every epoch after the first."""
    from lightning.pytorch import Callback

    class Losses(Callback):
        def __init__(self) -> None:
            self.values: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            self.values.append(float(outputs["loss"]))

    passes = 0
    frozen = module.model.frozen_features

    def counted(images: Any) -> Any:
        nonlocal passes
        passes += int(module.model.training)
        return frozen(images)

    module.model.frozen_features = counted
    losses = Losses()
    trainer = small_trainer(folder, epochs, writer=False, **trainer_kw)
    trainer.callbacks.append(losses)
    trainer.fit(module, datamodule=small_datamodule(root))
    return losses.values, passes


def check_frozen_feature_cache(make: Any, root: Path, folder: Path, exact: bool = True) -> None:
    """``make(cache_mode)`` -> a fresh module. Fitted from seed 0 for 2 epochs (batch 4) with the cache in memory
    and without: the same losses and weights (bit for bit when ``exact``), and the frozen network ran in the
    training steps of the first epoch only with the cache, in every step without it."""
    import torch
    from lightning.pytorch import seed_everything

    runs = {}
    for mode in ("memory", "off"):
        seed_everything(0, verbose=False)
        module = make(mode)
        runs[mode] = (module, *fit_counting_frozen_passes(module, root, folder / mode))
    (cached, cached_losses, cached_passes), (plain, plain_losses, plain_passes) = runs.values()
    assert len(cached_losses) == len(plain_losses) == 6  # 12 training images, batch 4, 2 epochs
    if exact:
        assert cached_losses == plain_losses, "bit for bit: cached features are the computed ones"
    else:
        assert cached_losses == pytest.approx(plain_losses, rel=1e-5, abs=1e-6)
    for (name, a), (_, b) in zip(
        cached.model.named_parameters(), plain.model.named_parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0 if exact else 1e-4, atol=0 if exact else 1e-6, msg=name)
    assert (cached_passes, plain_passes) == (3, 6), (
        "the cache spares the frozen network after the first epoch"
    )
    assert int(cached.model.trained_steps) == 6


def check_bf16_step(make: Any, root: Path, folder: Path) -> None:
    """One training step of ``make("auto")`` under CPU bf16 autocast gives a finite loss and counts the step."""
    import math

    from lightning.pytorch import seed_everything

    seed_everything(0, verbose=False)
    module = make("auto")
    losses, _ = fit_counting_frozen_passes(
        module, root, folder, 1, precision="bf16-mixed", limit_train_batches=1
    )
    assert len(losses) == 1 and math.isfinite(losses[0])
    assert int(module.model.trained_steps) == 1


def assert_deterministic_and_traceable(model: Any, x: Any) -> None:
    """``model(x)`` twice gives equal outputs, and its jit trace gives the same within float rounding."""
    import torch

    with torch.no_grad():
        first, again = model(x), model(x)
        traced = torch.jit.trace(model, x, check_trace=False, strict=False)(x)
    for a, b, c in zip(first, again, traced, strict=True):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
