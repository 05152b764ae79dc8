"""GANomaly probe: train once on a real category, score the test set many ways every few epochs.

    OMP_NUM_THREADS=1 python tools/ganomaly_scores.py --root ../shared/data/mvtec_loco --category juice_bottle \
        --image_size 64 --batch_size 64 --epochs 15 --eval_every 5 --out /tmp/ganomaly_juice.json

The study behind src/adx/models/ganomaly/README.md ("Why GANomaly scores low on industrial images"). It
trains adx's GANomalyModel with its own ``train_step`` (the adapter's step: Adam 2e-4, betas 0.5/0.999 for
both networks, the paper's loss weights) on the training images in a seeded order, dropping the last
partial batch as the authors' loader does, and reports image AUROC of every score below under three
BatchNorm regimes, all from the same weights:

- ``running``: eval mode, BatchNorm's running averages (what an exported model uses; anomalib scores so);
- ``batch``: train-mode BatchNorm on test batches of 32 (statistics of the batch, running averages left as
  they are; the authors' test code never calls ``eval()``), so a score depends on its batch-mates;
- ``precise``: eval mode after recomputing the generator's statistics from one pass over the training
  images (adx's ``precise_bn``).

Scores: ``latent`` (the paper's sum |z - z_hat|), ``latent_l2`` (mean squared, the authors' code),
``latent_std`` (sum of |z - z_hat| standardised per latent dimension by its mean and std over the training
images), ``contextual`` (max of the channel-mean |x - x_hat| map blurred with sigma 4 px), ``contextual_raw``
(max, no blur), ``contextual_mean`` (mean of the map), and ``z_norm`` (||z||, no reconstruction at all).
``rho_brightness`` is each score's Spearman correlation with the test image's mean intensity over the test
set; ``brightness`` is the AUROC of that intensity alone (tools/brightness_baseline.py).

``--input_norm imagenet`` and ``--adv_loss probabilities`` switch on two choices anomalib 2.7 makes (see
``PeerChoices``); the defaults are the paper's and adx's.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from scipy.stats import spearmanr
from torch import Tensor, nn

from adx.data import MVTec
from adx.metrics import image_auroc
from adx.models.components.maps import gaussian_smooth
from adx.models.ganomaly import GANomalyModel
from adx.models.ganomaly.torch_model import Generated, frozen

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class PeerChoices(GANomalyModel):
    """GANomalyModel with two of anomalib 2.7's choices switchable, to measure what each does.

    ``input_norm="imagenet"``: the encoder sees ImageNet-standardised images and the contextual loss compares
    the tanh output with them (anomalib's default pre-processing), instead of images mapped to [-1, 1].
    ``adv_loss="probabilities"``: the adversarial term is the mean squared difference of D's sigmoid outputs
    for x and x_hat (anomalib's ``GeneratorLoss``) instead of the paper's feature matching.
    """

    def __init__(self, input_norm: str = "tanh", adv_loss: str = "features", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.input_norm, self.adv_loss = input_norm, adv_loss

    def generate(self, images: Tensor) -> Generated:
        if self.input_norm == "tanh":
            return super().generate(images)
        mean, std = (torch.tensor(v, device=images.device).view(1, 3, 1, 1) for v in IMAGENET)
        x = (images - mean) / std
        x_hat, z, z_hat = self.generator(x)
        return Generated(x, x_hat, z, z_hat)

    def generator_loss(self, out: Generated) -> Tensor:
        if self.adv_loss == "features":
            return super().generator_loss(out)
        with frozen(self.discriminator):
            real = torch.sigmoid(self.discriminator(out.x))
            fake = torch.sigmoid(self.discriminator(out.x_hat))
        adv = (real - fake).pow(2).mean()
        con = (out.x - out.x_hat).abs().mean()
        enc = (out.z - out.z_hat).pow(2).mean()
        self.loss_terms = {"adv": adv.detach(), "con": con.detach(), "enc": enc.detach()}
        return self.w_adv * adv + self.w_con * con + self.w_enc * enc


@contextmanager
def batch_statistics(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers normalise with the batch's statistics and leave their running averages alone."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [(m, m.momentum) for m in norms]
    for m in norms:
        m.train()
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in saved:
            m.momentum = momentum
            m.eval()


def passes(model: GANomalyModel, images: Tensor, regime: str) -> tuple[Tensor, Tensor, Tensor]:
    """(z [N,d], z_hat [N,d], map [N,H,W]) over ``images`` in batches of 32."""
    zs, z_hats, maps = [], [], []
    model.eval()
    for i in range(0, len(images), 32):
        x = images[i : i + 32]
        if regime == "batch":
            with batch_statistics(model.generator):
                out = model.generate(x)
        else:
            out = model.generate(x)
        zs.append(out.z.flatten(1))
        z_hats.append(out.z_hat.flatten(1))
        maps.append((out.x - out.x_hat).abs().mean(dim=1) * 0.5)
    return torch.cat(zs), torch.cat(z_hats), torch.cat(maps)


@torch.no_grad()
def evaluate(model: GANomalyModel, train: Tensor, test: Tensor, labels: Any, regime: str) -> dict[str, Any]:
    saved = None
    if regime == "precise":
        saved = {k: v.clone() for k, v in model.generator.state_dict().items()}
        model.precise_bn = True
        model.fit_reference({"image": train[i : i + 64]} for i in range(0, len(train), 64))
        model.precise_bn = False
    z, z_hat, maps = passes(model, test, regime)
    z_train, z_hat_train, _ = passes(model, train, regime)
    if saved is not None:
        model.generator.load_state_dict(saved)
    diff, diff_train = z - z_hat, z_train - z_hat_train
    std = diff_train.std(0) + 1e-6
    scores = {
        "latent": diff.abs().sum(1),
        "latent_l2": diff.pow(2).mean(1),
        "latent_std": ((diff - diff_train.mean(0)) / std).abs().sum(1),
        "contextual": gaussian_smooth(maps, 4.0).flatten(1).amax(1),
        "contextual_raw": maps.flatten(1).amax(1),
        "contextual_mean": maps.flatten(1).mean(1),
        "z_norm": z.norm(dim=1),
    }
    brightness = test.mean(dim=(1, 2, 3)).numpy()
    report: dict[str, Any] = {k: round(image_auroc(v.numpy(), labels), 3) for k, v in scores.items()}
    report["rho_brightness"] = {
        k: round(float(spearmanr(scores[k].numpy(), brightness).statistic), 2)
        for k in ("latent", "latent_std", "contextual", "contextual_mean")
    }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", required=True, help="dataset folder, e.g. ../shared/data/mvtec_ad")
    parser.add_argument("--category", required=True)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--eval_every", type=int, default=5)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--latent_dim", type=int, default=100)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--w_adv", type=float, default=1.0)
    parser.add_argument("--w_con", type=float, default=50.0)
    parser.add_argument("--w_enc", type=float, default=1.0)
    parser.add_argument("--d_reinit_below", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--input_norm", choices=("tanh", "imagenet"), default="tanh", help="see PeerChoices")
    parser.add_argument("--adv_loss", choices=("features", "probabilities"), default="features")
    parser.add_argument("--out", default=None, help="JSON report")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    dm = MVTec(
        root=args.root,
        category=args.category,
        image_size=args.image_size,
        batch_size=args.batch_size,
        eval_batch_size=32,
        num_workers=0,
        val_source="none",
    )
    dm.setup("fit")
    dm.setup("test")
    train = torch.cat([b["image"] for b in dm.reference_dataloader()])
    test_batches = list(dm.test_dataloader())
    test = torch.cat([b["image"] for b in test_batches])
    labels = torch.cat([torch.as_tensor(b["label"]) for b in test_batches]).numpy()
    model = PeerChoices(
        input_norm=args.input_norm,
        adv_loss=args.adv_loss,
        input_size=args.image_size,
        latent_dim=args.latent_dim,
        width=args.width,
        w_adv=args.w_adv,
        w_con=args.w_con,
        w_enc=args.w_enc,
        d_reinit_below=args.d_reinit_below,
        seed=args.seed,
    )
    g, d = model._networks()
    opt_g = torch.optim.Adam(g.parameters(), lr=args.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(d.parameters(), lr=args.lr, betas=(0.5, 0.999))
    report: dict[str, Any] = {
        "args": vars(args),
        "train_images": len(train),
        "test_images": len(test),
        "anomalous": int(labels.sum()),
        "brightness": round(image_auroc(test.mean(dim=(1, 2, 3)).numpy(), labels), 3),
        "epochs": [],
    }
    print(json.dumps({k: v for k, v in report.items() if k != "epochs"}), flush=True)
    n, bs = len(train), args.batch_size
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(n)
        started, g_sum, d_sum, steps = time.time(), 0.0, 0.0, 0
        for i in range(0, n - bs + 1 if n >= bs else 1, bs):  # drop the last partial batch
            g_loss, d_loss = model.train_step(train[order[i : i + bs]], opt_g, opt_d)
            g_sum, d_sum, steps = g_sum + float(g_loss), d_sum + float(d_loss), steps + 1
        row: dict[str, Any] = {
            "epoch": epoch,
            "steps": epoch * steps,
            "g_loss": round(g_sum / steps, 4),
            "d_loss": round(d_sum / steps, 4),
            "last_terms": {k: round(float(v), 4) for k, v in model.loss_terms.items()},
            "d_reinits": int(model.d_reinits),
            "s_per_epoch": round(time.time() - started, 1),
        }
        if epoch % args.eval_every == 0 or epoch == args.epochs:
            for regime in ("running", "batch", "precise"):
                row[regime] = evaluate(model, train, test, labels, regime)
        print(json.dumps(row), flush=True)
        report["epochs"].append(row)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
