"""GANomaly (Akçay, Atapour-Abarghouei and Breckon, ACCV 2018, arXiv 1805.06725) as a plain torch module.

Generator = encoder GE -> latent z -> decoder GD -> x_hat -> second encoder E -> z_hat; the discriminator D
has GE's architecture with a one-channel real/fake output, and its last hidden map is the feature used by the
adversarial (feature-matching) loss. All networks are DCGAN blocks: 4 x 4 stride-2 convolutions (BatchNorm
and LeakyReLU 0.2 after all but the first) halving the image while its smaller side stays >= 8 and both sides
even, then one convolution whose kernel covers the whole remaining map (4 x 4 for power-of-two squares, as in
the paper) to a 1 x 1 latent; the decoder mirrors it with transposed convolutions, BatchNorm, ReLU and a tanh
output. The depth (and width) therefore grows with the input size, which is fixed when the networks are built.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adx.models.components.autoencoder import InputSizeError
from adx.models.components.maps import gaussian_smooth
from adx.models.components.precise_bn import recompute_batchnorm
from adx.models.components.sources.augment import relight

Score = Literal["latent", "contextual", "contextual_mean"]
LatentDistance = Literal["l1", "l2"]

MIN_SIDE = 16
"""Smallest image side (a 16 px side is halved to 8, then 4, then covered by the final kernel)."""


def stage_sizes(size: Sequence[int]) -> list[tuple[int, int]]:
    """Map sizes after the first stride-2 convolution and each pyramid convolution, for an input ``size``.

    Halving continues while the smaller side is >= 8 and both sides are even, so the last map has a
    smaller side in 4..7 (exactly 4 x 4 for a power-of-two square, the DCGAN layout).
    """
    h, w = (int(v) for v in size)
    sizes = [(h // 2, w // 2)]
    while min(sizes[-1]) >= 8 and sizes[-1][0] % 2 == 0 and sizes[-1][1] % 2 == 0:
        sizes.append((sizes[-1][0] // 2, sizes[-1][1] // 2))
    return sizes


def check_size(
    size: Sequence[int], what: str = "the input", flag: str = "--data.image_size"
) -> tuple[int, int]:
    """(H, W) as ints; raise InputSizeError unless both sides are even and at least 16 px."""
    h, w = (int(v) for v in size)
    if h % 2 == 0 and w % 2 == 0 and min(h, w) >= MIN_SIDE:
        return h, w
    bad = h if (h % 2 or h < MIN_SIDE) else w
    nearest = max(MIN_SIDE, 16 * round(bad / 16))
    raise InputSizeError(
        f"{what} is {h}x{w} px, but GANomaly's stride-2 networks need even sides of at least {MIN_SIDE} px "
        f"(any multiple of 16 works): use {flag} {nearest}"
    )


class Encoder(nn.Module):
    """DCGAN encoder: [B,C,H,W] -> ``features`` [B,c,h,w] (last hidden map) -> ``final`` [B,out,1,1]."""

    def __init__(self, size: Sequence[int], channels: int, out: int, width: int, extra_layers: int) -> None:
        super().__init__()
        sizes = stage_sizes(size)
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 4, 2, 1, bias=False), nn.LeakyReLU(0.2)]
        for _ in range(extra_layers):
            layers += [nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.LeakyReLU(0.2)]
        c = width
        for _ in sizes[1:]:
            layers += [nn.Conv2d(c, 2 * c, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * c), nn.LeakyReLU(0.2)]
            c *= 2
        self.features = nn.Sequential(*layers)
        self.final = nn.Conv2d(c, out, sizes[-1], 1, 0, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.final(self.features(x))


class Decoder(nn.Module):
    """DCGAN decoder, the encoder mirrored: latent [B,latent,1,1] -> image [B,C,H,W] in (-1, 1) (tanh)."""

    def __init__(
        self, size: Sequence[int], channels: int, latent: int, width: int, extra_layers: int
    ) -> None:
        super().__init__()
        sizes = stage_sizes(size)
        c = width * 2 ** (len(sizes) - 1)
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(latent, c, sizes[-1], 1, 0, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(),
        ]
        for _ in sizes[1:]:
            layers += [nn.ConvTranspose2d(c, c // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(c // 2), nn.ReLU()]
            c //= 2
        for _ in range(extra_layers):
            layers += [nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
        layers += [nn.ConvTranspose2d(c, channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.main(z)


class Generator(nn.Module):
    """GE -> GD -> E: images x [B,C,H,W] in [-1,1] -> (x_hat, z, z_hat)."""

    def __init__(
        self, size: Sequence[int], channels: int, latent: int, width: int, extra_layers: int
    ) -> None:
        super().__init__()
        self.encoder = Encoder(size, channels, latent, width, extra_layers)
        self.decoder = Decoder(size, channels, latent, width, extra_layers)
        self.reencoder = Encoder(size, channels, latent, width, extra_layers)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        z = self.encoder(x)
        x_hat = self.decoder(z)
        return x_hat, z, self.reencoder(x_hat)


def dcgan_init(module: nn.Module) -> None:
    """DCGAN initialisation: conv weights N(0, 0.02), BatchNorm scale N(1, 0.02) and shift 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Parameters of ``module`` do not require gradients inside the block (restored after)."""
    states = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in states:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, state in states:
            p.requires_grad_(state)


class Generated(NamedTuple):
    """One generator pass: inputs x and reconstruction x_hat in [-1,1] [B,C,H,W], latents z, z_hat [B,d,1,1]."""

    x: Tensor
    x_hat: Tensor
    z: Tensor
    z_hat: Tensor


class GANomalyModel(nn.Module):
    """GANomaly generator and discriminator; scores by the latent distance (or the contextual map)."""

    def __init__(
        self,
        input_size: int | tuple[int, int] | None = None,
        latent_dim: int = 100,
        width: int = 64,
        extra_layers: int = 0,
        w_adv: float = 1.0,
        w_con: float = 50.0,
        w_enc: float = 1.0,
        score: Score = "latent",
        latent_distance: LatentDistance = "l1",
        map_sigma: float = 4.0,
        d_reinit_below: float = 1e-5,
        precise_bn: bool = False,
        brightness: float = 0.0,
        seed: int = 0,
    ) -> None:
        """GANomaly.

        Args:
            input_size: side (or [H, W]) the networks are built for; None: the data module's image size (its
                tile size when tiling), taken when fitting starts, and the stored size when a checkpoint loads.
            latent_dim: length of the latent vector z (the paper: 100).
            width: channels of the first convolution, doubled at every halving (the paper's DCGAN: 64).
            extra_layers: 3 x 3 conv + BatchNorm layers at full width after the first convolution (and before
                the decoder's last one; the authors' code: 0).
            w_adv: weight of the adversarial loss, L2 between D's features of x and x_hat (the paper: 1).
            w_con: weight of the contextual loss, L1 between x and x_hat (the paper: 50).
            w_enc: weight of the encoder loss, L2 between z and z_hat (the paper: 1).
            score: image score: ``latent`` (the paper's A(x), the distance between z and z_hat), ``contextual``
                (maximum of the anomaly map) or ``contextual_mean`` (its mean).
            latent_distance: ``l1`` (the paper's ||z - z_hat||_1, a sum) or ``l2`` (mean squared difference,
                what the authors' code scores with).
            map_sigma: Gaussian blur (pixels) of the anomaly map, the channel mean of |x - x_hat| (not in the
                paper, which has no map); 0 disables it.
            d_reinit_below: re-initialise the discriminator when its loss falls below this value (the authors'
                code: 1e-5); 0 never does.
            precise_bn: after every epoch, recompute the generator's BatchNorm statistics that inference uses,
                from one pass over the training images with the epoch's final weights (not in the paper).
            brightness: scale each training image by a factor drawn from [1 - brightness, 1 + brightness]
                (not in the paper: 0), so a global change of lighting is learnt as normal, as between a
                line's training and inspection days. Seeded by ``seed`` and the training step.
            seed: seed of the initial weights and of the brightness factors.
        """
        super().__init__()
        for name, value in (("latent_dim", latent_dim), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}: e.g. --model.{name} 100")
        if isinstance(extra_layers, bool) or not isinstance(extra_layers, int) or extra_layers < 0:
            raise ValueError(
                f"extra_layers must be an integer >= 0, got {extra_layers!r}: e.g. --model.extra_layers 0"
            )
        for name, value in (("w_adv", w_adv), ("w_con", w_con), ("w_enc", w_enc)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}: e.g. --model.{name} 1.0")
        if score not in ("latent", "contextual", "contextual_mean"):
            raise ValueError(
                f"score must be 'latent', 'contextual' or 'contextual_mean', got {score!r}: fix --model.score"
            )
        if latent_distance not in ("l1", "l2"):
            raise ValueError(
                f"latent_distance must be 'l1' or 'l2', got {latent_distance!r}: fix --model.latent_distance"
            )
        if not map_sigma >= 0:
            raise ValueError(
                f"map_sigma must be >= 0 (0: no blur), got {map_sigma}: e.g. --model.map_sigma 4"
            )
        if not 0.0 <= brightness < 1.0:
            raise ValueError(f"brightness must be in [0, 1), got {brightness!r}: e.g. --model.brightness 0.2")
        if not d_reinit_below >= 0:
            raise ValueError(
                f"d_reinit_below must be >= 0 (0: never), got {d_reinit_below}: e.g. --model.d_reinit_below 1e-5"
            )
        size = None
        if input_size is not None:
            pair = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
            if len(pair) != 2:
                raise ValueError(
                    f"input_size must be a side or [H, W], got {input_size!r}: e.g. --model.input_size 128"
                )
            size = check_size(pair, "input_size", "--model.input_size")
        self.latent_dim, self.width, self.extra_layers = latent_dim, width, extra_layers
        self.w_adv, self.w_con, self.w_enc = float(w_adv), float(w_con), float(w_enc)
        self.score, self.latent_distance, self.map_sigma = score, latent_distance, float(map_sigma)
        self.d_reinit_below, self.precise_bn, self.seed = float(d_reinit_below), precise_bn, seed
        self.brightness = float(brightness)
        self.channels = 3
        self.generator: Generator | None = None
        self.discriminator: Encoder | None = None
        self._size: tuple[int, int] | None = None  # a plain copy of built_size: no tensor reads when tracing
        self.register_buffer("built_size", torch.zeros(2, dtype=torch.long))
        self.register_buffer("trained_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("d_reinits", torch.zeros((), dtype=torch.long))
        self.loss_terms: dict[str, Tensor] = {}
        if size is not None:
            self.build(size)

    # ---- networks ----------------------------------------------------------------------------
    @property
    def built(self) -> bool:
        """True once the networks exist (they are sized for one input size)."""
        return self.generator is not None

    @property
    def size(self) -> tuple[int, int] | None:
        """(H, W) the networks were built for; None before."""
        return self._size

    def build(self, size: Sequence[int]) -> None:
        """Create the generator and discriminator for inputs of ``size`` (H, W), seeded by ``seed``."""
        h, w = check_size(size)
        if self.size == (h, w):
            return
        device = self.built_size.device
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            args = ((h, w), self.channels)
            self.generator = Generator(*args, self.latent_dim, self.width, self.extra_layers).to(device)
            self.discriminator = Encoder(*args, 1, self.width, self.extra_layers).to(device)
            dcgan_init(self.generator)
            dcgan_init(self.discriminator)
        self.built_size.copy_(torch.tensor([h, w]))
        self._size = (h, w)

    def reinit_discriminator(self) -> None:
        """Fresh DCGAN weights for the discriminator (its optimizer keeps its state, as in the authors' code)."""
        dcgan_init(self._networks()[1])
        self.d_reinits += 1

    def _networks(self) -> tuple[Generator, Encoder]:
        if self.generator is None or self.discriminator is None:
            raise RuntimeError(
                "GANomaly's networks are not built yet: fit the model (adx fit builds them for --data.image_size), "
                "give --model.input_size, or load a checkpoint"
            )
        return self.generator, self.discriminator

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        stored = state_dict.get(prefix + "built_size")
        if stored is not None and int(stored.min()) > 0:
            self.build(tuple(int(v) for v in stored))  # the networks of the stored size, then their weights
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---- training ----------------------------------------------------------------------------
    def check_images(self, images: Tensor) -> None:
        """Raise InputSizeError unless images are [B,3,H,W] at the size the networks were built for."""
        if images.ndim != 4 or images.shape[1] != self.channels:
            raise InputSizeError(f"GANomaly expects images [B,3,H,W], got {tuple(images.shape)}")
        size = self.size
        if size is not None and tuple(images.shape[-2:]) != size:
            raise InputSizeError(
                f"GANomaly was built for {size[0]}x{size[1]} px inputs, got {tuple(images.shape[-2:])}: resize "
                "them (the inference module does), or fit a model at this size"
            )

    def generate(self, images: Tensor) -> Generated:
        """Images [B,3,H,W] in [0,1] -> x and x_hat in [-1,1] and the latents z, z_hat [B,latent_dim,1,1]."""
        self.check_images(images)
        generator, _ = self._networks()
        x = images * 2.0 - 1.0  # the authors' Normalize(0.5, 0.5): the range of the tanh output
        x_hat, z, z_hat = generator(x)
        return Generated(x, x_hat, z, z_hat)

    def generator_loss(self, out: Generated) -> Tensor:
        """w_adv L_adv + w_con L_con + w_enc L_enc for one generator pass (D's weights get no gradient)."""
        _, discriminator = self._networks()
        with frozen(discriminator):
            adv = (discriminator.features(out.x) - discriminator.features(out.x_hat)).pow(2).mean()
        con = (out.x - out.x_hat).abs().mean()
        enc = (out.z - out.z_hat).pow(2).mean()
        self.loss_terms = {"adv": adv.detach(), "con": con.detach(), "enc": enc.detach()}
        return self.w_adv * adv + self.w_con * con + self.w_enc * enc

    def discriminator_loss(self, x: Tensor, x_hat: Tensor) -> Tensor:
        """Mean of the BCE of D's logits on real images (label 1) and reconstructions (label 0), both [B,C,H,W]."""
        _, discriminator = self._networks()
        real, fake = discriminator(x).flatten(), discriminator(x_hat.detach()).flatten()
        loss_real = F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
        loss_fake = F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
        self.loss_terms["d_real"], self.loss_terms["d_fake"] = loss_real.detach(), loss_fake.detach()
        return 0.5 * (loss_real + loss_fake)

    def relight(self, batch: dict[str, Any]) -> Tensor:
        """The batch's images, each scaled by its own factor in [1 - brightness, 1 + brightness] (training steps
        carry ``anomaly_step``: a fresh draw per step; other batches a fixed one per image path)."""
        keys = ("ganomaly-light", self.seed), ("ganomaly-light-eval", self.seed)
        return relight(batch, self.brightness, *keys)

    def loss(self, batch: dict[str, Any]) -> Tensor:
        """The generator's weighted loss on ``batch["image"]`` [B,3,H,W] (the validation loss)."""
        return self.generator_loss(self.generate(batch["image"]))

    def train_step(
        self,
        images: Tensor,
        opt_g: Any,
        opt_d: Any,
        backward: Callable[[Tensor], None] | None = None,
        check: Callable[[Tensor, str], Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """One generator step, then one discriminator step on images [B,3,H,W]; returns (g_loss, d_loss).

        As in the authors' code: the discriminator sees the reconstructions made before the generator step,
        and is re-initialised when its loss falls below ``d_reinit_below``. ``backward`` defaults to
        ``loss.backward()`` (Lightning passes ``manual_backward``); ``check`` may reject a loss (non-finite).
        """
        backward = backward or (lambda loss: loss.backward())
        out = self.generate(images)
        g_loss = self.generator_loss(out)
        if check is not None:
            g_loss = check(g_loss, "training")
        opt_g.zero_grad()
        backward(g_loss)
        opt_g.step()
        d_loss = self.discriminator_loss(out.x, out.x_hat)
        if check is not None:
            d_loss = check(d_loss, "training")
        opt_d.zero_grad()
        backward(d_loss)
        opt_d.step()
        if self.d_reinit_below > 0 and float(d_loss.detach()) < self.d_reinit_below:
            self.reinit_discriminator()
        return g_loss.detach(), d_loss.detach()

    @torch.no_grad()
    def fit_reference(self, batches: Iterable[dict[str, Any]]) -> None:
        """With ``precise_bn``: the generator's BatchNorm statistics = averages over one pass of the images."""
        if not self.precise_bn:
            return
        generator, _ = self._networks()

        def forward(batch: dict[str, Any]) -> int:
            self.generate(self.relight(batch))
            return len(batch["image"])

        recompute_batchnorm(generator, batches, forward, "GANomaly")

    def check_fitted(self) -> None:
        """Raise RuntimeError unless the networks were trained."""
        if not self.built or int(self.trained_steps) == 0:
            raise RuntimeError("GANomaly has not been trained: fit it (adx fit) or load a checkpoint")

    # ---- inference ---------------------------------------------------------------------------
    def latent_score(self, z: Tensor, z_hat: Tensor) -> Tensor:
        """Distance between the latents [B,d,1,1] -> [B]: sum |z - z_hat| (l1) or mean (z - z_hat)^2 (l2)."""
        diff = (z - z_hat).flatten(1)
        return diff.abs().sum(dim=1) if self.latent_distance == "l1" else diff.pow(2).mean(dim=1)

    def anomaly_map(self, out: Generated) -> Tensor:
        """Contextual error map [B,H,W]: channel mean of |x - x_hat| in image units ([0,1]), blurred by map_sigma."""
        return gaussian_smooth((out.x - out.x_hat).abs().mean(dim=1) * 0.5, self.map_sigma)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Images [B,3,H,W] in [0,1] -> image scores [B] and anomaly maps [B,H,W] (no branches on values)."""
        out = self.generate(images)
        amap = self.anomaly_map(out)
        if self.score == "latent":
            scores = self.latent_score(out.z, out.z_hat)
        elif self.score == "contextual":
            scores = amap.flatten(1).amax(dim=1)
        else:
            scores = amap.flatten(1).mean(dim=1)
        return scores, amap
