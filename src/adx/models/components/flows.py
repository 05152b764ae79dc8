"""Normalizing-flow parts shared by FastFlow and CFlow: FrEIA coupling stacks, encodings, a schedule.

Both methods stack FrEIA ``AllInOneBlock`` s (affine coupling + fixed channel permutation + a learned
global affine, i.e. ActNorm) in a ``SequenceINN``. FrEIA draws the permutations from NumPy's global
generator and the subnet weights from torch's, so :func:`seeded` builds them from one explicit seed
without touching either global state.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from FrEIA.framework import SequenceINN
from FrEIA.modules import AllInOneBlock
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)

SubnetConstructor = Callable[[int, int], nn.Module]


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with torch, NumPy and ``random`` seeded by ``seed``; restore their states after."""
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


def conv_subnet(kernel_size: int, hidden_ratio: float) -> SubnetConstructor:
    """FastFlow's coupling subnet: conv k x k -> ReLU -> conv k x k, ``hidden_ratio`` x input channels wide."""

    def build(channels_in: int, channels_out: int) -> nn.Module:
        hidden = max(1, int(channels_in * hidden_ratio))
        pad = kernel_size // 2
        return nn.Sequential(
            nn.Conv2d(channels_in, hidden, kernel_size, padding=pad),
            nn.ReLU(),
            nn.Conv2d(hidden, channels_out, kernel_size, padding=pad),
        )

    return build


def fc_subnet(channels_in: int, channels_out: int) -> nn.Module:
    """CFlow's coupling subnet: linear -> ReLU -> linear with twice the input width in between."""
    return nn.Sequential(
        nn.Linear(channels_in, 2 * channels_in), nn.ReLU(), nn.Linear(2 * channels_in, channels_out)
    )


def coupling_flow(
    dims: Sequence[int],
    subnets: Sequence[SubnetConstructor],
    clamp: float,
    condition_dim: int = 0,
    permute_soft: bool = False,
) -> SequenceINN:
    """A SequenceINN of one AllInOneBlock per subnet constructor.

    ``dims`` is (C,) for fibres [N,C] or (C, 1, 1) for maps [B,C,H,W] (blocks work at any H, W);
    ``condition_dim`` > 0 feeds a condition [N,condition_dim] into every coupling subnet.
    """
    flow = SequenceINN(*dims)
    cond = {"cond": 0, "cond_shape": (condition_dim, *dims[1:])} if condition_dim else {}
    for subnet in subnets:
        flow.append(
            AllInOneBlock,
            subnet_constructor=subnet,
            affine_clamping=clamp,
            global_affine_type="SOFTPLUS",
            permute_soft=False,
            **cond,
        )
        if permute_soft:
            _set_mixing(flow[-1], random_rotation(dims[0]))
    return flow


def random_rotation(n: int) -> Tensor:
    """A random rotation [n,n] from the Haar measure on SO(n) (QR of a Gaussian matrix, torch's RNG).

    Same distribution as the ``scipy.stats.special_ortho_group`` that FrEIA's ``permute_soft`` uses, but
    LAPACK-fast: about 1 s instead of 16 s for n = 2048, drawn 8 times per WideResNet50 scale.
    """
    q, r = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))  # unique QR: makes q Haar-distributed on O(n)
    if torch.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q.float()


def _set_mixing(block: AllInOneBlock, w: Tensor) -> None:
    """Replace a block's fixed channel permutation by the orthogonal matrix ``w`` (and its inverse)."""
    shape = block.w_perm.shape
    block.w_perm.data = w.reshape(shape).contiguous()
    block.w_perm_inv.data = w.T.reshape(shape).contiguous()


def positional_encoding_2d(channels: int, height: int, width: int) -> Tensor:
    """Sinusoidal 2D position code [channels,H,W]: first half encodes x, second half y (channels % 4 == 0)."""
    if channels % 4 != 0 or channels <= 0:
        raise ValueError(f"positional encoding needs a positive multiple of 4 channels, got {channels}")
    half = channels // 2
    freq = torch.exp(torch.arange(0.0, half, 2) * (-math.log(1e4) / half))  # [half/2]
    x = torch.arange(0.0, width)[:, None] * freq  # [W, half/2]
    y = torch.arange(0.0, height)[:, None] * freq  # [H, half/2]
    code = torch.zeros(channels, height, width)
    code[0:half:2] = torch.sin(x).T[:, None, :].expand(-1, height, -1)
    code[1:half:2] = torch.cos(x).T[:, None, :].expand(-1, height, -1)
    code[half::2] = torch.sin(y).T[:, :, None].expand(-1, -1, width)
    code[half + 1 :: 2] = torch.cos(y).T[:, :, None].expand(-1, -1, width)
    return code


def gaussian_log_density(z: Tensor, log_jac_det: Tensor) -> Tensor:
    """log p(x) of flow outputs z [N,C] under a standard normal, with the flow's log|det J| [N] -> [N]."""
    return -z.shape[1] * LOG_SQRT_2PI - 0.5 * z.pow(2).sum(dim=1) + log_jac_det


class WarmupCosineLR(LambdaLR):
    """Linear warm-up, then cosine decay to ``min_ratio`` x lr at ``max_epochs``; stepped once per epoch.

    CFLOW-AD's schedule (authors' code: warm-up from lr/10 over the first 2 of 25 meta-epochs, cosine to
    lr/1000). Warm-up starts at ``warmup_start_ratio`` x lr and reaches the cosine curve at ``warmup_epochs``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        max_epochs: int | None = None,
        warmup_epochs: int = 0,
        min_ratio: float = 1e-3,
        warmup_start_ratio: float = 0.1,
        last_epoch: int = -1,
    ) -> None:
        """``max_epochs`` None: the trainer's ``max_epochs``, set through :meth:`set_horizon` by adx, also
        when a run is resumed with another ``--trainer.max_epochs`` (the schedule is then recomputed for
        the new length from the resumed epoch on)."""
        self.max_epochs, self.warmup_epochs = None, warmup_epochs
        self.follows_trainer = max_epochs is None
        self.min_ratio, self.warmup_start_ratio = min_ratio, warmup_start_ratio
        if max_epochs is not None:
            self.set_horizon(max_epochs)
        elif warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        super().__init__(optimizer, self.factor, last_epoch)

    def set_horizon(self, max_epochs: int) -> None:
        """Set the epoch count the cosine ends at (called with trainer.max_epochs when none was given)."""
        if max_epochs is None or max_epochs < 1:
            raise ValueError(
                f"max_epochs must be >= 1, got {max_epochs}: set --trainer.max_epochs or "
                "--model.scheduler.max_epochs"
            )
        if not 0 <= self.warmup_epochs < max_epochs:
            raise ValueError(
                f"warmup_epochs must be in [0, max_epochs={max_epochs}), got {self.warmup_epochs}"
            )
        self.max_epochs = max_epochs
        if hasattr(self, "base_lrs"):  # already stepping (a resumed run): this epoch's lr on the new horizon
            for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
                group["lr"] = base * self.factor(self.last_epoch)
            self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def cosine(self, epoch: float) -> float:
        """Cosine factor at ``epoch``: 1 at 0, ``min_ratio`` at ``max_epochs``."""
        if self.max_epochs is None:
            if epoch > 0:
                raise RuntimeError("WarmupCosineLR has no max_epochs: set --model.scheduler.max_epochs")
            return 1.0
        t = min(epoch, self.max_epochs) / self.max_epochs
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))

    def factor(self, epoch: int) -> float:
        """Multiplier of the base learning rate in ``epoch`` (0-based)."""
        if epoch == 0:
            return self.warmup_start_ratio if self.warmup_epochs > 0 else 1.0
        if epoch < self.warmup_epochs:
            end = self.cosine(self.warmup_epochs)
            return self.warmup_start_ratio + (end - self.warmup_start_ratio) * epoch / self.warmup_epochs
        return self.cosine(epoch)
