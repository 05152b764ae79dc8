"""anomalib (the peer) training a method, for tools/bench.py --peer; run with the peer venv's python.

    <peer-venv>/bin/python tools/peer_scratch.py Draem ROOT CATEGORY OUT.json --image-size 128 \
        --batch-size 8 --epochs 20 [--anomaly-source DIR] [--widths 16 8] [--kw key=value ...]
    <peer-venv>/bin/python tools/peer_scratch.py Stfpm ROOT CATEGORY OUT.json --image-size 256 \
        --batch-size 32 --epochs 15 --backbone tf_efficientnet_lite0 --weights lite0.pth \
        --layers blocks.1 blocks.2 blocks.4

Fits the peer's model on the category's training images, then tests it on the test split, and records
per-epoch training time (tools/train_timing.EpochTimer, the same code that times adx), fit and test wall
time, peak RSS, the peer's own metrics and its raw score of every test image (``image_scores``).
``--widths R D`` narrows DRAEM's reconstructive and discriminative sub-networks (the peer hard-codes the
paper's 128 / 64) so both sides train the same network on a CPU; ``--anomaly-source`` points its Perlin
generator at the same texture files as adx's.
Methods with a pretrained network (STFPM's and Reverse Distillation's teachers) take ``--backbone``, ``--layers`` and ``--weights`` (a timm
state dict, tools/export_timm_weights.py), loaded where the peer would download its weights; their inputs are
normalised with ImageNet's statistics, the peer's default. Pure-model latency: the peer's torch model on one
preprocessed test batch in eval mode, after a warm-up, as tools/bench.py times adx's.
Validation is limited to one batch per epoch (the peer validates on the test split, which adx does not
do while training). This file is a tool run inside the peer's environment; adx itself never imports anomalib.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from anomalib.pre_processing import PreProcessor
from lightning.pytorch import Callback, seed_everything
from torchvision.transforms.v2 import Compose, Normalize, Resize

from peer_train import offline_timm, peer_run  # tools/ is on sys.path when run as a script
from train_timing import peak_rss_mb


def narrow_draem(reconstructive: int, discriminative: int) -> None:
    """Make the peer's DraemModel build its two sub-networks at the given base widths."""
    from anomalib.models.image.draem import torch_model as draem

    def init(self: torch.nn.Module, sspcab: bool = False) -> None:
        torch.nn.Module.__init__(self)
        self.reconstructive_subnetwork = draem.ReconstructiveSubNetwork(
            base_width=reconstructive, sspcab=sspcab
        )
        self.discriminative_subnetwork = draem.DiscriminativeSubNetwork(
            in_channels=6, out_channels=2, base_width=discriminative
        )

    draem.DraemModel.__init__ = init


def draem_focal_alpha(value: str) -> None:
    """Give the peer's DRAEM loss a focal loss with ``alpha`` = value ("none": every class weighted by 1).

    The peer builds ``kornia.losses.FocalLoss(alpha=1)``; kornia 0.9 weights class 0 (normal pixels) by
    1 - alpha, so the peer's segmentation loss has no term for normal pixels. The authors' focal loss weights
    both classes alike, which is what "none" restores.
    """
    from anomalib.models.image.draem import loss as draem_loss
    from kornia.losses import FocalLoss

    alpha = None if value.lower() == "none" else float(value)
    original = draem_loss.DraemLoss.__init__

    def init(self: torch.nn.Module) -> None:
        original(self)
        self.focal_loss = FocalLoss(alpha=alpha, reduction="mean")

    draem_loss.DraemLoss.__init__ = init


def install_teacher(path: str) -> None:
    """Make the peer's EfficientAD read adx's distilled PDN-S teacher instead of downloading the authors'.

    adx's file holds the PDN as an ``nn.Sequential`` (convolutions at 0, 3, 6, 8); the peer names them
    conv1..conv4. The converted file goes to a temporary folder the peer is pointed at.
    """
    import tempfile

    from anomalib.models.image.efficient_ad import lightning_model as effad

    stored = torch.load(path, map_location="cpu", weights_only=False)
    state = stored.get("state_dict", stored)
    names = {"0": "conv1", "3": "conv2", "6": "conv3", "8": "conv4"}
    converted = {f"{names[k.split('.')[0]]}.{k.split('.')[1]}": v for k, v in state.items()}
    folder = Path(tempfile.mkdtemp(prefix="peer_teacher_"))
    (folder / "efficientad_pretrained_weights").mkdir()
    torch.save(converted, folder / "efficientad_pretrained_weights" / "pretrained_teacher_small.pth")
    effad.get_pretrained_weights_dir = lambda: folder


def model_latency(model: torch.nn.Module, dm, repeats: int = 3) -> dict:  # noqa: ANN001
    """Milliseconds per image of the peer's torch model on one preprocessed test batch (after a warm-up)."""
    batch = next(iter(dm.test_dataloader()))
    images = model.pre_processor.transform(batch.image)
    net = model.model.eval()
    with torch.inference_mode():
        net(images)
        t0 = time.perf_counter()
        for _ in range(repeats):
            net(images)
        seconds = (time.perf_counter() - t0) / repeats
    return {"batch": len(images), "ms_per_image": round(1000 * seconds / len(images), 2)}


class ImageScores(Callback):
    """The peer's raw image score of every test image, by file path: its torch model's ``pred_score`` during
    the peer's own test pass (a forward hook), before the post-processing that min-max normalises and clips
    the scores to [0, 1] and ties many of them; so a run's ranking can be compared image by image
    (tools/score_brightness.py). ``map_means``: the mean of each image's anomaly map, where the model has one.
    """

    def __init__(self) -> None:
        self.scores: dict[str, float] = {}
        self.map_means: dict[str, float] = {}
        self._paths: list[str] = []
        self._hook = None

    def on_test_start(self, trainer, pl_module) -> None:  # noqa: ANN001, ARG002
        self._hook = pl_module.model.register_forward_hook(self._record)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001, ARG002
        self._paths = [str(p) for p in batch.image_path]

    def _record(self, module: torch.nn.Module, args: tuple, out) -> None:  # noqa: ANN001, ARG002
        values = out.pred_score.detach().flatten().tolist() if hasattr(out, "pred_score") else []
        if self._paths and len(values) == len(self._paths):
            self.scores.update(zip(self._paths, map(float, values), strict=True))
            maps = getattr(out, "anomaly_map", None)
            if maps is not None:
                means = maps.detach().flatten(1).mean(1).tolist()
                self.map_means.update(zip(self._paths, map(float, means), strict=True))
            self._paths = []

    def on_test_end(self, trainer, pl_module) -> None:  # noqa: ANN001, ARG002
        if self._hook is not None:
            self._hook.remove()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "model", choices=["Draem", "Ganomaly", "Dsr", "Stfpm", "EfficientAd", "ReverseDistillation"]
    )
    parser.add_argument("root")
    parser.add_argument("category")
    parser.add_argument("out")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--anomaly-source", help="folder of texture images for DRAEM's Perlin anomalies")
    parser.add_argument(
        "--widths", type=int, nargs=2, help="DRAEM's reconstructive and discriminative widths"
    )
    parser.add_argument(
        "--focal-alpha",
        help="DRAEM: alpha of the peer's kornia FocalLoss instead of its 1 ('none': both classes weighted by 1)",
    )
    parser.add_argument(
        "--teacher", help="EfficientAD: adx's teacher file (its PDN-S), loaded in the peer's layout"
    )
    parser.add_argument("--imagenet-dir", help="EfficientAD: a folder of class folders of penalty images")
    parser.add_argument("--limit-train-batches", type=int, help="training batches per epoch (adx's setting)")
    parser.add_argument(
        "--backbone", help="timm backbone of a pretrained network (STFPM's or Reverse Distillation's teacher)"
    )
    parser.add_argument("--layers", nargs="*", help="the peer's layer names for --backbone")
    parser.add_argument("--weights", help="timm state dict of --backbone (tools/export_timm_weights.py)")
    parser.add_argument(
        "--kw", action="append", default=[], help="extra model argument key=value (YAML value)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of python, numpy and torch (seed sweeps)")
    args = parser.parse_args()
    if args.focal_alpha is not None and args.model != "Draem":
        parser.error(f"--focal-alpha applies to Draem only, not {args.model}")
    seed_everything(args.seed)
    steps = [Resize((args.image_size, args.image_size))]
    if args.backbone:
        steps.append(Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]))
    kwargs = {"pre_processor": PreProcessor(transform=Compose(steps))}
    if args.weights:
        offline_timm(args.weights)
    if args.backbone:
        kwargs["backbone"] = args.backbone
    if args.layers:
        kwargs["layers"] = args.layers
    if args.model == "Draem":
        if args.widths:
            narrow_draem(*args.widths)
        if args.anomaly_source:
            kwargs["dtd_dir"] = args.anomaly_source
        if args.focal_alpha is not None:
            draem_focal_alpha(args.focal_alpha)
    if args.model == "Ganomaly":
        kwargs["batch_size"] = args.batch_size
    if args.model == "EfficientAd":
        kwargs.update(imagenet_dir=args.imagenet_dir, padding=True, model_size="small")
        install_teacher(args.teacher)
    engine_options = {}
    if args.limit_train_batches:
        engine_options["limit_train_batches"] = args.limit_train_batches
    scores = ImageScores()
    model, dm, timer, engine = peer_run(args, kwargs, "peer_scratch", [scores], **engine_options)
    t0 = time.perf_counter()
    engine.fit(model=model, datamodule=dm)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    results = engine.test(model=model, datamodule=dm)
    test_s = time.perf_counter() - t0
    n_test = len(dm.test_data)
    record = timer.record(
        peer="anomalib",
        model=args.model,
        category=args.category,
        image_size=args.image_size,
        batch_size=args.batch_size,
        epochs=args.epochs,
        widths=args.widths,
        teacher=args.teacher,
        limit_train_batches=args.limit_train_batches,
        backbone=args.backbone,
        layers=args.layers,
        anomaly_source=args.anomaly_source,
        focal_alpha=args.focal_alpha,
        extra=args.kw,
    )
    record.update(
        fit_s=round(fit_s, 2),
        test_s=round(test_s, 2),
        n_test=n_test,
        test_img_per_s=round(n_test / test_s, 2),
        latency=model_latency(model, dm),
        peak_rss_mb=peak_rss_mb(),
        metrics={k: float(v) for k, v in results[0].items()},
        image_scores=scores.scores,
        image_map_means=scores.map_means,
    )
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(json.dumps(record))


if __name__ == "__main__":
    main()
