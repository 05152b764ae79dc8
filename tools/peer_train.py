"""Training throughput of anomalib (the peer) for tools/bench_train.py; run it with the peer venv's python.

    <peer-venv>/bin/python tools/peer_train.py Fastflow ROOT CATEGORY OUT.json --backbone resnet18 \
        --image-size 256 --batch-size 16 --batches 8 --epochs 3 [--layers layer1 layer2 layer3]

Backbones get random weights (pre_trained=False; STFPM's teacher through timm): throughput does not depend on them, and it avoids
needing the peer's hub downloads. Timed like adx in tools/bench_train.py: from the start of each
training epoch to the end of its last training batch (data loading included, validation excluded).
This file is a tool run inside the peer's environment; adx itself never imports anomalib.
"""

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from anomalib import models as peer_models
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from anomalib.pre_processing import PreProcessor
from torchvision.transforms.v2 import Compose, Grayscale, Normalize, Resize

from train_timing import EpochTimer, add_run_options  # tools/ is on sys.path when run as a script


def peer_run(
    args: argparse.Namespace,
    kwargs: dict[str, Any],
    folder: str,
    callbacks: list[Any] | None = None,
    **engine_options: Any,
) -> tuple[Any, MVTecAD, EpochTimer, Engine]:
    """The peer's model (kwargs plus ``--kw``), its MVTec AD data module and an Engine timed by EpochTimer.

    Shared with tools/peer_scratch.py: one CPU process, no logger, one validation batch per epoch.
    """
    kwargs = {**kwargs, **{k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.kw)}}
    model = getattr(peer_models, args.model)(**kwargs)
    dm = MVTecAD(
        root=args.root,
        category=args.category,
        train_batch_size=args.batch_size,
        eval_batch_size=args.batch_size,
        num_workers=0,
    )
    timer = EpochTimer()
    engine = Engine(
        default_root_dir=f"{tempfile.gettempdir()}/{folder}/{args.model}_{args.category}_{os.getpid()}",
        accelerator="cpu",
        devices=1,
        logger=False,
        max_epochs=args.epochs,
        limit_val_batches=1,
        callbacks=[timer, *(callbacks or [])],
        **engine_options,
    )
    return model, dm, timer, engine


def offline_timm(weights: str | None = None) -> None:
    """timm (and the peer's feature extractor) never download: pretrained backbones load ``weights`` (a timm
    state dict) from disk, or get random weights when it is None."""
    import timm
    from anomalib.models.components.feature_extractors import timm as peer_timm

    create = timm.create_model

    def create_offline(name: str, pretrained: bool = False, **kw):  # noqa: ANN202, ANN003
        kw.pop("pretrained_cfg", None)
        model = create(name, pretrained=False, **kw)
        if pretrained and weights:
            missing, _ = model.load_state_dict(torch.load(weights, map_location="cpu"), strict=False)
            if [k for k in missing if "num_batches" not in k]:
                raise RuntimeError(f"{weights} lacks {missing[:5]} for {name}")
        return model

    timm.create_model = create_offline
    peer_timm.timm.create_model = create_offline


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", choices=["Fastflow", "Cflow", "Stfpm", "ReverseDistillation"])
    parser.add_argument("root")
    parser.add_argument("category")
    parser.add_argument("out")
    add_run_options(parser)
    parser.add_argument("--layers", nargs="*", default=None)
    parser.add_argument(
        "--kw", action="append", default=[], help="extra model argument key=value (YAML value)"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    tf = Compose(
        [
            Grayscale(num_output_channels=3),
            Resize((args.image_size, args.image_size), antialias=True),
            Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
        ]
    )
    kwargs = {"backbone": args.backbone, "pre_trained": False, "pre_processor": PreProcessor(transform=tf)}
    if args.layers:
        kwargs["layers"] = args.layers
    if (
        args.model == "Stfpm"
    ):  # no pre_trained switch: its teacher is created pretrained, here with random weights
        del kwargs["pre_trained"]
        offline_timm()
    model, dm, timer, engine = peer_run(args, kwargs, "peer_train", limit_train_batches=args.batches)
    engine.fit(model=model, datamodule=dm)
    record = timer.record(
        peer="anomalib",
        model=args.model,
        backbone=args.backbone,
        layers=args.layers,
        extra=args.kw,
        image_size=args.image_size,
        batch_size=args.batch_size,
    )
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(json.dumps(record))


if __name__ == "__main__":
    main()
