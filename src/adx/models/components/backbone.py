"""The feature extractor every model imports: ``Backbone`` and its offline weights path.

The code lives in extractor.py (CNN / ViT feature maps, frozen or trainable, normalisation, BatchNorm
folding) and weights.py (file > $ADX_WEIGHTS_DIR > offline package > hub, hashes, checkpoint
restoring); this module keeps the names models and tools import.
"""

from __future__ import annotations

from adx.models.components.extractor import (
    NORMALIZATIONS,
    Backbone,
    BackboneError,
    FeatureExtractor,
    InputSizeError,
    fold_batchnorm,
    normalization_stats,
)
from adx.models.components.weights import (
    OFFLINE_PACKAGES,
    PIP_NAMES,
    WEIGHT_SUFFIXES,
    WeightsNotFoundError,
    _options_message,
    load_into_features,
    offline_package_file,
    read_state_dict,
    resolve_weights,
    restoring_weights,
    sha256_file,
    to_timm_layout,
)

__all__ = [
    "NORMALIZATIONS",
    "OFFLINE_PACKAGES",
    "PIP_NAMES",
    "WEIGHT_SUFFIXES",
    "Backbone",
    "BackboneError",
    "FeatureExtractor",
    "InputSizeError",
    "WeightsNotFoundError",
    "_options_message",
    "fold_batchnorm",
    "load_into_features",
    "normalization_stats",
    "offline_package_file",
    "read_state_dict",
    "resolve_weights",
    "restoring_weights",
    "sha256_file",
    "to_timm_layout",
]
