"""Focal loss (Lin et al., ICCV 2017, arXiv 1708.02002) for dense K-class predictions, as pure torch."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def focal_loss(
    logits: Tensor, target: Tensor, gamma: float = 2.0, alpha: Sequence[float] | None = None
) -> Tensor:
    """Mean over positions of -alpha_t (1 - p_t)^gamma log p_t.

    Args:
        logits: [B,K,...] unnormalised class scores (softmax over dim 1).
        target: [B,...] class indices in [0, K) (a [B,1,...] map is squeezed).
        gamma: focusing exponent >= 0; 0 gives (alpha-weighted) cross-entropy.
        alpha: optional per-class weights (K values); None weighs every class 1.

    Computed in float32 from ``log_softmax`` (no log of a rounded probability), also under autocast.
    """
    if gamma < 0:
        raise ValueError(f"focal loss gamma must be >= 0, got {gamma}")
    if target.ndim == logits.ndim and target.shape[1] == 1:
        target = target.squeeze(1)
    if target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(
            f"focal loss target {tuple(target.shape)} does not match logits {tuple(logits.shape)} "
            "without their class dimension"
        )
    with torch.autocast(device_type=logits.device.type, enabled=False):
        log_p = F.log_softmax(logits.float(), dim=1)
        log_pt = log_p.gather(1, target.long().unsqueeze(1)).squeeze(1)
        weight = (1.0 - log_pt.exp()).clamp_min(0.0).pow(gamma)
        if alpha is not None:
            if len(alpha) != logits.shape[1]:
                raise ValueError(f"focal loss alpha needs {logits.shape[1]} class weights, got {len(alpha)}")
            weight = weight * torch.as_tensor(alpha, dtype=weight.dtype, device=weight.device)[target.long()]
        return -(weight * log_pt).mean()
