"""``adx``: the LightningCLI subclass behind ``adx fit|validate|test|predict``.

Additions to LightningCLI: each run gets a fresh folder ``<root_dir>/<model>/<dataset>/<category>/v<N>/``;
calibration, results and heatmap callbacks are always on (configured as ``--calibration.*``,
``--results.*``, ``--heatmaps.*``); ``fit`` tests the fitted model when the data has a test split;
``--ckpt FILE`` restores a run's saved config, so ``adx test --ckpt last.ckpt`` needs nothing else.
With ``--trainer.devices N --trainer.strategy ddp`` all N processes share rank 0's run folder
(docs/distributed.md).
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger

import adx.models  # noqa: F401  (importing registers every model for subclass resolution)
from adx.callbacks import Calibration, Checkpoint, HeatmapWriter, ResultsWriter
from adx.data import AnomalyDataModule
from adx.models.base import AnomalyModule, CheckpointError, check_checkpoint
from adx.models.components.weights import restoring_weights
from adx.runs import RunDirError, launched_as_worker, run_dir_for_this_process

CONFIG_KEY = "adx_config"
QUIET = (  # Lightning notices that do not apply to adx's frozen backbones and one-pass methods
    r".*configure_optimizers.* returned `None`",
    r"Found \d+ module\(s\) in eval mode",
    r".*isinstance\(treespec, LeafSpec\)",
    r"The number of training batches .* is smaller than the logging interval",
    r".*litlogger",
    r"The dirpath has changed from",  # resuming writes a new run folder; adx says so itself
)


class AdxSaveConfig(SaveConfigCallback):
    """Saves config.yaml in the run folder and embeds it in every checkpoint."""

    def on_save_checkpoint(self, trainer: Trainer, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        checkpoint[CONFIG_KEY] = self.parser.dump(self.config, skip_none=False)


class AdxCLI(LightningCLI):
    """LightningCLI with run folders, always-on adx callbacks and fit-then-test."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        self.run_dir: Path | None = None
        super().__init__(
            model_class=AnomalyModule,
            subclass_mode_model=True,
            datamodule_class=AnomalyDataModule,
            subclass_mode_data=True,
            save_config_callback=AdxSaveConfig,
            save_config_kwargs={"overwrite": False},
            trainer_defaults={"num_sanity_val_steps": 0},
            parser_kwargs={"parser_mode": "omegaconf"},
            auto_configure_optimizers=False,
            load_from_checkpoint_support=False,
            seed_everything_default=0,
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--root_dir",
            type=str,
            default="results",
            help="Base folder of run folders <root_dir>/<model>/<dataset>/<category>/v<N>/.",
        )
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=True,
            help="After fit, evaluate on the test split (when the data has one).",
        )
        parser.add_lightning_class_args(Checkpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-epoch{epoch:03d}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_lightning_class_args(Calibration, "calibration")
        parser.add_lightning_class_args(ResultsWriter, "results")
        parser.add_lightning_class_args(HeatmapWriter, "heatmaps")

    def _parse_ckpt_path(self) -> None:
        """Configs come from the run's saved config.yaml (see expand_ckpt), not from hyperparameters."""

    def instantiate_classes(self) -> None:
        """Build model, data and trainer; with a checkpoint to restore, backbones load no weights file."""
        ckpt = _sub(self.config, self.subcommand).get("ckpt_path") if self.subcommand else None
        if ckpt:  # the checkpoint holds the backbone weights and their provenance
            with restoring_weights():
                super().instantiate_classes()
        else:
            super().instantiate_classes()

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        cfg = _sub(self.config_init, self.subcommand).get("trainer") or {}
        if cfg.get("default_root_dir"):
            self.run_dir = Path(cfg["default_root_dir"])
            self.run_dir.mkdir(parents=True, exist_ok=True)
        else:  # one folder for all processes of a distributed run: rank 0 makes it, the others reuse it
            dm = self.datamodule
            try:
                self.run_dir = run_dir_for_this_process(
                    Path(_sub(self.config_init, self.subcommand)["root_dir"]),
                    type(self.model).__name__.lower(),
                    getattr(dm, "name", "data"),
                    str(getattr(dm, "category", None) or "default"),
                )
            except RunDirError as exc:
                raise SystemExit(f"adx: {exc}") from None
        kwargs["default_root_dir"] = str(self.run_dir)
        if cfg.get("logger") in (None, True):
            kwargs["logger"] = TensorBoardLogger(
                str(self.run_dir), name="", version="", default_hp_metric=False
            )
        checkpoint = _sub(self.config_init, self.subcommand)["checkpoint"]
        if checkpoint.monitor is None:
            checkpoint.save_top_k = 0  # nothing to rank by: keep last.ckpt only
        if checkpoint.dirpath is None:
            checkpoint.dirpath = str(self.run_dir / "checkpoints")
        _say(f"adx: run folder {self.run_dir}")
        ckpt_path = _sub(self.config, self.subcommand).get("ckpt_path") if self.subcommand == "fit" else None
        if ckpt_path and not launched_as_worker():
            print(
                f"adx: resuming training from {ckpt_path} into this new run folder (the old one is left as it "
                "was; best-checkpoint ranking starts afresh here)",
                file=sys.stderr,
            )
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        """List the k-shot images of a few-shot run in its run folder (k_shot.txt); zero-shot: no training."""
        dm = self.datamodule
        zero_shot = bool(getattr(self.model, "zero_shot", False))
        if getattr(dm, "k_shot", None) == 0 and not zero_shot:
            raise SystemExit(
                f"adx: --data.k_shot 0 gives no training images, and {type(self.model).__name__} learns from "
                "normal images: pass --data.k_shot 1 or more (or leave it unset), or use a zero-shot model."
            )
        if zero_shot:
            self.trainer.limit_train_batches = 0  # nothing to train: after_fit calibrates and saves
        if getattr(dm, "k_shot", None) and self.run_dir is not None:
            dm.setup("fit")
            if not launched_as_worker():  # rank 0 writes it, once
                _say(f"adx: k-shot images listed in {dm.write_manifest(self.run_dir)}")

    def after_fit(self) -> None:
        """Evaluate the fitted model on the test split, in the same run folder.

        A zero-shot model (``ZeroShotModule``) trains nothing: its training loop is skipped, so it is
        calibrated here by a validation pass and its checkpoint written before the test.
        """
        if getattr(self.model, "zero_shot", False) and self.trainer.state.status == "finished":
            self._fit_zero_shot()
        if (
            _sub(self.config, self.subcommand).get("test_after_fit")
            and self.trainer.state.status == "finished"
        ):
            self.datamodule.setup("test")
            if getattr(self.datamodule, "test_samples", None):
                self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
        self._report()

    def _fit_zero_shot(self) -> None:
        self.datamodule.setup("validate")
        if getattr(self.datamodule, "val_samples", None):
            self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
        if self.run_dir is not None and self.trainer.is_global_zero:
            path = self.run_dir / "checkpoints" / "last.ckpt"
            path.parent.mkdir(parents=True, exist_ok=True)
            self.trainer.save_checkpoint(path, weights_only=False)
            _say(f"adx: zero-shot model calibrated and saved in {path}")

    def after_validate(self) -> None:
        self._report()

    def after_test(self) -> None:
        self._report()

    def after_predict(self) -> None:
        self._report()

    def _report(self) -> None:
        _say(f"adx: results in {self.run_dir}")


def _say(message: str) -> None:
    """Print to stderr on rank 0 only (the other processes of a distributed run stay quiet)."""
    if not launched_as_worker():
        print(message, file=sys.stderr)


def _sub(config: Any, subcommand: str | None) -> Any:
    """The part of a parsed config that belongs to ``subcommand`` (the whole config without one)."""
    return config[subcommand] if subcommand else config


def _option_value(args: list[str], name: str) -> tuple[int, str | None]:
    """Position and value of ``--name VALUE`` or ``--name=VALUE`` in args (-1, None if absent)."""
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return i, args[i + 1]
        if arg.startswith(name + "="):
            return i, arg.split("=", 1)[1]
    return -1, None


def saved_config(ckpt: Path, state: dict[str, Any]) -> Path:
    """The config.yaml of the run that wrote ``ckpt`` (next to it or above), else the copy in ``state``."""
    for folder in (ckpt.parent, ckpt.parent.parent):
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    if CONFIG_KEY not in state:
        raise SystemExit(
            f"adx: {ckpt} has no embedded config and no config.yaml beside it; pass --config too."
        )
    out = Path(tempfile.mkdtemp(prefix="adx_")) / "config.yaml"
    out.write_text(state[CONFIG_KEY])
    return out


def expand_ckpt(args: list[str]) -> list[str]:
    """Turn ``--ckpt FILE`` into ``--ckpt_path FILE``, adding the run's saved config if none is given."""
    i, value = _option_value(args, "--ckpt")
    if value is None:
        return args
    ckpt = Path(value)
    if not ckpt.is_file():
        raise SystemExit(f"adx: checkpoint {ckpt} does not exist.")
    try:
        state = load_checkpoint(ckpt)
    except Exception as exc:  # not a torch file, truncated, unsafe objects inside, ...
        raise SystemExit(f"adx: cannot read checkpoint {ckpt} ({type(exc).__name__}: {exc}).") from exc
    try:
        check_checkpoint(state, source=f"checkpoint {ckpt}")
    except CheckpointError as exc:
        raise SystemExit(f"adx: {exc}") from None
    rest = args[:i] + args[i + (1 if "=" in args[i] else 2) :]
    if "--config" not in rest and not any(a.startswith("--config=") for a in rest) and rest:
        rest = [rest[0], "--config", str(saved_config(ckpt, state)), *rest[1:]]
        if _option_value(rest, "--trainer.default_root_dir")[1] is None:
            # a run folder pinned in the saved config (sweep trials) belongs to that run: write a new one
            rest.insert(3, "--trainer.default_root_dir=null")
    if _option_value(rest, "--weights_only")[1] is None:
        rest = [*rest, "--weights_only", "true"]  # tensors and plain values only (see load_checkpoint)
    return [*rest, "--ckpt_path", str(ckpt)]


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``: tensors, containers and plain values, nothing executable.

    adx checkpoints hold only those (the config is embedded as YAML text, weights provenance and calibration
    sources as strings), so no allowlist of classes is needed; a file that holds pickled objects is refused.
    """
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return state if isinstance(state, dict) else {}


def main(args: list[str] | None = None) -> None:
    """Console entry point ``adx``."""
    for message in QUIET:
        warnings.filterwarnings("ignore", message=message)
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["sweep"]:  # adx sweep: a search over config overrides, one `adx fit` per trial
        from adx.sweep import main as sweep_main

        return sweep_main(argv[1:])
    if argv[:1] == ["export"]:  # adx export: the inference module as an ONNX/OpenVINO/TorchScript bundle
        from adx.deploy_cli import export_main

        export_main(argv[1:])
        return None
    if argv[:1] == ["serve"]:  # adx serve: the inspection page and JSON API (docs/serve.md)
        from adx.serve import main as serve_main

        serve_main(argv[1:])
        return None
    if argv[:1] == ["predict"] and _option_value(argv, "--bundle")[1] is not None:
        from adx.deploy_cli import predict_bundle_main

        predict_bundle_main(argv[1:])
        return None
    if argv[:1] in (["-h"], ["--help"]):
        print("adx sweep --help: grid/random/TPE search over config overrides (docs/sweeps.md)")
        print("adx export --help: a fitted checkpoint as an ONNX/OpenVINO/TorchScript bundle")
        print(
            "adx predict --bundle DIR --data.path PATH: predict with a bundle, no Lightning (docs/deploy.md)\n"
        )
    argv = expand_ckpt(argv)
    if argv[:1] == ["predict"] and _option_value(argv, "--return_predictions")[1] is None:
        # rows and heatmaps are written per batch; keeping every output would grow with the image count
        argv.append("--return_predictions=false")
    sys.argv = [sys.argv[0], *argv]
    AdxCLI()


if __name__ == "__main__":
    main()
