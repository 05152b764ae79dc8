"""Lightning adapter for GANomaly: two Adam optimizers, a generator step then a discriminator step per batch."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from adx.models.components.optim import build_optimizers, spec
from adx.models.ganomaly.torch_model import GANomalyModel
from adx.models.trained import TrainedModule

ADAM = spec("torch.optim.Adam", lr=2e-4, betas=(0.5, 0.999))


class GANomaly(TrainedModule):
    """GANomaly (arXiv 1805.06725); model arguments are GANomalyModel's, with its defaults.

    Manual optimisation: every batch takes one generator step (adversarial + contextual + encoder loss),
    then one discriminator step (BCE, real vs reconstructed), each with its own optimizer. The networks are
    built for the data module's image size (tile size when tiling) when fitting starts, unless
    ``--model.input_size`` fixes it; checkpoints rebuild them at their stored size.

    Args:
        optimizer: the generator's optimizer: the paper's Adam, lr 2e-4, betas (0.5, 0.999).
        discriminator_optimizer: the discriminator's, the same Adam.
        scheduler: none in the paper; when given, one is built for each optimizer.
    """

    has_backbone = False
    """No pretrained backbone: every network learns from scratch."""
    needs_tile_training = True
    """The networks are sized for the training input: with tiling they must train on the tiles they score."""

    def __init__(
        self,
        optimizer: OptimizerCallable = ADAM,
        discriminator_optimizer: OptimizerCallable = ADAM,
        scheduler: LRSchedulerCallable | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(optimizer, scheduler, feature_cache="off")
        self.save_hyperparameters(ignore=["optimizer", "discriminator_optimizer", "scheduler"])
        self.model = GANomalyModel(**kwargs)
        self.discriminator_optimizer_spec = discriminator_optimizer
        self.automatic_optimization = False

    def _data_size(self) -> tuple[int, int] | None:
        dm = getattr(getattr(self, "_trainer", None), "datamodule", None)
        grid = getattr(dm, "tiling", None)
        size = grid.tile if grid is not None else getattr(dm, "image_size", None)
        return None if size is None else (int(size[0]), int(size[1]))

    def configure_model(self) -> None:
        """Build the networks for the data's input size before the optimizers (a no-op once built)."""
        size = self._data_size()
        if not self.model.built and size is not None:
            self.model.build(size)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        size = self._data_size()
        if size is not None and self.model.size != size:
            built = self.model.size
            raise ValueError(
                f"GANomaly's networks were built for {built[0]}x{built[1]} px (--model.input_size or the "
                f"checkpoint), but the data gives {size[0]}x{size[1]} px: set --data.image_size (or "
                f"--data.tile_size) to {built[0]}, or drop --model.input_size"
            )

    def configure_optimizers(self) -> Any:
        g, d = self.model._networks()
        out = [
            build_optimizers(
                g.parameters(), self.optimizer_spec, self.scheduler_spec, self.scheduler_interval
            ),
            build_optimizers(
                d.parameters(),
                self.discriminator_optimizer_spec,
                self.scheduler_spec,
                self.scheduler_interval,
            ),
        ]
        if self.scheduler_spec is None:
            return out
        for item in out:
            self._follow_trainer(item["lr_scheduler"]["scheduler"])
        return [item["optimizer"] for item in out], [item["lr_scheduler"] for item in out]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        opt_g, opt_d = self.optimizers()
        step = {**batch, "anomaly_step": self.global_step, "anomaly_rank": self.global_rank}
        g_loss, d_loss = self.model.train_step(
            self.model.relight(step), opt_g, opt_d, self.manual_backward, self._checked
        )
        n = len(batch["image"])
        self.log("train/loss", g_loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=n)
        self.log("train/d_loss", d_loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=n)
        for name, value in self.model.loss_terms.items():
            self.log(f"train/{name}", value, on_step=False, on_epoch=True, batch_size=n)
        self.log(
            "train/d_reinits",
            self.model.d_reinits.float(),
            on_step=False,
            on_epoch=True,
            reduce_fx="max",
            batch_size=n,
        )
        if self.scheduler_interval == "step":
            self._step_schedulers()
        return g_loss

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        if self.scheduler_interval == "epoch":
            self._step_schedulers()

    def _step_schedulers(self) -> None:
        schedulers = self.lr_schedulers()
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
            if scheduler is not None:
                scheduler.step()
