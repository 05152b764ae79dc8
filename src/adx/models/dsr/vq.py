"""DSR's discrete latent model: a two-level VQ-VAE with EMA codebooks, its training loop and weight files.

Layout (Zavrtanik et al., ECCV 2022, after Razavi et al.'s VQ-VAE-2): the "hi" encoder maps the image to
stride 4, the "lo" encoder on to stride 8; the lo features are quantised with codebook K_lo, upsampled
(transposed convolution) and joined with the hi encoder's output to be quantised with codebook K_hi; the
general appearance decoder maps both quantised maps back to the image. Codebooks are moving averages of
the encoder outputs assigned to them (EMA, decay 0.99, commitment 0.25 in the authors' code).

Weight files: :func:`save_vq` writes ``{"format", "state_dict", "provenance"}`` (readable with
``weights_only=True``); :func:`load_vq` reads that, a plain state dict with adx's keys, or the authors' /
anomalib's ``vq_model_pretrained_128_4096.pckl`` layout, and raises :class:`VQWeightsError` naming the
settings that fit the file when its shapes differ.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adx.models.components.weights import read_state_file

FORMAT = "adx-dsr-vq/1"
"""Tag of the weight files :func:`save_vq` writes; part of the natural-image cache key, so bump it when
:func:`train_vq` changes what it produces (cached VQ-VAEs of the old code are then retrained)."""


class VQWeightsError(ValueError):
    """A VQ-VAE weights file that does not fit the configured discrete latent model."""


class Codebook(nn.Module):
    """K vectors of dimension D (buffers, updated by EMA, never by gradients) and the nearest-vector search."""

    def __init__(self, size: int, dim: int, decay: float = 0.99, eps: float = 1e-5) -> None:
        super().__init__()
        self.decay, self.eps = float(decay), float(eps)
        vectors = torch.randn(size, dim)
        self.register_buffer("vectors", vectors)
        # EMA statistics: as if every vector had been chosen once, by itself (unused vectors then stay put)
        self.register_buffer("ema_count", torch.ones(size))
        self.register_buffer("ema_sum", vectors.clone())
        self.register_buffer("initialised", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.vectors.shape[0]

    def distances(self, z: Tensor) -> Tensor:
        """z [B,D,h,w] -> [B,K,h,w] squared distances to every vector, less |z|^2 (the same argmin).

        As |e|^2 - 2 z.e (a 1x1 convolution with the codebook), so the graph holds one convolution and no
        [B*h*w, K, D] difference tensor; leaving out |z|^2 keeps the terms, and their rounding, small.
        """
        e = self.vectors
        return (e * e).sum(1).view(1, -1, 1, 1) - 2.0 * F.conv2d(z, e[:, :, None, None].to(z.dtype))

    def indices(self, z: Tensor) -> Tensor:
        """Index [B,h,w] of the nearest vector at every position of z [B,D,h,w] (argmin: traceable)."""
        return self.distances(z).argmin(dim=1)

    def relative_gaps(self, z: Tensor) -> Tensor:
        """[B,h,w]: the gap between the nearest and second-nearest distance at every position of z, relative
        to the distances' scale there (|e|^2 + 2|z||e| of the nearest e); near float32 rounding (1e-7) is a
        near-tie that another runtime's rounding could resolve the other way."""
        d = self.distances(z)
        two = d.topk(2, dim=1, largest=False).values
        e = self.vectors[d.argmin(1)].permute(0, 3, 1, 2)
        scale = (e * e).sum(1) + 2 * z.norm(dim=1) * e.norm(dim=1)
        return (two[:, 1] - two[:, 0]) / scale.clamp_min(1e-12)

    def lookup(self, indices: Tensor) -> Tensor:
        """Codebook vectors [B,D,h,w] at ``indices`` [B,h,w] (exact copies of the rows)."""
        return F.embedding(indices, self.vectors).permute(0, 3, 1, 2)

    def quantize(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(vectors with a straight-through gradient to z [B,D,h,w], indices [B,h,w])."""
        idx = self.indices(z)
        q = self.lookup(idx).to(z.dtype)
        return z + (q - z).detach(), idx

    @torch.no_grad()
    def ema_update(self, z: Tensor, indices: Tensor) -> None:
        """Move every chosen vector towards the mean of the encoder outputs assigned to it (Laplace-smoothed)."""
        flat = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float()
        idx = indices.reshape(-1)
        counts = torch.bincount(idx, minlength=self.size).float()
        sums = torch.zeros_like(self.ema_sum).index_add_(0, idx, flat)
        self.ema_count.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1.0 - self.decay)
        n = self.ema_count.sum()
        smoothed = (self.ema_count + self.eps) / (n + self.size * self.eps) * n
        self.vectors.copy_(self.ema_sum / smoothed[:, None])

    @torch.no_grad()
    def restart_dead(self, z: Tensor, generator: torch.Generator, min_count: float = 0.03) -> int:
        """Move vectors chosen less than ``min_count`` times per step (EMA) onto random encoder outputs of z.

        Keeps the whole codebook in use while the encoder moves away from where unused vectors sit.
        Returns how many were moved.
        """
        dead = (self.ema_count < min_count).nonzero().flatten()
        if len(dead) == 0:
            return 0
        flat = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float()
        pick = torch.randint(0, len(flat), (len(dead),), generator=generator).to(flat.device)
        self.vectors[dead] = flat[pick]
        self.ema_sum[dead] = flat[pick]
        self.ema_count[dead] = 1.0
        return len(dead)

    @torch.no_grad()
    def init_from(self, z: Tensor, generator: torch.Generator) -> None:
        """Start from K encoder outputs of z [B,D,h,w] drawn at random (with replacement when fewer)."""
        flat = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float().cpu()
        pick = torch.randint(0, len(flat), (self.size,), generator=generator)
        jitter = 1e-3 * flat.std() * torch.randn(self.size, flat.shape[1], generator=generator)
        vectors = (flat[pick] + jitter).to(self.vectors)
        self.vectors.copy_(vectors)
        self.ema_sum.copy_(vectors)
        self.ema_count.fill_(1.0)
        self.initialised.fill_(1)


class Residual(nn.Module):
    """relu(x) + conv1x1(relu(conv3x3(relu(x)))): the authors' block, whose in-place ReLU also feeds the skip."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.conv3 = nn.Conv2d(channels, hidden, 3, padding=1, bias=False)
        self.conv1 = nn.Conv2d(hidden, channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(x)
        return x + self.conv1(F.relu(self.conv3(x)))


def residual_stack(channels: int, hidden: int, layers: int) -> nn.Sequential:
    """``layers`` residual blocks and a final ReLU."""
    return nn.Sequential(*(Residual(channels, hidden) for _ in range(layers)), nn.ReLU())


class DiscreteLatentModel(nn.Module):
    """Two-level VQ-VAE: image [B,3,H,W] -> Q_lo [B,D,H/8,W/8], Q_hi [B,D,H/4,W/4] -> image (general decoder)."""

    def __init__(
        self,
        hiddens: int = 128,
        residual_hiddens: int = 64,
        residual_layers: int = 2,
        embedding_dim: int = 128,
        codebook_size: int = 4096,
        decay: float = 0.99,
    ) -> None:
        super().__init__()
        h, r, n, d = hiddens, residual_hiddens, residual_layers, embedding_dim
        self.encoder_hi = nn.Sequential(
            nn.Conv2d(3, h // 2, 4, 2, 1),
            nn.ReLU(),
            nn.Conv2d(h // 2, h, 4, 2, 1),
            nn.ReLU(),
            nn.Conv2d(h, h, 3, 1, 1),
            residual_stack(h, r, n),
        )
        self.encoder_lo = nn.Sequential(
            nn.Conv2d(h, h, 4, 2, 1), nn.ReLU(), nn.Conv2d(h, h, 3, 1, 1), nn.ReLU(), residual_stack(h, r, n)
        )
        self.to_lo = nn.Conv2d(h, d, 1)
        self.to_hi = nn.Conv2d(h + d, d, 1)
        self.codebook_lo = Codebook(codebook_size, d, decay)
        self.codebook_hi = Codebook(codebook_size, d, decay)
        self.upsample_lo = nn.ConvTranspose2d(d, d, 4, 2, 1)
        self.decoder = nn.Sequential(
            nn.Conv2d(2 * d, h, 3, 1, 1),
            residual_stack(h, r, n),
            nn.ConvTranspose2d(h, h // 2, 4, 2, 1),
            nn.ReLU(),
            nn.ConvTranspose2d(h // 2, 3, 4, 2, 1),
        )

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Images [B,3,H,W] -> (hi encoder output [B,h,H/4,W/4], lo features F_lo [B,D,H/8,W/8])."""
        enc_hi = self.encoder_hi(images)
        return enc_hi, self.to_lo(self.encoder_lo(enc_hi))

    def hi_features(self, enc_hi: Tensor, q_lo: Tensor) -> Tensor:
        """F_hi [B,D,H/4,W/4] from the hi encoder output and the (possibly altered) quantised lo map."""
        return self.to_hi(torch.cat([enc_hi, self.upsample_lo(q_lo)], dim=1))

    def decode(self, q_lo: Tensor, q_hi: Tensor) -> Tensor:
        """General appearance decoder: quantised maps -> image [B,3,H,W] (no output activation)."""
        return self.decoder(torch.cat([self.upsample_lo(q_lo), q_hi], dim=1))

    def quantized(self, images: Tensor) -> dict[str, Tensor]:
        """enc_hi, z_lo, q_lo, z_hi, q_hi of images [B,3,H,W] (q_* exact codebook vectors, no gradient path)."""
        enc_hi, z_lo = self.encode(images)
        q_lo = self.codebook_lo.lookup(self.codebook_lo.indices(z_lo)).to(z_lo.dtype)
        z_hi = self.hi_features(enc_hi, q_lo)
        q_hi = self.codebook_hi.lookup(self.codebook_hi.indices(z_hi)).to(z_hi.dtype)
        return {"enc_hi": enc_hi, "z_lo": z_lo, "q_lo": q_lo, "z_hi": z_hi, "q_hi": q_hi}

    def training_loss(self, images: Tensor, commitment: float = 0.25) -> tuple[Tensor, dict[str, Any]]:
        """Reconstruction MSE + commitment x (|F_lo - sg(Q_lo)|^2 + |F_hi - sg(Q_hi)|^2), and what the EMA needs."""
        enc_hi, z_lo = self.encode(images)
        q_lo, idx_lo = self.codebook_lo.quantize(z_lo)
        z_hi = self.hi_features(enc_hi, q_lo)
        q_hi, idx_hi = self.codebook_hi.quantize(z_hi)
        recon = self.decode(q_lo, q_hi)
        commit = F.mse_loss(z_lo, q_lo.detach()) + F.mse_loss(z_hi, q_hi.detach())
        loss = F.mse_loss(recon, images) + commitment * commit
        return loss, {"z_lo": z_lo, "idx_lo": idx_lo, "z_hi": z_hi, "idx_hi": idx_hi}

    @torch.no_grad()
    def init_codebooks(self, images: Tensor, generator: torch.Generator) -> None:
        """Data-dependent start: each codebook from encoder outputs of a first batch (lo first, then hi)."""
        enc_hi, z_lo = self.encode(images)
        self.codebook_lo.init_from(z_lo, generator)
        q_lo = self.codebook_lo.lookup(self.codebook_lo.indices(z_lo))
        self.codebook_hi.init_from(self.hi_features(enc_hi, q_lo), generator)


def train_vq(
    vq: DiscreteLatentModel,
    batches: Iterable[Tensor],
    steps: int,
    lr: float,
    commitment: float = 0.25,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    restart: bool = True,
) -> list[float]:
    """Adam on the VQ-VAE loss for ``steps`` batches (images [B,3,H,W] in [0,1]); returns the losses.

    The parameters are trainable only inside this call (they stay frozen in DSR's later stages); the
    codebooks start from the first batch's encoder outputs unless already initialised (e.g. resumed).
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    params = list(vq.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(int(seed))
    losses: list[float] = []
    every = max(1, steps // 10)
    was_training = vq.training
    vq.train()
    try:
        for step, images in zip(range(steps), _cycle(batches), strict=False):
            if int(vq.codebook_lo.initialised) == 0:
                vq.init_codebooks(images, generator)
            loss, state = vq.training_loss(images, commitment)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"DSR VQ-VAE loss is {loss.item()} at step {step}: lower --model.vq_lr"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            vq.codebook_lo.ema_update(state["z_lo"], state["idx_lo"])
            vq.codebook_hi.ema_update(state["z_hi"], state["idx_hi"])
            if restart:
                vq.codebook_lo.restart_dead(state["z_lo"], generator)
                vq.codebook_hi.restart_dead(state["z_hi"], generator)
            losses.append(loss.item())
            if (step + 1) % every == 0 or step + 1 == steps:
                used = len(torch.unique(state["idx_hi"]))
                log(
                    f"adx: DSR VQ-VAE step {step + 1}/{steps}: loss {losses[-1]:.4f}, {used} hi codes in the batch"
                )
    finally:
        for p in params:
            p.requires_grad_(False)
        vq.train(was_training)
    if len(losses) < steps:
        raise RuntimeError(f"DSR VQ-VAE training got {len(losses)} batches for {steps} steps: no images?")
    return losses


def _cycle(batches: Iterable[Tensor]) -> Iterator[Tensor]:
    """Repeat an iterable of batches (a DataLoader) without end; stop if it yields nothing."""
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            return


# ---- weight files ------------------------------------------------------------------------------------
def save_vq(vq: DiscreteLatentModel, path: str | Path, provenance: dict[str, Any]) -> None:
    """Write the VQ-VAE's state and its provenance atomically (tmp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{id(vq)}.tmp")
    state = {k: v.detach().cpu().clone() for k, v in vq.state_dict().items()}
    torch.save({"format": FORMAT, "state_dict": state, "provenance": provenance}, tmp)
    tmp.replace(path)


def read_vq_file(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(state dict in adx's layout, provenance saved with it or {}) of a VQ-VAE weights file."""
    obj, provenance = read_state_file(path, VQWeightsError, "fix --model.vq_weights (a VQ-VAE weights file)")
    return from_authors_layout(obj), provenance


def load_vq(vq: DiscreteLatentModel, path: str | Path) -> dict[str, Any]:
    """Load a weights file into ``vq`` (shapes checked first); return the provenance saved with it."""
    state, provenance = read_vq_file(path)
    own = vq.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("initialised")]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(
                "shapes differ: "
                + ", ".join(
                    f"{k} {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} here" for k in wrong[:3]
                )
            )
        if missing:
            parts.append(f"missing: {missing[:3]}")
        if unexpected:
            parts.append(f"not in this model: {unexpected[:3]}")
        raise VQWeightsError(
            f"VQ-VAE weights {path} do not fit the configured model ({'; '.join(parts)}). "
            f"{settings_hint(state)}"
        )
    state = {**state, "codebook_lo.initialised": torch.ones((), dtype=torch.long)}
    state["codebook_hi.initialised"] = torch.ones((), dtype=torch.long)
    vq.load_state_dict(state)
    return provenance


def settings_hint(state: dict[str, Tensor]) -> str:
    """The model arguments that match a state dict's shapes, as a sentence (empty when unreadable)."""
    try:
        k, d = state["codebook_lo.vectors"].shape
        h = state["to_lo.weight"].shape[1]
        r = state["encoder_hi.5.0.conv3.weight"].shape[0]
        n = len({m.group(1) for key in state if (m := re.match(r"encoder_hi\.5\.(\d+)\.conv3", key))})
    except (KeyError, IndexError, ValueError):
        return "Use a file written by adx (adx.models.dsr.vq.save_vq) or the authors' VQ-VAE checkpoint."
    return (
        f"The file fits --model.codebook_size {k} --model.embedding_dim {d} --model.hiddens {h} "
        f"--model.residual_hiddens {r} --model.residual_layers {n}."
    )


# the authors' (and anomalib's) DiscreteLatentModel keys -> adx's
_AUTHORS = [
    (r"^_encoder_b\._conv_1\.", "encoder_hi.0."),
    (r"^_encoder_b\._conv_2\.", "encoder_hi.2."),
    (r"^_encoder_b\._conv_3\.", "encoder_hi.4."),
    (r"^_encoder_b\._residual_stack\._layers\.(\d+)\._block\.1\.", r"encoder_hi.5.\1.conv3."),
    (r"^_encoder_b\._residual_stack\._layers\.(\d+)\._block\.3\.", r"encoder_hi.5.\1.conv1."),
    (r"^_encoder_t\._conv_1\.", "encoder_lo.0."),
    (r"^_encoder_t\._conv_2\.", "encoder_lo.2."),
    (r"^_encoder_t\._residual_stack\._layers\.(\d+)\._block\.1\.", r"encoder_lo.4.\1.conv3."),
    (r"^_encoder_t\._residual_stack\._layers\.(\d+)\._block\.3\.", r"encoder_lo.4.\1.conv1."),
    (r"^_pre_vq_conv_top\.", "to_lo."),
    (r"^_pre_vq_conv_bot\.", "to_hi."),
    (r"^_vq_vae_top\._embedding\.weight$", "codebook_lo.vectors"),
    (r"^_vq_vae_top\._ema_cluster_size$", "codebook_lo.ema_count"),
    (r"^_vq_vae_top\._ema_w$", "codebook_lo.ema_sum"),
    (r"^_vq_vae_bot\._embedding\.weight$", "codebook_hi.vectors"),
    (r"^_vq_vae_bot\._ema_cluster_size$", "codebook_hi.ema_count"),
    (r"^_vq_vae_bot\._ema_w$", "codebook_hi.ema_sum"),
    (r"^upsample_t\.", "upsample_lo."),
    (r"^_decoder_b\._conv_1\.", "decoder.0."),
    (r"^_decoder_b\._residual_stack\._layers\.(\d+)\._block\.1\.", r"decoder.1.\1.conv3."),
    (r"^_decoder_b\._residual_stack\._layers\.(\d+)\._block\.3\.", r"decoder.1.\1.conv1."),
    (r"^_decoder_b\._conv_trans_1\.", "decoder.2."),
    (r"^_decoder_b\._conv_trans_2\.", "decoder.4."),
]


def from_authors_layout(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename the authors' VQ-VAE keys into adx's (other state dicts pass through unchanged)."""
    if not any(k.startswith("_encoder_b.") for k in state):
        return dict(state)
    out = {}
    for key, value in state.items():
        new = key
        for pattern, repl in _AUTHORS:
            new, hits = re.subn(pattern, repl, key)
            if hits:
                break
        out[new] = value
    return out
