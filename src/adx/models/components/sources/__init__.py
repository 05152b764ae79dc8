"""Offline data sources: synthetic Perlin anomalies, anomaly textures and natural images (docs/sources.md)."""

from adx.models.components.sources.anomaly import Augmented, PerlinAnomaly, as_generator
from adx.models.components.sources.augment import texture_augment
from adx.models.components.sources.images import (
    NaturalImages,
    SourceError,
    SourceImageError,
    TextureSource,
    list_image_files,
    package_image_files,
    read_image,
)
from adx.models.components.sources.noise import fractal_noise, perlin_mask, perlin_noise, procedural_image

__all__ = [
    "Augmented",
    "NaturalImages",
    "PerlinAnomaly",
    "SourceError",
    "SourceImageError",
    "TextureSource",
    "as_generator",
    "fractal_noise",
    "list_image_files",
    "package_image_files",
    "perlin_mask",
    "perlin_noise",
    "procedural_image",
    "read_image",
    "texture_augment",
]
