"""A finished run folder as a gallery: its per-image test results sorted by score, FP/FN marked, panels located.

Reads what ``adx fit``/``adx test`` wrote (:mod:`adx.callbacks.results`, :mod:`adx.callbacks.heatmaps`):
``metrics.json`` (metrics, thresholds and their source), ``scores.csv`` (path, defect_type, label,
image_score, pred_score, pred_label; ``predictions.csv`` of a predict run has no labels) and the heatmap
panels ``heatmaps/<defect_type>/<stem>.jpg|png``. A run tested twice has ``scores_1.csv`` and
``metrics_1.json``; the newest pair is shown. Files are served by :func:`safe_file`, confined to the folder.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adx.serve.uploads import ServeError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class RunFolderError(ValueError):
    """A --run folder that cannot be shown; the message names the folder and what is missing."""


@dataclass
class RunFolder:
    """A loaded run folder: its metrics report and per-image rows (newest test of the run)."""

    root: Path
    metrics: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    results_file: str = ""
    metrics_file: str | None = None

    def card(self) -> dict[str, Any]:
        """What the model card shows of the run: folder, metrics, test counts, data."""
        m = self.metrics
        return {
            "folder": str(self.root),
            "metrics_file": self.metrics_file,
            "results_file": self.results_file,
            "metrics": m.get("metrics", {}),
            "n_test": m.get("n_test", len(self.rows)),
            "n_anomalous": m.get("n_anomalous"),
            "data": m.get("data", {}),
            "calibration": m.get("calibration", {}),
        }

    def gallery(self) -> dict[str, Any]:
        """Rows sorted by image score (highest first) with marks and counts, and the threshold's source."""
        items = sorted(self.rows, key=lambda r: -r["image_score"] if math.isfinite(r["image_score"]) else 0)
        counts: dict[str, int] = {}
        for item in items:
            if item["mark"]:
                counts[item["mark"]] = counts.get(item["mark"], 0) + 1
        calibration = self.metrics.get("calibration", {})
        return {
            "folder": str(self.root),
            "results_file": self.results_file,
            "threshold": _finite(calibration.get("image_threshold")),
            "source": calibration.get("source") or "unknown: the run's metrics.json has no calibration",
            "n_normal": calibration.get("n_normal"),
            "n_anomalous": calibration.get("n_anomalous"),
            "has_labels": any(r["label"] in (0, 1) for r in items),
            "counts": counts,
            "items": items,
        }


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _newest(folder: Path, stem: str, suffix: str) -> Path | None:
    """``stem.suffix`` or its newest ``stem_N.suffix`` sibling (the highest N), None if there is none."""
    pattern = re.compile(rf"{re.escape(stem)}(?:_(\d+))?{re.escape(suffix)}")
    found = [(int(m.group(1) or 0), p) for p in folder.iterdir() if (m := pattern.fullmatch(p.name))]
    return max(found)[1] if found else None


def mark(label: int, pred_label: bool) -> str:
    """TP / TN / FP (normal called anomalous) / FN (anomalous called normal), '' when the label is unknown."""
    if label not in (0, 1):
        return ""
    return ("TP" if pred_label else "FN") if label == 1 else ("FP" if pred_label else "TN")


def _panels(root: Path) -> dict[tuple[str, str], Path]:
    """Heatmap panels by (defect_type folder, file stem)."""
    heatmaps = root / "heatmaps"
    if not heatmaps.is_dir():
        return {}
    return {
        (p.parent.name, p.stem): p
        for p in heatmaps.glob("*/*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    }


def load_run(folder: str | Path) -> RunFolder:
    """Read a run folder's newest results CSV and metrics.json; RunFolderError when it has none."""
    root = Path(folder)
    if not root.is_dir():
        raise RunFolderError(f"run folder '{root}' does not exist; pass the folder adx fit/test printed")
    results = _newest(root, "scores", ".csv") or _newest(root, "predictions", ".csv")
    if results is None:
        raise RunFolderError(
            f"'{root}' has no scores.csv or predictions.csv: it is not a finished test run. Run "
            f"`adx test --ckpt {root / 'checkpoints' / 'last.ckpt'}` first."
        )
    suffix = results.stem.split("_")[-1] if "_" in results.stem else ""
    metrics_path = root / f"metrics_{suffix}.json" if suffix.isdigit() else root / "metrics.json"
    if not metrics_path.is_file():
        metrics_path = _newest(root, "metrics", ".json")
    metrics: dict[str, Any] = {}
    if metrics_path is not None:
        try:
            metrics = json.loads(metrics_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise RunFolderError(f"cannot read '{metrics_path}': {exc}") from exc
    panels = _panels(root)
    seen: dict[tuple[str, str], int] = {}
    rows = []
    with results.open(newline="") as fh:
        for raw in csv.DictReader(fh):
            path = raw.get("path") or ""
            defect = raw.get("defect_type") or ""
            stem = Path(path).stem
            k = seen.get((defect, stem), 0)  # HeatmapWriter names a repeated stem stem_1, stem_2, ...
            seen[(defect, stem)] = k + 1
            panel = panels.get((defect, stem if k == 0 else f"{stem}_{k}"))
            label = int(float(raw["label"])) if raw.get("label") not in (None, "") else -1
            pred_label = str(raw.get("pred_label", "")).strip().lower() in ("true", "1")
            rows.append(
                {
                    "index": len(rows),
                    "path": path,
                    "name": Path(path).name,
                    "defect_type": defect,
                    "label": label,
                    "image_score": _finite(raw.get("image_score")) or 0.0,
                    "pred_score": _finite(raw.get("pred_score")),
                    "pred_label": pred_label,
                    "mark": mark(label, pred_label),
                    "panel": panel.relative_to(root).as_posix() if panel else None,
                }
            )
    return RunFolder(root, metrics, rows, results.name, metrics_path.name if metrics_path else None)


def safe_file(root: Path, relative: str) -> Path:
    """``root/relative`` if it is an image file inside ``root`` (after resolving ``..`` and links), else 4xx."""
    fix = (
        "ask for a panel path listed by GET /api/run (relative to the run folder, e.g. heatmaps/good/000.jpg)"
    )
    if not relative or "\x00" in relative or Path(relative).is_absolute() or relative.startswith(("/", "\\")):
        raise ServeError(403, f"path {relative!r} is not a path relative to the run folder", fix)
    base = root.resolve()
    target = (base / relative).resolve()
    if not target.is_relative_to(base):
        raise ServeError(403, f"path {relative!r} points outside the run folder; it is not served", fix)
    if target.suffix.lower() not in IMAGE_SUFFIXES:
        raise ServeError(403, f"path {relative!r} is not an image; only the run's images are served", fix)
    if not target.is_file():
        raise ServeError(404, f"the run folder has no file {relative!r}", fix)
    return target
