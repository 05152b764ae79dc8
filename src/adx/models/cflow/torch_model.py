"""CFLOW-AD (Gudovskiy et al., WACV 2022, arXiv 2107.12571) as a plain torch module."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adx.inference import exporting
from adx.models.components.backbone import Backbone
from adx.models.components.flows import (
    coupling_flow,
    fc_subnet,
    gaussian_log_density,
    positional_encoding_2d,
    seeded,
)

EVAL_FIBRES = 16384
"""Fibres per decoder call at test time (bounds memory at high resolution; results do not depend on it)."""


class CFlowModel(nn.Module):
    """Frozen CNN encoder; per scale a conditional flow over feature fibres, conditioned on their position."""

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        strides: Sequence[int] = (8, 16, 32),
        weights: str | None = None,
        pretrained: bool = True,
        normalization: str = "backbone",
        condition_dim: int = 128,
        coupling_blocks: int = 8,
        clamp_alpha: float = 1.9,
        fiber_batch_size: int = 256,
        permute_soft: bool = True,
        seed: int = 0,
    ) -> None:
        """CFLOW-AD.

        Args:
            backbone: timm CNN name (features_only); offline weights resolved as in docs/offline.md.
            strides: encoder maps used, by stride (the paper's 3 pooling layers of WideResNet50 = 8, 16, 32).
            weights: explicit weights file (state dict or .safetensors) for the backbone.
            pretrained: False runs with random weights (tests only).
            normalization: input normalisation: ``backbone`` (the weights' own mean/std), ``imagenet``,
                ``none`` or ``m1,m2,m3/s1,s2,s3`` (see docs/normalization.md).
            condition_dim: channels of the 2D sinusoidal position code fed to every coupling (multiple of 4).
            coupling_blocks: coupling blocks per scale (paper: 8).
            clamp_alpha: soft clamp of the coupling log-scales (paper: 1.9).
            fiber_batch_size: fibres per optimizer step, N in the paper (authors' code: 256).
            permute_soft: random orthogonal channel mixing between blocks (authors' code) instead of a
                random permutation; slower to build for thousands of channels.
            seed: seed of the decoders' initial weights and permutations.
        """
        super().__init__()
        if condition_dim < 4 or condition_dim % 4:
            raise ValueError(
                f"condition_dim must be a positive multiple of 4, got {condition_dim}: use e.g. --model.condition_dim 128"
            )
        if coupling_blocks < 1:
            raise ValueError(
                f"coupling_blocks must be >= 1, got {coupling_blocks}: use e.g. --model.coupling_blocks 8"
            )
        if not clamp_alpha > 0:
            raise ValueError(f"clamp_alpha must be > 0, got {clamp_alpha}: use e.g. --model.clamp_alpha 1.9")
        if fiber_batch_size < 1:
            raise ValueError(
                f"fiber_batch_size must be >= 1, got {fiber_batch_size}: use e.g. --model.fiber_batch_size 256"
            )
        if len(strides) < 1:
            raise ValueError("strides must name at least one feature map, e.g. --model.strides [8,16,32]")
        self.backbone = Backbone(backbone, strides, weights, pretrained, normalization=normalization)
        self.condition_dim, self.fiber_batch_size = condition_dim, fiber_batch_size
        with seeded(seed):
            self.decoders = nn.ModuleList(
                coupling_flow((c,), [fc_subnet] * coupling_blocks, clamp_alpha, condition_dim, permute_soft)
                for c in self.backbone.channels
            )
        # per scale, the largest per-dimension log-likelihood of a training fibre (set after each epoch)
        self.register_buffer("logp_ref", torch.full((len(self.decoders),), float("nan")))

    def frozen_features(self, images: Tensor) -> list[Tensor]:
        """Images [B,3,H,W] in [0,1] -> the encoder's maps [B,C,h,w] (float32, no gradient)."""
        with torch.no_grad():
            return [f.float() for f in self.backbone(images)]

    def fibres(self, feats: list[Tensor]) -> list[tuple[Tensor, Tensor, tuple[int, int]]]:
        """Encoder maps -> per scale: fibres [B*h*w,C], position codes [B*h*w,P] and (h, w)."""
        out = []
        for f in feats:
            b, c, h, w = f.shape
            code = positional_encoding_2d(self.condition_dim, h, w).to(f.device)
            cond = code.permute(1, 2, 0).reshape(1, h * w, -1).expand(b, -1, -1).reshape(b * h * w, -1)
            out.append((f.permute(0, 2, 3, 1).reshape(b * h * w, c), cond, (h, w)))
        return out

    def _fibres(self, batch: dict[str, Any]) -> list[tuple[Tensor, Tensor, tuple[int, int]]]:
        feats = batch.get("features")
        return self.fibres(feats if feats is not None else self.frozen_features(batch["image"]))

    def log_likelihood(self, scale: int, fibres: Tensor, cond: Tensor) -> Tensor:
        """Per-dimension log-likelihood [N] of fibres [N,C] under the decoder of ``scale``."""
        z, log_jac_det = self.decoders[scale](fibres, [cond])
        return gaussian_log_density(z, log_jac_det) / fibres.shape[1]

    def _chunked_log_likelihood(self, scale: int, fibres: Tensor, cond: Tensor) -> Tensor:
        if exporting():  # one pass: the fibre count follows the (dynamic) batch size
            return self.log_likelihood(scale, fibres, cond)
        return torch.cat(
            [
                self.log_likelihood(scale, fibres[i : i + EVAL_FIBRES], cond[i : i + EVAL_FIBRES])
                for i in range(0, len(fibres), EVAL_FIBRES)
            ]
        )

    def loss(self, batch: dict[str, Any]) -> Tensor:
        """Sum over scales of the mean fibre loss -log sigmoid(log p / C) (paper code), all fibres at once."""
        return sum(
            -F.logsigmoid(self.log_likelihood(scale, e, c)).mean()
            for scale, (e, c, _) in enumerate(self._fibres(batch))
        )

    def fibre_batches(
        self, batch: dict[str, Any], generator: torch.Generator | None = None
    ) -> Iterator[tuple[int, Tensor, int]]:
        """The paper's fibre batching: yield (scale, loss, n_fibres) per batch of ``fiber_batch_size``.

        Per scale, the B*h*w fibres of the batch are shuffled (``generator``, else torch's global one) and
        cut into batches of N; the remainder joins the last batch. The caller takes an optimizer step per
        yielded loss.
        """
        n = self.fiber_batch_size
        for scale, (e, c, _) in enumerate(self._fibres(batch)):
            order = torch.randperm(len(e), generator=generator).to(e.device)
            bounds = list(range(0, len(e), n))[: max(1, len(e) // n)] + [len(e)]
            for start, stop in zip(bounds, bounds[1:], strict=False):
                idx = order[start:stop]
                yield scale, -F.logsigmoid(self.log_likelihood(scale, e[idx], c[idx])).mean(), len(idx)

    @torch.no_grad()
    def fit_reference(self, batches: Iterable[dict[str, Any]]) -> None:
        """``logp_ref``: per scale, the largest per-dimension log-likelihood of a training fibre."""
        ref = torch.full_like(self.logp_ref, float("-inf"))
        for batch in batches:
            for scale, (e, c, _) in enumerate(self._fibres(batch)):
                ref[scale] = torch.fmax(ref[scale], self._chunked_log_likelihood(scale, e, c).max())
        if not bool(torch.isfinite(ref).all()):
            raise RuntimeError("CFlow: no training fibres (or non-finite likelihoods) for the reference")
        self.logp_ref.copy_(ref)

    def check_fitted(self) -> None:
        """Raise RuntimeError unless the reference likelihoods were set after training."""
        if not bool(torch.isfinite(self.logp_ref).all()):
            raise RuntimeError("CFlow has not been trained: fit it (adx fit) or load a checkpoint")

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Images [B,3,H,W] -> image scores [B] (max of the map) and anomaly maps [B,H,W] (<= 0).

        Per scale, the likelihood relative to the reference, exp(log p - logp_ref), upsampled bilinearly;
        map = minus their sum. The paper's code takes a constant minus the sum; dropping the constant
        keeps float32 resolution where the sum is tiny (strong anomalies).
        """
        b, size = images.shape[0], (images.shape[-2], images.shape[-1])
        total = torch.zeros(b, 1, size[0], size[1], device=images.device)
        for scale, (e, c, (h, w)) in enumerate(self.fibres(self.frozen_features(images))):
            logp = self._chunked_log_likelihood(scale, e, c)
            prob = torch.exp(logp - self.logp_ref[scale]).view(b, 1, h, w)
            total = total + F.interpolate(prob, size=size, mode="bilinear", align_corners=True)
        anomaly_map = -total.squeeze(1)
        return anomaly_map.flatten(1).amax(dim=1), anomaly_map
