"""Lightning base classes shared by every method.

``AnomalyModule`` owns the calibration (a :class:`~adx.calibration.Calibrator` whose buffers travel with
the checkpoint) and routes validation, test and predict through the one inference path,
:class:`~adx.inference.InferenceModule`. Subclasses wrap a plain ``nn.Module`` as ``self.model`` whose
``forward(images)`` returns ``(image_scores [B], anomaly_maps [B,H,W])`` in raw units without Python
branches on tensor values, and which may define ``check_fitted()`` (raises RuntimeError naming what to do).
``MemoryBankModule`` is the adapter for methods fitted from one pass over the training images:
``model.update(images)`` per batch, ``model.fit()`` after the last one. Gradient-trained methods use
``adx.models.trained.TrainedModule``. With several processes each rank updates on its own slice of the
training images and ``fit()`` combines the ranks once (adx.distributed; docs/distributed.md).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor

import adx
from adx.calibration import Calibrator
from adx.distributed import fit_without_ddp_wrapper
from adx.inference import InferenceModule
from adx.tiling import TileGrid, check_tile_multiple

CHECKPOINT_FORMAT = 3
"""Layout version of adx checkpoints; 3 = calibration in ``calibrator.*``, fitted input size stored."""


class CheckpointError(RuntimeError):
    """A checkpoint that this adx version or this method cannot load."""


CALIBRATED_KEYS = ("pred_score", "norm_map", "pred_label", "pred_mask")


class AnomalyModule(LightningModule):
    """Val/test/predict steps through the inference module, and the calibration they need."""

    model: torch.nn.Module

    def __init__(self) -> None:
        super().__init__()
        self.calibrator = Calibrator()
        # (H, W) of the images the model was fitted on; (0, 0) until fit starts (with tiling: the canvas)
        self.register_buffer("input_size", torch.zeros(2, dtype=torch.long))
        # [tile_h, tile_w, stride_h, stride_w] of the tiles the canvas is cut into; zeros: no tiling
        self.register_buffer("tiling", torch.zeros(4, dtype=torch.long))

    # ---- calibration -------------------------------------------------------------------------
    @property
    def calibrated(self) -> bool:
        """True once thresholds and normalisation statistics are set."""
        return self.calibrator.calibrated

    @property
    def threshold_source(self) -> str:
        """Where the thresholds came from, in words."""
        return self.calibrator.source

    def set_calibration(self, source: str, n_normal: int = 0, n_anomalous: int = 0, **values: Any) -> None:
        """Write thresholds / min / max, their source and the number of images behind them."""
        self.calibrator.set(source, n_normal, n_anomalous, **values)

    # ---- the inference path ------------------------------------------------------------------
    @property
    def tile_grid(self) -> TileGrid | None:
        """The tile grid the model was fitted with (from its buffers, so checkpoints restore it); None: off."""
        h, w = (int(v) for v in self.input_size)
        return TileGrid.from_tensor((h, w), self.tiling) if h > 0 and w > 0 else None

    def inference_module(self) -> InferenceModule:
        """Resize -> model (tiled when fitted on tiles) -> calibration for raw image batches of any size.

        Shares this module's parts. With tiling the model runs on the grid's tiles of the resized canvas and
        the maps are blended back (:class:`adx.tiling.Tiler`).
        """
        h, w = (int(v) for v in self.input_size)
        return InferenceModule(
            self.model, self.calibrator, (h, w) if h > 0 and w > 0 else None, self.tile_grid
        )

    def check_fitted(self) -> None:
        """Raise RuntimeError (saying what to do) when the model cannot score images yet."""
        check = getattr(self.model, "check_fitted", None)
        if check is not None:
            check()

    def on_fit_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        check_data = getattr(self.model, "check_datamodule", None)  # a model's own input checks, before work
        if check_data is not None and dm is not None:
            check_data(dm)
        size = getattr(dm, "image_size", None)
        if size is not None:
            self.input_size.copy_(torch.as_tensor(tuple(size), dtype=torch.long))
        grid: TileGrid | None = getattr(dm, "tiling", None)
        self.tiling.copy_(grid.as_tensor() if grid is not None else torch.zeros(4, dtype=torch.long))
        if grid is not None:
            self.check_tiling(grid, bool(getattr(dm, "train_on_tiles", True)))

    # tiles must be trained on when the model is tied to the input grid (PaDiM's Gaussian per position)
    needs_tile_training = False

    def check_tiling(self, grid: TileGrid, train_on_tiles: bool) -> None:
        """Raise AdxDataError when the tiles do not suit the backbone, or the model must train on tiles."""
        backbone = getattr(self.model, "backbone", None)
        strides = tuple(getattr(backbone, "strides", ()) or ())
        if strides:
            what = f"the largest stride of {getattr(backbone, 'name', 'the backbone')}'s maps used by {type(self).__name__}"
            check_tile_multiple(grid, max(strides), what)
        if not train_on_tiles and (self.needs_tile_training or getattr(self.model, "zscore_map", False)):
            from adx.data.samples import AdxDataError

            raise AdxDataError(
                f"{type(self).__name__} compares every map position with training statistics of the same position, "
                "so it must be trained on the tiles it scores: drop --data.train_tiles false (training on tiles "
                "is the default with --data.tile_size)."
            )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        state_dict.setdefault(prefix + "tiling", torch.zeros(4, dtype=torch.long))  # written before tiling
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---- checkpoints -------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["adx_format"] = CHECKPOINT_FORMAT
        checkpoint["adx_version"] = adx.__version__
        checkpoint["adx_model"] = type(self).__name__

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_checkpoint(checkpoint, type(self).__name__)

    # ---- steps -------------------------------------------------------------------------------
    def _evaluate(self, batch: dict[str, Any], calibrated: bool) -> dict[str, Any]:
        self.check_fitted()
        out = self.inference_module()(batch["image"])._asdict()
        if not (calibrated and self.calibrated):
            out = {k: v for k, v in out.items() if k not in CALIBRATED_KEYS}
        out.update({k: v for k, v in batch.items() if k not in out})
        return out

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        out = self._evaluate(batch, calibrated=False)
        out.pop("image")
        return out

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        return self._evaluate(batch, calibrated=True)

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        return self._evaluate(batch, calibrated=True)


def check_checkpoint(
    checkpoint: dict[str, Any], model: str | None = None, source: str = "the checkpoint"
) -> None:
    """Raise CheckpointError unless ``checkpoint`` is an adx checkpoint of this format (and of ``model``)."""
    fmt, written_by = checkpoint.get("adx_format"), checkpoint.get("adx_model")
    if fmt is None:
        raise CheckpointError(
            f"{source} was not written by this version of adx (no checkpoint format; older adx releases and "
            "other tools are not readable). Re-fit the model with `adx fit`."
        )
    if fmt != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{source} has checkpoint format {fmt} (adx {checkpoint.get('adx_version', '?')}); this adx "
            f"{adx.__version__} reads format {CHECKPOINT_FORMAT}. Re-fit the model, or use the adx that wrote it."
        )
    if model is not None and written_by is not None and written_by != model:
        raise CheckpointError(
            f"{source} holds a {written_by} model, but the config builds {model}. Drop --config to use the "
            f"run's own config, or pass a {model} checkpoint."
        )


class MemoryBankModule(AnomalyModule):
    """Adapter for training-free methods: one epoch of ``model.update``, then ``model.fit``.

    Under a DDP strategy every rank reads a disjoint slice of the training images (``one_pass`` tells the
    data module so) and ``model.fit()`` gathers or reduces across ranks once; the module is not wrapped in
    DistributedDataParallel, which has no gradients to reduce here and would add a collective per batch.
    """

    one_pass = True
    """Read by the data module: training images are seen once, in order, each by one rank only."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def setup(self, stage: str) -> None:
        if stage == "fit":
            fit_without_ddp_wrapper(self.trainer)

    def configure_optimizers(self) -> None:
        """Nothing to optimise: the model is fitted from one pass over the training images."""
        return None

    def on_train_epoch_end(self) -> None:
        if self.trainer.max_epochs != 1:
            warnings.warn(
                f"{type(self).__name__} is fitted in one pass: stopping after epoch 1 "
                f"(trainer.max_epochs is {self.trainer.max_epochs}; set it to 1 to silence this)",
                stacklevel=1,
            )
            self.trainer.should_stop = True

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if self.current_epoch == 0:
            self.model.update(batch["image"])
        return None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Fit here, not in on_train_epoch_end: checkpoint callbacks run before the module's epoch-end hook.
        if self.current_epoch == 0 and batch_idx == self.trainer.num_training_batches - 1:
            self.model.fit()


class ZeroShotModule(AnomalyModule):
    """Adapter for methods that fit from no normal images: what they know comes with them (prompts, weights).

    ``adx fit`` trains nothing: with ``--data.k_shot 0`` (no training images) or any training set, which is
    ignored, it runs validation to calibrate the thresholds (``--data.val_source test_split``, ``test`` or
    ``none``), writes ``checkpoints/last.ckpt`` and tests. The thresholds' source says the model was fitted
    on no normal images. Everything else (inference module, export, serving) is the common path.
    """

    zero_shot = True
    """Read by the CLI: skip the training loop, calibrate by a validation pass, then save and test."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def configure_optimizers(self) -> None:
        """Nothing to optimise."""
        return None

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Never asked for: the CLI skips the training loop of a zero-shot model."""
        return None


def select(batch: dict[str, Any], keep: Tensor) -> dict[str, Any]:
    """The rows of a batch dict where the bool tensor ``keep`` [B] is True (tensors, lists and feature lists)."""
    idx = keep.nonzero().flatten()
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, Tensor) and value.ndim > 0 and len(value) == len(keep):
            out[key] = value[idx.to(value.device)]
        elif isinstance(value, list | tuple) and value and isinstance(value[0], Tensor):
            out[key] = [v[idx.to(v.device)] for v in value]  # per-scale feature lists
        elif isinstance(value, list | tuple) and len(value) == len(keep):
            out[key] = [value[i] for i in idx.tolist()]
        else:
            out[key] = value
    return out
