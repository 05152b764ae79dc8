"""Lightning's ModelCheckpoint, with ``last.ckpt`` written every epoch also when no best is kept."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint


class Checkpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` follows every epoch when ``save_top_k`` is 0.

    Lightning writes ``last.ckpt`` only in a step where a top-k checkpoint was written, so with nothing
    to rank by (adx sets ``save_top_k`` 0 when no ``monitor`` is given) a run killed at epoch 40 of 50
    left no checkpoint to resume from. Here ``last.ckpt`` is written at the end of every epoch instead
    (every ``every_n_epochs``-th, when that is set), after validation, so it holds that epoch's
    calibration. Only public Lightning APIs are used (``Trainer.save_checkpoint``).
    """

    def __init__(self, *args: Any, every_n_epochs: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, every_n_epochs=every_n_epochs, **kwargs)
        self.last_every = every_n_epochs if every_n_epochs is not None else 1

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        due = self.last_every >= 1 and (trainer.current_epoch + 1) % self.last_every == 0
        if due and self.save_top_k == 0 and self.save_last and self.dirpath and not trainer.sanity_checking:
            path = str(Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}")
            trainer.save_checkpoint(path, weights_only=False)  # resumable: optimizer and loop states too
            # tell Lightning this file is ours, so its own save of ``last`` overwrites it instead of
            # versioning a second copy (``last-v1.ckpt``)
            self.last_model_path = path
