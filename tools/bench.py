"""Side-by-side benchmark: adx (and optionally anomalib, the peer) on one MVTec-layout category.

    python tools/bench.py PatchCore ../shared/data/mvtec_ad screw --image-size 256 \
        --set model.coreset_ratio=0.1 --peer /work/peer_venv/bin/python --peer-weights lite0.pth \
        --out docs/bench/patchcore_screw.json

adx runs through its own CLI (fit without test, then ``test --ckpt``), so the figures are what a user
gets. Recorded: fit seconds, test seconds and images/s (the test loop, heatmaps included unless
``--no-heatmaps``), pure-model latency (forward on a preloaded batch, no data loading or metrics), peak
RSS of the process, and the metrics. The peer runs afterwards in its own virtual environment with
``../shared/tools/peer_anomalib.py`` and the same backbone weights; ratios are printed.
Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from adx.cli import main as adx_main
from adx.data import MVTec
from adx.models import MODELS

PEER_SCRIPT = Path(__file__).resolve().parents[2] / "shared" / "tools" / "peer_anomalib.py"
PEER_NAMES = {"PatchCore": "Patchcore", "Padim": "Padim"}
# trained methods, run on the peer by tools/peer_scratch.py with adx's run settings
PEER_SCRATCH = {
    "Draem": "Draem",
    "GANomaly": "Ganomaly",
    "DSR": "Dsr",
    "STFPM": "Stfpm",
    "EfficientAd": "EfficientAd",
    "ReverseDistillation": "ReverseDistillation",
}
# the peer's layer names for adx's strides, for methods with a pretrained network
PEER_LAYERS = {
    "tf_efficientnet_lite0": {4: "blocks.1", 8: "blocks.2", 16: "blocks.4"},
    "wide_resnet50_2": {4: "layer1", 8: "layer2", 16: "layer3"},
}


def peak_rss_mb() -> int:
    """Peak resident memory of this process and its finished children, in MiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(max(own, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024)


def latency(
    model_name: str, ckpt: Path, root: str, category: str, size: int, batch: int, repeats: int
) -> dict:
    """Seconds per image of the model's forward pass on a preloaded batch (after one warm-up)."""
    module = MODELS[model_name].load_from_checkpoint(ckpt, map_location="cpu").eval()
    dm = MVTec(root=root, category=category, image_size=size, eval_batch_size=batch, num_workers=0)
    dm.setup("test")
    images = next(iter(dm.test_dataloader()))["image"]
    with torch.inference_mode():
        module.model(images)
        t0 = time.perf_counter()
        for _ in range(repeats):
            module.model(images)
        seconds = (time.perf_counter() - t0) / repeats
    return {"batch": len(images), "ms_per_image": round(1000 * seconds / len(images), 2)}


def has_seed_argument(model: type) -> bool:
    """Whether ``model`` takes a ``seed`` argument (its own or its torch model's, as the CLI sees it)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(model, "model")
    return "model.seed" in parser.get_defaults()


def run_adx(args: argparse.Namespace, runs: Path) -> dict:
    config = Path(__file__).resolve().parents[1] / "configs" / args.model.lower() / "offline.yaml"
    common = [
        "--data.root",
        args.root,
        "--data.category",
        args.category,
        "--data.image_size",
        str(args.image_size),
        "--data.num_workers",
        str(args.workers),
        "--trainer.enable_progress_bar",
        "false",
    ]
    overrides = [f"--{kv.split('=', 1)[0]}={kv.split('=', 1)[1]}" for kv in args.set]
    if args.seed is not None:  # the run's seed and, where the model has one, its weights' and anomalies' seed
        overrides.append(f"--seed_everything={args.seed}")
        if has_seed_argument(MODELS[args.model]):
            overrides.append(f"--model.seed={args.seed}")
    timing = runs / "train_timing.json"
    if args.train_timing:  # per-epoch training time, measured by the code that times the peer
        timer = {"class_path": "train_timing.EpochTimer", "init_args": {"out": str(timing)}}
        overrides.append(f"--trainer.callbacks+={json.dumps(timer)}")
    t0 = time.perf_counter()
    adx_main(
        [
            "fit",
            "--config",
            str(config),
            *common,
            *overrides,
            "--root_dir",
            str(runs),
            "--test_after_fit",
            "false",
            "--heatmaps.enabled",
            "false",
        ]
    )
    fit_s = time.perf_counter() - t0
    (ckpt,) = runs.rglob("last.ckpt")
    t0 = time.perf_counter()
    adx_main(
        [
            "test",
            "--ckpt",
            str(ckpt),
            "--heatmaps.enabled",
            str(not args.no_heatmaps).lower(),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    test_cmd_s = time.perf_counter() - t0
    metrics_file = sorted(runs.rglob("metrics.json"))[-1]
    report = json.loads(metrics_file.read_text())
    with (metrics_file.parent / "scores.csv").open(newline="") as f:  # the test's per-image scores
        scores = {row["path"]: float(row["image_score"]) for row in csv.DictReader(f)}
    config = ckpt.parents[1] / "config.yaml"  # the fit's run folder (`adx test` writes a folder of its own)
    return {
        "run_config": yaml.safe_load(config.read_text()),
        "train": json.loads(timing.read_text()) if args.train_timing else None,
        "fit_s": round(fit_s, 2),
        "test_s": report["test_seconds"],
        "test_img_per_s": report["test_images_per_second"],
        # the whole `adx test --ckpt` call: config, model and checkpoint loading, loop, metrics, heatmaps
        "test_cmd_s": round(test_cmd_s, 2),
        "test_cmd_img_per_s": round(report["n_test"] / test_cmd_s, 2),
        "latency": latency(args.model, ckpt, args.root, args.category, args.image_size, 16, 3),
        "peak_rss_mb": peak_rss_mb(),
        "metrics": report["metrics"],
        "weights": report["weights"],
        "sources": report.get("sources"),
        "image_scores": scores,  # by image path, for tools/score_brightness.py
    }


def texture_folder(model: dict) -> str:
    """A folder of links to the texture files adx's anomaly source used, so the peer draws from the same."""
    from adx.models.components.sources.images import TextureSource

    folder = Path(tempfile.mkdtemp(prefix="adx_textures_"))
    for i, path in enumerate(TextureSource(model.get("init_args", {}).get("anomaly_source")).files):
        (folder / f"{i:03d}_{path.name}").symlink_to(path)
    return str(folder)


def natural_image_folder(model: dict) -> str:
    """A folder of links to the natural images adx's penalty source used, as one class folder (the peer reads an
    ImageFolder), so the peer's EfficientAD draws its penalty images from the same files."""
    from adx.models.components.sources.images import NaturalImages

    folder = Path(tempfile.mkdtemp(prefix="adx_natural_")) / "images"
    folder.mkdir()
    for i, path in enumerate(NaturalImages(model.get("init_args", {}).get("penalty_images")).files):
        (folder / f"{i:03d}_{path.name}").symlink_to(path)
    return str(folder.parent)


def run_peer_scratch(args: argparse.Namespace, adx: dict, out: Path) -> dict:
    """The peer's version of a from-scratch method with adx's image size, batch size, epochs (and widths)."""
    cfg = adx["run_config"]
    model, data = cfg["model"], cfg["data"]["init_args"]
    cmd = [
        args.peer,
        str(Path(__file__).with_name("peer_scratch.py")),
        PEER_SCRATCH[args.model],
        args.root,
        args.category,
        str(out),
        "--image-size",
        str(args.image_size),
        "--batch-size",
        str(data["batch_size"]),
        "--epochs",
        str(cfg["trainer"]["max_epochs"]),
        *[a for kv in args.peer_kw for a in ("--kw", kv)],
        *args.peer_arg,
        *(["--seed", str(args.seed)] if args.seed is not None else []),
    ]
    init = model.get("init_args", {})
    if args.model == "EfficientAd":  # the same teacher file, penalty images, steps and learning rate
        teacher = adx["sources"]["teacher"]
        cmd += [
            "--teacher",
            teacher.get("file") or teacher["cache_file"],
            "--imagenet-dir",
            natural_image_folder(model),
        ]
        limit = cfg["trainer"].get("limit_train_batches")
        if limit:
            cmd += ["--limit-train-batches", str(int(limit))]
        cmd += ["--kw", f"lr={model['init_args']['optimizer']['init_args']['lr']}"]
    if args.model in ("STFPM", "ReverseDistillation"):  # the teacher: the same architecture and weights file
        backbone = init.get("backbone", "tf_efficientnet_lite0")
        layers = [PEER_LAYERS[backbone][s] for s in init.get("strides", (4, 8, 16))]
        cmd += ["--backbone", backbone, "--weights", args.peer_weights, "--layers", *layers]
    if args.model == "Draem":
        widths = [str(init.get("reconstructive_width", 128)), str(init.get("discriminative_width", 64))]
        cmd += ["--widths", *widths, "--anomaly-source", texture_folder(model)]
    subprocess.run(
        cmd,
        check=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": str(torch.get_num_threads())},
    )
    return json.loads(out.read_text())


def run_peer(args: argparse.Namespace, out: Path) -> dict:
    extra = [
        kv.replace("model.coreset_ratio", "ratio") for kv in args.set if kv.startswith("model.coreset_ratio")
    ]
    cmd = [
        args.peer,
        str(PEER_SCRIPT),
        PEER_NAMES[args.model],
        args.root,
        args.category,
        "tf_efficientnet_lite0",
        args.peer_weights,
        str(out),
        str(args.image_size),
        *extra,
    ]
    subprocess.run(cmd, check=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("root")
    parser.add_argument("category")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], help="config override key=value (repeatable)")
    parser.add_argument("--no-heatmaps", action="store_true")
    parser.add_argument("--peer", help="python of a venv with anomalib (runs the peer after adx)")
    parser.add_argument("--peer-weights", help="timm state dict for the peer (tools/export_timm_weights.py)")
    parser.add_argument("--peer-kw", action="append", default=[], help="peer model argument key=value")
    parser.add_argument(
        "--peer-arg",
        action="append",
        default=[],
        help="an argument passed on to tools/peer_scratch.py as it is (repeatable; e.g. --peer-arg=--focal-alpha "
        "--peer-arg=none)",
    )
    parser.add_argument("--train-timing", action="store_true", help="record per-epoch training time")
    parser.add_argument(
        "--peer-after",
        help="an adx report of this script: run only the peer, with that run's settings, and add it",
    )
    parser.add_argument(
        "--seed",
        type=int,
        help="seed of both sides: adx's seed_everything and model seed, the from-scratch peer's --seed (default 0)",
    )
    parser.add_argument("--runs", default="/tmp/adx_bench_runs")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.seed is not None and args.peer and args.model not in PEER_SCRATCH:
        parser.error(f"--seed reaches the peer only for {', '.join(sorted(PEER_SCRATCH))} (peer_scratch.py)")
    if args.peer_after:  # the peer's side for an adx report written earlier (run apart, the same settings)
        record = json.loads(Path(args.peer_after).read_text())
        record["peer_command"] = " ".join(sys.argv) + " (the peer run apart from the adx run)"
        record["peer_seed"] = args.seed
    else:
        # the pid keeps two runs started in the same second (two jobs on the two cores) apart
        runs = (
            Path(args.runs) / f"{args.model}_{args.category}_{time.strftime('%Y%m%d-%H%M%S')}_{os.getpid()}"
        )
        record = {
            "command": " ".join(sys.argv),
            "cpu_threads": torch.get_num_threads(),
            "seed": 0 if args.seed is None else args.seed,
            "adx": run_adx(args, runs),
        }
    if args.peer:
        peer_out = Path(args.out).with_suffix(".peer.json")
        if args.model in PEER_SCRATCH:
            peer = run_peer_scratch(args, record["adx"], peer_out)
        else:
            peer = run_peer(args, peer_out)
        record["peer"] = peer
        record["ratios"] = {
            "fit_speedup": round(peer["fit_s"] / record["adx"]["fit_s"], 2),
            "test_throughput_ratio": round(record["adx"]["test_img_per_s"] / peer["test_img_per_s"], 2),
            "test_cmd_throughput_ratio": round(
                record["adx"]["test_cmd_img_per_s"] / peer["test_img_per_s"], 2
            ),
        }
        if record["adx"]["train"] and "train_img_per_s" in peer:
            ratio = record["adx"]["train"]["train_img_per_s"] / peer["train_img_per_s"]
            record["ratios"]["train_throughput_ratio"] = round(ratio, 2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1, default=str))
    print(json.dumps(record, indent=1, default=str))


if __name__ == "__main__":
    main()
