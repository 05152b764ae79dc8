"""Callbacks the CLI always adds: checkpoints, calibration, results (metrics, CSV) and heatmap export."""

from adx.callbacks.calibration import Calibration
from adx.callbacks.checkpoint import Checkpoint
from adx.callbacks.heatmaps import HeatmapWriter
from adx.callbacks.results import ResultsWriter

__all__ = ["Calibration", "Checkpoint", "HeatmapWriter", "ResultsWriter"]
