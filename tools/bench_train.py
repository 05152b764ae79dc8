"""Training throughput of a trained adx method, side by side with anomalib's (the peer's) version.

    python tools/bench_train.py FastFlow ../shared/data/mvtec_ad screw --backbone resnet18 \
        --image-size 256 --batch-size 16 --batches 8 --epochs 3 \
        --peer /path/to/anomalib-venv/bin/python --peer-model Fastflow --out docs/bench/fastflow_train_vs_peer.json

Both sides: the same images, backbone architecture with random weights (throughput does not depend on
the weights), image size, batch size, ``num_workers=0`` and number of batches per epoch. Each epoch is
timed from its start to the end of its last training batch (data loading included, validation
excluded), plus adx's reference-statistics pass after the last batch (CFlow's reference likelihood);
the figure is the median over epochs after the first (warm-up, and the epoch that fills adx's
frozen-feature cache: pass ``--batches`` covering the whole training set so later epochs hit it). The peer runs afterwards in
its own virtual environment via ``tools/peer_train.py``. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import yaml
from lightning.pytorch import Trainer, seed_everything

from adx.data import MVTec
from adx.models import MODELS
from train_timing import (  # tools/ is on sys.path when run as a script
    EpochTimer,
    add_run_options,
    run_options_argv,
)


def run_adx(args: argparse.Namespace) -> dict:
    seed_everything(0)
    overrides = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = MODELS[args.model](backbone=args.backbone, pretrained=False, **overrides)
    dm = MVTec(
        root=args.root,
        category=args.category,
        image_size=args.image_size,
        batch_size=args.batch_size,
        eval_batch_size=args.batch_size,
        num_workers=0,
    )
    timer = EpochTimer()
    reference = _time_reference(model, timer)
    trainer = Trainer(
        max_epochs=args.epochs,
        limit_train_batches=args.batches,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        callbacks=[timer],
    )
    trainer.fit(model, datamodule=dm)
    for i, seconds in enumerate(reference[: len(timer.seconds)]):
        timer.seconds[i] += seconds  # the reference pass belongs to the epoch's training cost
    return timer.record(
        reference_seconds=[round(s, 2) for s in reference],
        feature_cache=getattr(model, "feature_cache_mode", None),
        model=args.model,
        backbone=args.backbone,
        overrides=overrides,
        image_size=args.image_size,
        batch_size=args.batch_size,
    )


def _time_reference(model, timer: EpochTimer) -> list[float]:
    """Seconds of each epoch's reference-statistics pass (after the timer's last batch), appended per call."""
    seconds: list[float] = []
    fit = getattr(model, "fit_reference", None)
    if fit is None:
        return seconds

    def timed() -> None:
        t0 = time.perf_counter()
        fit()
        seconds.append(time.perf_counter() - t0)

    model.fit_reference = timed
    return seconds


def run_peer(args: argparse.Namespace, out: Path) -> dict:
    cmd = [
        args.peer,
        str(Path(__file__).with_name("peer_train.py")),
        args.peer_model,
        args.root,
        args.category,
        str(out),
        *run_options_argv(args),
    ]
    if args.peer_layers:
        cmd += ["--layers", *args.peer_layers]
    for kv in args.peer_set:
        cmd += ["--kw", kv]
    # the peer gets this process's thread count (its environment is otherwise cleared)
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    subprocess.run(cmd, check=True, env=env)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("root")
    parser.add_argument("category")
    add_run_options(parser)
    parser.add_argument(
        "--set", action="append", default=[], help="adx model argument key=value (repeatable)"
    )
    parser.add_argument("--peer", help="python of a venv with anomalib")
    parser.add_argument("--peer-model", help="anomalib model class (Fastflow, Cflow)")
    parser.add_argument("--peer-layers", nargs="*", help="anomalib layer names matching the adx strides")
    parser.add_argument("--peer-set", action="append", default=[], help="peer model argument key=value")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    record = {"command": " ".join(sys.argv), "adx": run_adx(args)}
    if args.peer:
        peer = run_peer(args, Path(args.out).with_suffix(".peer.json"))
        record["peer"] = peer
        record["train_throughput_ratio"] = round(
            record["adx"]["train_img_per_s"] / peer["train_img_per_s"], 2
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1, default=str))
    print(json.dumps(record, indent=1, default=str))


if __name__ == "__main__":
    main()
