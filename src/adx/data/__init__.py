"""Data: sample listing for MVTec/folder/good-ng layouts, synthetic data, dataset and Lightning datamodules."""

from adx.data.datamodule import AnomalyDataModule, Folder, GoodNG, MVTec, Synthetic
from adx.data.dataset import AnomalyDataset
from adx.data.folder import list_folder
from adx.data.goodng import list_goodng
from adx.data.mvtec import list_mvtec
from adx.data.samples import AdxDataError, AdxDataWarning, Sample, check_samples
from adx.data.synthetic import make_synthetic

__all__ = [
    "AdxDataError",
    "AdxDataWarning",
    "AnomalyDataModule",
    "AnomalyDataset",
    "Folder",
    "GoodNG",
    "MVTec",
    "Sample",
    "Synthetic",
    "check_samples",
    "list_folder",
    "list_goodng",
    "list_mvtec",
    "make_synthetic",
]
