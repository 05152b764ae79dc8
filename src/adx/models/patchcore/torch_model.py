"""PatchCore (Roth et al., CVPR 2022, arXiv 2106.08265) as a plain torch module."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from adx import distributed
from adx.inference import exporting
from adx.models.components.backbone import Backbone
from adx.models.components.coreset import sample_size
from adx.models.components.knn import NearestNeighbours, knn_torch
from adx.models.components.maps import DynamicBuffers, align_and_concat, to_image_size
from adx.models.components.pool import POOL_STORES, PatchPool, coreset_bank
from adx.models.components.weights import is_restoring


class PatchCoreModel(DynamicBuffers):
    """Locally aware patch features, a greedy-coreset memory bank and kNN patch scores."""

    dynamic_buffers = ("memory_bank",)

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        strides: Sequence[int] = (8, 16),
        weights: str | None = None,
        pretrained: bool = True,
        normalization: str = "backbone",
        patch_size: int = 3,
        embed_dim: int | None = None,
        coreset_ratio: float = 0.1,
        projection_dim: int | None = 128,
        num_neighbors: int = 9,
        blur_sigma: float = 4.0,
        seed: int = 0,
        progress: bool = True,
        knn: str = "auto",
        pool: str = "auto",
    ) -> None:
        """PatchCore.

        Args:
            backbone: timm CNN name (features_only); offline weights resolved as in docs/offline.md.
            strides: feature maps used, by stride (the paper's WideResNet50 layer2+layer3 = 8 and 16).
            weights: explicit weights file (state dict or .safetensors) for the backbone.
            pretrained: False runs with random weights (tests only).
            normalization: input normalisation: ``backbone`` (the weights' own mean/std), ``imagenet``,
                ``none`` or ``m1,m2,m3/s1,s2,s3`` (see docs/normalization.md).
            patch_size: side of the local neighbourhood averaged around each patch.
            embed_dim: target dimension of the paper's channel pooling (None keeps all channels).
            coreset_ratio: fraction of training patches kept in the memory bank.
            projection_dim: random projection used only to select the coreset (None: full dimension).
            num_neighbors: neighbourhood size b of the paper's image-score re-weighting (1 disables it).
            blur_sigma: Gaussian smoothing of the upsampled map, in pixels.
            seed: seed of the coreset start point and projection.
            progress: show a progress bar with ETA for the coreset.
            knn: nearest-neighbour search: ``auto`` (faiss where installed, else torch), ``faiss`` or
                ``torch`` (chunked matmul + top-k; the path traced for export, equal within float rounding).
            pool: where the full-dimension training patches wait for the coreset (only their projection
                is in memory): ``auto`` (memory up to 1 GiB, then a temporary float32 file in $TMPDIR),
                ``memory`` or ``disk``. The bank is the same with each.
        """
        super().__init__()
        if patch_size < 1 or patch_size % 2 == 0:
            raise ValueError(f"patch_size must be a positive odd number, got {patch_size}")
        if num_neighbors < 1:
            raise ValueError(f"num_neighbors must be >= 1, got {num_neighbors}")
        sample_size(1, coreset_ratio)  # validates the ratio before any work
        if knn not in ("auto", "faiss", "torch"):
            raise ValueError(f"knn must be auto, faiss or torch, got {knn!r}: fix --model.knn")
        if pool not in POOL_STORES:
            raise ValueError(f"pool must be auto, memory or disk, got {pool!r}: fix --model.pool")
        if embed_dim is not None and embed_dim < 1:
            raise ValueError(f"embed_dim must be positive or null, got {embed_dim}: fix --model.embed_dim")
        self.backbone = Backbone(backbone, strides, weights, pretrained, normalization=normalization)
        _check_embed_dim(embed_dim, self.backbone)
        self.patch_size, self.embed_dim = patch_size, embed_dim
        self.coreset_ratio, self.projection_dim, self.seed = coreset_ratio, projection_dim, seed
        self.num_neighbors, self.blur_sigma, self.progress = num_neighbors, blur_sigma, progress
        dim = embed_dim or sum(self.backbone.channels)
        self.register_buffer("memory_bank", torch.empty(0, dim))
        self.knn, self.pool_store = knn, pool
        self._pool: PatchPool | None = None  # training patches collected by update(), consumed by fit()
        self._index: NearestNeighbours | None = None  # built when the bank is set (fit, load, device move)
        self.register_load_state_dict_post_hook(lambda module, _: module.build_index())

    def embed(self, images: Tensor) -> Tensor:
        """Images [B,3,H,W] in [0,1] -> patch embeddings [B,D,H/s,W/s] at the finest stride s."""
        pad = self.patch_size // 2
        feats = [F.avg_pool2d(f, self.patch_size, stride=1, padding=pad) for f in self.backbone(images)]
        if self.embed_dim is None:
            return align_and_concat(feats)
        # paper's projection: pool each layer's channels to embed_dim, then the concatenation to embed_dim
        pooled = [_pool_channels(f, self.embed_dim) for f in feats]
        return _pool_channels(align_and_concat(pooled), self.embed_dim)

    def update(self, images: Tensor, keys: Sequence[str] | None = None) -> None:
        """Add the patch embeddings of a batch of normal images [B,3,H,W] to the pool to subsample.

        ``keys`` (one per image, e.g. its path) put the pool in a canonical order (sorted by key, repeated
        keys once), so the bank does not depend on loader order or on how images are split over processes.
        """
        if keys is not None and len(keys) != len(images):
            raise ValueError(f"got {len(keys)} keys for {len(images)} images")
        emb = self.embed(images)
        b, d = emb.shape[:2]
        rows = emb.permute(0, 2, 3, 1).reshape(b, -1, d)  # [B, h*w, D]
        if self._pool is None:
            self._pool = PatchPool(d, self.projection_dim, self.seed, self.pool_store)
        for i in range(b):
            self._pool.add(rows[i], None if keys is None else str(keys[i]))

    def fit(self) -> None:
        """Greedy-coreset subsample of all collected embeddings (of every process) into the memory bank."""
        pool, self._pool = self._pool, None
        if pool is None:
            if not distributed.is_distributed():
                raise RuntimeError("PatchCore.fit() called before any update(): no training images were seen")
            pool = PatchPool(self.memory_bank.shape[1], self.projection_dim, self.seed, self.pool_store)
        try:
            bank = coreset_bank(pool, self.coreset_ratio, progress=self.progress)
        finally:
            pool.close()
        self.memory_bank = bank.to(self.memory_bank.device)
        self.build_index()

    def build_index(self) -> None:
        """(Re)build the faiss index over the memory bank; the torch path needs none."""
        self._index = None
        if self.knn != "torch" and len(self.memory_bank) > 0:
            self._index = NearestNeighbours(self.memory_bank, backend=None if self.knn == "auto" else "faiss")

    def _apply(self, fn, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        out = super()._apply(fn, *args, **kwargs)
        self.build_index()  # device or dtype changed
        return out

    def search(self, queries: Tensor, k: int = 1) -> tuple[Tensor, Tensor]:
        """k nearest memory-bank rows of queries [N,D]: the index when built and not tracing, else torch."""
        if self._index is None or exporting():
            return knn_torch(queries, self.memory_bank, k)
        return self._index.search(queries, k)

    def check_fitted(self) -> None:
        """Raise RuntimeError when the memory bank is empty."""
        if len(self.memory_bank) == 0:
            raise RuntimeError("PatchCore has an empty memory bank: fit it (adx fit) or load a checkpoint")

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Images [B,3,H,W] -> image scores [B] and anomaly maps [B,H,W]."""
        emb = self.embed(images)
        b, d, h, w = emb.shape
        patches = emb.permute(0, 2, 3, 1).reshape(-1, d)
        dist, nn_idx = self.search(patches, k=1)
        dist, nn_idx = dist.view(b, h * w), nn_idx.view(b, h * w)
        scores = self._image_scores(patches.view(b, h * w, d), dist, nn_idx)
        maps = to_image_size(dist.view(b, h, w), (images.shape[-2], images.shape[-1]), self.blur_sigma)
        return scores, maps

    def _image_scores(self, patches: Tensor, dist: Tensor, nn_idx: Tensor) -> Tensor:
        """Paper eq. 7: the largest patch distance, down-weighted when its neighbour sits in a dense region."""
        s_star, where = dist.max(dim=1)
        if self.num_neighbors == 1:
            return s_star
        rows = torch.arange(where.shape[0], device=where.device)
        m_star = nn_idx[rows, where]  # bank index of the nearest neighbour of the most anomalous patch
        k = min(self.num_neighbors, len(self.memory_bank))
        _, support = self.search(self.memory_bank[m_star], k=k)  # [B,k], support[:,0] is m_star
        test_patch = patches[rows, where]  # [B,D]
        d_support = torch.linalg.vector_norm(self.memory_bank[support] - test_patch[:, None], dim=-1)
        weight = 1.0 - torch.softmax(d_support, dim=1)[:, 0]
        return weight * s_star


def _check_embed_dim(embed_dim: int | None, backbone: Backbone) -> None:
    """Refuse an ``embed_dim`` above the backbone's channels (a warning when loading a checkpoint)."""
    channels = sum(backbone.channels)
    if embed_dim is None or embed_dim <= channels:
        return
    message = (
        f"embed_dim {embed_dim} exceeds the {channels} channels of {backbone.name} at strides "
        f"{tuple(backbone.strides)}: the paper's channel pooling would repeat channels (no new information, "
        f"{embed_dim / channels:.1f}x the memory and search time); use --model.embed_dim {channels} or less "
        "(or null to keep all channels)"
    )
    if is_restoring():  # a checkpoint fitted before this check: its bank already has embed_dim columns
        warnings.warn(message, stacklevel=3)
        return
    raise ValueError(message)


def _pool_channels(x: Tensor, dim: int) -> Tensor:
    """[B,C,h,w] -> [B,dim,h,w] by adaptive average pooling over channels."""
    b, c, h, w = x.shape
    flat = x.permute(0, 2, 3, 1).reshape(-1, 1, c)
    return F.adaptive_avg_pool1d(flat, dim).view(b, h, w, dim).permute(0, 3, 1, 2)
