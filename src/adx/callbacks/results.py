"""Test and predict outputs to files: metrics.json and scores.csv (test), predictions.csv (predict)."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from adx.callbacks.calibration import calibration_state
from adx.callbacks.collect import Collector, OutputsCallback
from adx.distributed import all_reduce_sum, gather_list, is_distributed, rank, rank_zero_result, world_size
from adx.metrics import compute_metrics, format_table

ROW_KEYS = ("path", "defect_type", "label", "image_score", "pred_score", "pred_label")


def run_dir(trainer: Trainer) -> Path:
    """The folder this run writes into (the CLI makes it a fresh versioned folder)."""
    return Path(trainer.default_root_dir)


def exclusive_path(folder: Path, name: str) -> Path:
    """``folder/name``, or ``name`` with a numeric suffix if that file exists: never overwrite results."""
    path, stem, suffix, i = folder / name, Path(name).stem, Path(name).suffix, 1
    while path.exists():
        path, i = folder / f"{stem}_{i}{suffix}", i + 1
    return path


def write_rows(path: Path, rows: dict[str, list[Any]]) -> None:
    """Write a column dict as CSV."""
    writer = RowWriter(path)
    writer.write(rows)
    writer.close()


def _columns(data: dict[str, Any]) -> dict[str, list[Any]]:
    return {
        k: (v.tolist() if isinstance(v, torch.Tensor) else list(v)) for k, v in data.items() if k in ROW_KEYS
    }


class ResultsWriter(OutputsCallback):
    """Computes image/pixel AUROC, AUPRO and F1-max on the test set; writes metrics.json and CSVs.

    Pixel metrics use maps at the model's input size, area-downsampled when the long side exceeds
    ``metrics_max_size`` (masks nearest), to bound memory at high resolution. With several processes,
    every rank's outputs are gathered, rank 0 computes the metrics and writes the one metrics.json,
    scores.csv and predictions.csv of the run.
    """

    def __init__(self, pixel_metrics: bool = True, metrics_max_size: int = 512) -> None:
        self.pixel_metrics, self.metrics_max_size = pixel_metrics, metrics_max_size
        keys = ROW_KEYS + (("anomaly_map", "mask", "has_mask") if pixel_metrics else ())
        self.collector = Collector(keys)
        self._t0 = 0.0
        self.fit_metrics: dict[str, float] = {}
        self._rows: RowWriter | None = None

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Keep the final epoch's logged train/val values (val/loss, ...) for metrics.json."""
        self.fit_metrics = {
            k: round(float(v), 6)
            for k, v in trainer.callback_metrics.items()
            if k.startswith(("val/", "train/")) and not k.endswith("_step")
        }
        if self.fit_metrics:
            self.fit_metrics["epochs"] = trainer.current_epoch

    def _add(self, outputs: dict[str, Any]) -> None:
        if self.pixel_metrics and "anomaly_map" in outputs:
            outputs = dict(outputs)
            maps, masks = outputs["anomaly_map"], outputs["mask"].float()
            if max(maps.shape[-2:]) > self.metrics_max_size:
                scale = self.metrics_max_size / max(maps.shape[-2:])
                size = [max(1, round(s * scale)) for s in maps.shape[-2:]]
                maps = F.interpolate(maps[:, None], size=size, mode="area")[:, 0]
                masks = F.interpolate(masks, size=size, mode="nearest")
            outputs["anomaly_map"], outputs["mask"] = maps, masks
        self.collector.add(outputs)

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.collector.reset()
        self._t0 = time.perf_counter()

    def on_outputs(self, trainer: Trainer, pl_module: LightningModule, stage: str, outputs: Any) -> None:
        if stage == "test":
            self._add(outputs)
        elif stage == "predict" and self._rows is not None:
            # streamed: each batch's rows go to disk at once, so memory does not grow with the image count
            self._rows.write(_columns({k: v for k, v in outputs.items() if k in ROW_KEYS}))

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        data = self.collector.gathered()  # every rank's test outputs, in rank order (= dataset order)
        self.collector.reset()
        seconds = time.perf_counter() - self._t0
        if not data:
            return
        labels = data["label"]
        known = labels >= 0
        maps = data.get("anomaly_map")
        metrics = rank_zero_result(  # computed once; every rank logs the same values
            lambda: compute_metrics(
                data["image_score"][known],
                labels[known],
                maps[known] if maps is not None else None,
                data["mask"][known].squeeze(1) if maps is not None else None,
                data["has_mask"][known] if maps is not None else None,
            )
        )
        for key, value in metrics.items():  # the same on every rank: the mean over ranks keeps them
            pl_module.log(f"test/{key}", value, sync_dist=True)
        if rank() != 0:
            return
        folder = run_dir(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        n = len(labels)
        report = {
            "metrics": metrics,
            "n_test": n,
            "n_anomalous": int((labels == 1).sum()),
            "test_seconds": round(seconds, 3),
            "test_images_per_second": round(n / seconds, 3) if seconds > 0 else None,
            "calibration": calibration_state(pl_module),
            "fit": self.fit_metrics,
            **run_facts(trainer, pl_module),
        }
        metrics_path = exclusive_path(folder, "metrics.json")
        metrics_path.write_text(json.dumps(report, indent=2, default=str))
        write_rows(exclusive_path(folder, "scores.csv"), _columns(data))
        rank_zero_info(
            f"\n{format_table(metrics)}\nadx: {n} test images in {seconds:.1f} s; wrote {metrics_path}"
        )

    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        folder = run_dir(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        # with several processes each streams its rows to a part file; rank 0 joins them at the end
        path = folder / f".predictions.rank{rank()}.csv" if is_distributed() else None
        self._rows = RowWriter(path or exclusive_path(folder, "predictions.csv"))

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._rows is None:
            return
        self._rows.close()
        path, count = self._rows.path, self._rows.count
        self._rows = None
        if is_distributed():
            parts = [Path(p) for p in gather_list([str(path)])]  # also waits until every part is closed
            count = int(all_reduce_sum(torch.tensor([count])))
            if rank() != 0:
                return
            path = join_csv(parts, exclusive_path(run_dir(trainer), "predictions.csv"))
        rank_zero_info(f"adx: wrote scores of {count} images to {path}")


def join_csv(parts: list[Path], out: Path) -> Path:
    """Concatenate CSV files that share a header (files without rows may be empty) into ``out``; delete them."""
    header: str | None = None
    with out.open("w", newline="") as fh:
        for part in parts:
            with part.open(newline="") as src:
                first = src.readline()
                if first and header is None:
                    header = first
                    fh.write(first)
                fh.writelines(src)
            part.unlink()
    return out


class RowWriter:
    """Appends CSV rows (column dicts of one batch) to a file as they come, header first."""

    def __init__(self, path: Path) -> None:
        self.path, self.count = path, 0
        self._fh = open(path, "w", newline="")  # noqa: SIM115 - closed in close()
        self._writer = csv.writer(self._fh)
        self._keys: list[str] | None = None

    def write(self, rows: dict[str, list[Any]]) -> None:
        if self._keys is None:
            self._keys = [k for k in ROW_KEYS if k in rows]
            self._writer.writerow(self._keys)
        for values in zip(*(rows[k] for k in self._keys), strict=True):
            self._writer.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in values])
            self.count += 1
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def run_facts(trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
    """Model, data, device, backbone-weights and data-source facts recorded next to the metrics."""
    dm = trainer.datamodule
    backbone = getattr(getattr(pl_module, "model", None), "backbone", None)
    return {
        "model": type(pl_module).__name__,
        "hparams": dict(pl_module.hparams),
        "data": {
            "class": type(dm).__name__ if dm else None,
            "name": getattr(dm, "name", None),
            "category": getattr(dm, "category", None),
            "image_size": getattr(dm, "image_size", None),
            "val_source": getattr(dm, "val_source", None),
            "tiling": _tiling_facts(pl_module, dm),
        },
        "device": str(pl_module.device),
        "processes": world_size(),
        "weights": {
            "backbone": getattr(backbone, "name", None),
            "file": getattr(backbone, "weights_source", None),
            "sha256": getattr(backbone, "weights_sha256", None),
        },
        "sources": data_sources(pl_module),
    }


def data_sources(pl_module: LightningModule) -> dict[str, Any] | None:
    """What the model trained on besides the images (synthetic-anomaly textures, ...), from its
    ``data_sources()`` hook (e.g. ``{"anomalies": PerlinAnomaly.provenance()}``); None for models without one."""
    hook = getattr(getattr(pl_module, "model", None), "data_sources", None)
    return hook() if callable(hook) else None


def _tiling_facts(pl_module: LightningModule, dm: Any) -> dict[str, Any] | None:
    """The model's tile grid (None when not tiled) and whether training used tiles."""
    grid = getattr(pl_module, "tile_grid", None)
    if grid is None:
        return None
    return {"canvas": list(grid.canvas), **grid.facts(), "train_tiles": getattr(dm, "train_on_tiles", None)}
