"""Lightning's ModelCheckpoint, with ``last.ckpt`` written every epoch also when no best is kept."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint


class Checkpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` follows every epoch when ``save_top_k`` is 0.

    Lightning writes ``last.ckpt`` only in a step where a top-k checkpoint was written, so with nothing
    to rank by (adx sets ``save_top_k`` 0 when no ``monitor`` is given) a run killed at epoch 40 of 50
    left no checkpoint to resume from. Here ``last.ckpt`` is written at the end of every epoch instead
    (every ``every_n_epochs``-th, when that is set).
    """

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_only(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_only(trainer)

    def _save_last_only(self, trainer: pl.Trainer) -> None:
        every = self._every_n_epochs
        due = every >= 1 and (trainer.current_epoch + 1) % every == 0  # --checkpoint.every_n_epochs
        if (
            due
            and self.save_top_k == 0
            and self.save_last
            and not self._should_skip_saving_checkpoint(trainer)
        ):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
