"""Input-normalisation experiments: why one mean/std suits one dataset and not another (docs/normalization.md).

Three sub-commands, each writing JSON records (one per run) that docs/normalization.md tabulates:

    # weights-only and activation probes: which preprocessing the lite0 weights were trained with, and how far
    # each dataset's activations sit from the weights' training statistics under each normalisation
    python tools/ablate_normalization.py probe --data ../shared/data --out docs/bench/normalization_probe.json

    # PatchCore / PaDiM with the plain torch models (no Lightning), one run per --norm, all in one process
    python tools/ablate_normalization.py run --method patchcore --root ../shared/data/mvtec_ad --category screw \
        --norm backbone imagenet shift scale --size 256 --ratio 0.01 --out docs/bench/normalization_patchcore.json

    # any method through `adx fit` (FastFlow and CFlow need the training loop), one fit per --norm
    python tools/ablate_normalization.py fit --method fastflow --root ../shared/data/mvtec_ad --category screw \
        --norm backbone imagenet --set trainer.max_epochs=5 --out docs/bench/normalization_fastflow.json

``--norm`` takes the extractor's own values (``backbone``, ``imagenet``, ``none``, ``m1,m2,m3/s1,s2,s3``) or
one of the named variants in ``VARIANTS`` below, which separate the ways ImageNet statistics differ from the
weights' own (mean = std = 0.5): the per-channel mean shift, the overall scale, and both. ``data`` matches the
training images' pooled brightness and contrast to the natural-image statistics the weights saw.
Records are appended to ``--out`` (a JSON list); a record with the same method, category, norm and options
replaces the older one.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GRAY_MEAN, GRAY_STD = sum(IMAGENET_MEAN) / 3, sum(IMAGENET_STD) / 3  # 0.449, 0.226


def _fmt(mean: tuple[float, ...], std: tuple[float, ...]) -> str:
    return ",".join(f"{v:g}" for v in mean) + "/" + ",".join(f"{v:g}" for v in std)


# name -> (extractor option, what it isolates)
VARIANTS: dict[str, tuple[str, str]] = {
    "backbone": ("backbone", "the weights' own statistics (lite0: mean = std = 0.5, i.e. (x*255-127)/128)"),
    "imagenet": ("imagenet", "ImageNet per-channel mean and std"),
    "none": ("none", "no normalisation: [0, 1] input (scale x0.5 and shift vs backbone)"),
    "shift": (_fmt(IMAGENET_MEAN, (0.5,) * 3), "ImageNet per-channel mean at the weights' scale (std 0.5)"),
    "scale": (_fmt((0.5,) * 3, IMAGENET_STD), "the weights' mean with ImageNet std: contrast x2.2 only"),
    "gray-imagenet": (
        _fmt((round(GRAY_MEAN, 3),) * 3, (round(GRAY_STD, 3),) * 3),
        "ImageNet scale and overall shift with equal channels (imagenet minus its channel differences)",
    ),
    "std1.0": (_fmt((0.5,) * 3, (1.0,) * 3), "the weights' mean, contrast x0.5"),
    "std0.35": (_fmt((0.5,) * 3, (0.35,) * 3), "the weights' mean, contrast x1.43"),
    "std0.15": (_fmt((0.5,) * 3, (0.15,) * 3), "the weights' mean, contrast x3.3"),
    "data": (
        "data",
        "training images' pooled mean/std mapped onto natural-image statistics at the weights' scale",
    ),
}

# natural-image statistics the lite0 weights saw: ImageNet pixels through (x - 0.5) / 0.5, pooled over channels
NATURAL_MEAN = sum((m - 0.5) / 0.5 for m in IMAGENET_MEAN) / 3  # -0.102
NATURAL_STD = GRAY_STD / 0.5  # 0.452


def resolve_norm(name: str, train_images: torch.Tensor | None = None) -> tuple[str, str]:
    """(extractor option string, description) for a variant name or a raw option."""
    if name in VARIANTS:
        option, what = VARIANTS[name]
    else:
        option, what = name, "explicit"
    if option == "data":
        if train_images is None:
            raise SystemExit("--norm data needs the training images (use it with `run`)")
        option = data_matched(train_images)
    return option, what


def data_matched(images: torch.Tensor) -> str:
    """mean/std that give the training images' pooled pixels the natural-image mean and std at the weights' scale.

    (x - m) / s has mean NATURAL_MEAN and std NATURAL_STD over the training pixels when s = s_d / NATURAL_STD and
    m = m_d - NATURAL_MEAN * s; pooled over channels, so colour ratios (and equal grey channels) are kept.
    """
    m_d, s_d = float(images.mean()), float(images.std())
    s = s_d / NATURAL_STD
    m = m_d - NATURAL_MEAN * s
    return _fmt((round(m, 4),) * 3, (round(s, 4),) * 3)


def stats_of(option: str) -> tuple[list[float], list[float]]:
    """(mean, std) per channel of an extractor option for the default backbone."""
    import timm

    from adx.models.components.extractor import normalization_stats

    cfg = timm.create_model("tf_efficientnet_lite0", pretrained=False).pretrained_cfg
    return normalization_stats(option, cfg)


# ------------------------------------------------------------------------------------------ records
def write_records(path: str, records: list[dict[str, Any]]) -> None:
    """Append records to the JSON list at ``path``, replacing a record with the same key."""
    out = Path(path)
    old = json.loads(out.read_text()) if out.is_file() else []

    def key(r: dict[str, Any]) -> str:
        return json.dumps([r["method"], r["category"], r["norm"], r["options"]], sort_keys=True)

    new_keys = {key(r) for r in records}
    merged = [r for r in old if key(r) not in new_keys] + records
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(merged, indent=1) + "\n")


def _doc_path(path: str) -> str:
    """Dataset paths as the docs write them (../shared/data/...)."""
    return re.sub(r"^/work/shared/data", "../shared/data", str(path))


def _command(argv: list[str]) -> str:
    return " ".join(shlex.quote(_doc_path(a)) for a in argv)


def _base_record(method: str, root: str, category: str, norm: str, option: str, what: str) -> dict[str, Any]:
    mean, std = stats_of(option)
    return {
        "method": method,
        "dataset": Path(root).name,
        "category": category,
        "norm": norm,
        "normalization": option,
        "mean": [round(v, 4) for v in mean],
        "std": [round(v, 4) for v in std],
        "isolates": what,
    }


def _metrics(scores, labels, maps, masks, has_mask) -> dict[str, float]:  # noqa: ANN001
    from adx.metrics import compute_metrics

    m = compute_metrics(scores, labels, maps, masks, has_mask)
    return {k: round(float(m[k]), 4) for k in ("image_AUROC", "pixel_AUROC", "AUPRO") if k in m}


# --------------------------------------------------------------------------------------------- run
def _load(
    root: str, category: str, size: int, gray: bool = False
) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    from adx.data import MVTec

    dm = MVTec(root=root, category=category, image_size=size, num_workers=0, val_source="none", batch_size=32)
    dm.setup("fit")
    torch.manual_seed(0)  # the training loader shuffles; the order moves the coreset's start point
    train = torch.cat([b["image"] for b in dm.train_dataloader()])
    test = [{k: b[k] for k in ("image", "label", "mask", "has_mask")} for b in dm.test_dataloader()]
    if gray:  # luminance in all three channels: an RGB dataset turned into the grayscale case
        train = _to_gray(train)
        for b in test:
            b["image"] = _to_gray(b["image"])
    return train, test


def _to_gray(images: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (images * weights).sum(1, keepdim=True).expand_as(images).contiguous()


def _run_one(
    method: str, option: str, train: torch.Tensor, test: list[dict], args: argparse.Namespace
) -> dict:
    extra = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    if method == "patchcore":
        from adx.models.patchcore.torch_model import PatchCoreModel

        model = PatchCoreModel(coreset_ratio=args.ratio, normalization=option, progress=False, **extra)
    else:
        from adx.models.padim.torch_model import PadimModel

        model = PadimModel(normalization=option, **extra)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(train), 32):
            model.update(train[i : i + 32])
        model.fit()
        t1 = time.perf_counter()
        out = [(*model(b["image"]), b["label"], b["mask"][:, 0], b["has_mask"]) for b in test]
        t2 = time.perf_counter()
    scores, maps, labels, masks, has_mask = (torch.cat(x) for x in zip(*out, strict=True))
    rec = _metrics(scores, labels, maps, masks, has_mask)
    # where each image's maximum lies: the brightness rank of that pixel within its own image (0 darkest,
    # 1 brightest); on screw the background is the bright part, the screw the dark part
    gray = torch.cat([b["image"].mean(1) for b in test]).flatten(1)
    top = gray.gather(1, maps.flatten(1).argmax(1, keepdim=True))
    rank = (gray < top).float().mean(1)
    normal = labels == 0
    rec["max_brightness_rank"] = {
        "normal": round(float(rank[normal].mean()), 3),
        "anomalous": round(float(rank[~normal].mean()), 3),
    }
    rec.update(fit_s=round(t1 - t0, 1), test_s=round(t2 - t1, 1))
    return rec


def cmd_run(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    train, test = _load(args.root, args.category, args.size, args.gray)
    records = []
    for norm in args.norm:
        option, what = resolve_norm(norm, train)
        rec = _base_record(args.method, args.root, args.category, norm, option, what)
        options = {"image_size": args.size, "val_source": "none"}
        if args.method == "patchcore":
            options["coreset_ratio"] = args.ratio
        if args.gray:
            options["gray"] = True
        options.update({k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.set)})
        rec["options"] = options
        argv = [
            "python",
            "tools/ablate_normalization.py",
            "run",
            "--method",
            args.method,
            "--root",
            args.root,
            "--category",
            args.category,
            "--norm",
            norm,
            "--size",
            str(args.size),
        ]
        if args.method == "patchcore":
            argv += ["--ratio", str(args.ratio)]
        for kv in args.set:
            argv += ["--set", kv]
        if args.gray:
            argv += ["--gray"]
        rec["command"] = _command(argv)
        rec.update(_run_one(args.method, option, train, test, args))
        rec["date"] = datetime.date.today().isoformat()
        print(json.dumps(rec), flush=True)
        records.append(rec)
        if args.out:
            write_records(args.out, [rec])


# --------------------------------------------------------------------------------------------- fit
CONFIGS = {m: f"configs/{m}/offline.yaml" for m in ("patchcore", "padim", "fastflow", "cflow")}


def cmd_fit(args: argparse.Namespace) -> None:
    for norm in args.norm:
        option, what = resolve_norm(norm)
        argv = [
            "adx",
            "fit",
            "--config",
            CONFIGS[args.method],
            "--data.root",
            args.root,
            "--data.category",
            args.category,
            "--model.normalization",
            option,
            "--data.val_source",
            "none",
            "--heatmaps.enabled",
            "false",
        ]
        argv += [f"--{kv.split('=', 1)[0]}={kv.split('=', 1)[1]}" for kv in args.set]
        run_argv = argv + ["--root_dir", args.root_dir, "--trainer.enable_progress_bar", "false"]
        env = dict(os.environ)
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        t0 = time.perf_counter()
        proc = subprocess.run(run_argv, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        found = re.findall(r"adx: results in (\S+)", proc.stderr)
        if proc.returncode or not found:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"adx fit failed ({proc.returncode}) for {norm}")
        metrics = json.loads((Path(found[-1]) / "metrics.json").read_text())
        rec = _base_record(args.method, args.root, args.category, norm, option, what)
        rec["options"] = {
            "config": CONFIGS[args.method],
            "val_source": "none",
            **dict(kv.split("=", 1) for kv in args.set),
        }
        rec["command"] = (f"OMP_NUM_THREADS={args.threads} " if args.threads else "") + _command(argv)
        rec.update(
            {k: round(float(metrics["metrics"][k]), 4) for k in ("image_AUROC", "pixel_AUROC", "AUPRO")}
        )
        rec["wall_s"] = round(wall, 1)
        rec["run_dir"] = found[-1]
        rec["date"] = datetime.date.today().isoformat()
        print(json.dumps(rec), flush=True)
        if args.out:
            write_records(args.out, [rec])


# ------------------------------------------------------------------------------------------- probe
def _natural_crops(size: int = 224) -> torch.Tensor:
    """Crops of the RGB photographs scikit-image installs (no download): a small natural-image sample."""
    import numpy as np
    import skimage.data
    from PIL import Image

    names = [
        "astronaut.png",
        "chelsea.png",
        "coffee.png",
        "rocket.jpg",
        "motorcycle_left.png",
        "motorcycle_right.png",
    ]
    crops = []
    for name in names:
        img = Image.open(Path(skimage.data.data_dir) / name).convert("RGB")
        w, h = img.size
        scale = 256 / min(w, h)
        img = img.resize((round(w * scale), round(h * scale)), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)
        _, hh, ww = x.shape
        for top, left in [
            (0, 0),
            (0, ww - size),
            (hh - size, 0),
            (hh - size, ww - size),
            ((hh - size) // 2, (ww - size) // 2),
        ]:
            crops.append(x[:, top : top + size, left : left + size])
    return torch.stack(crops)


def _classify(images: torch.Tensor, options: list[str]) -> dict[str, Any]:
    """Top-1 ImageNet class of each photograph with the full lite0 classifier, per normalisation."""
    import timm
    from timm.data import ImageNetInfo

    from adx.models.components.weights import read_state_dict, resolve_weights, to_timm_layout

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    path = resolve_weights("tf_efficientnet_lite0")
    model.load_state_dict(to_timm_layout(read_state_dict(path), model, path))
    model.eval()
    info = ImageNetInfo()
    out = {}
    for option in options:
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in stats_of(option))
        with torch.no_grad():
            prob = model((images - mean) / std).softmax(-1)
        top = prob.max(-1)
        out[option] = {
            "top1": [info.index_to_description(int(i)) for i in top.indices],
            "mean_top1_prob": round(float(top.values.mean()), 4),
            "mean_entropy": round(float(-(prob * prob.clamp_min(1e-12).log()).sum(-1).mean()), 4),
        }
    return out


def _stem_fit() -> dict[str, Any]:
    """Which input mean the stem BatchNorm's running mean implies (conv_stem has no bias).

    running_mean[o] = sum_c A[o,c] * mu_c with A[o,c] = sum_ij W[o,c,i,j] and mu_c the mean of normalised
    channel c over the training images (padding ignored); least squares over the 32 channels gives mu, which
    is compared with ImageNet's pixel mean through each candidate normalisation.
    """
    from adx.models.components.extractor import Backbone

    net = Backbone(strides=(8,), optimize=False).model
    w = net.conv_stem.weight.detach().double()
    a = w.sum(dim=(2, 3))  # [32, 3]
    rm = net.bn1.running_mean.detach().double()
    mu = torch.linalg.lstsq(a, rm[:, None]).solution[:, 0]
    resid = rm - a @ mu
    r2 = 1 - float(resid.pow(2).sum() / (rm - rm.mean()).pow(2).sum())
    pixel = torch.tensor(IMAGENET_MEAN, dtype=torch.float64)
    cands = {}
    for name, (m, s) in {
        "backbone 0.5/0.5": ((0.5,) * 3, (0.5,) * 3),
        "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    }.items():
        mu_c = (pixel - torch.tensor(m, dtype=torch.float64)) / torch.tensor(s, dtype=torch.float64)
        pred = a @ mu_c
        cands[name] = {
            "implied_mu": [round(float(v), 4) for v in mu_c],
            "rms_error_of_running_mean": round(float((pred - rm).pow(2).mean().sqrt()), 4),
        }
    for name in cands:
        cands[name]["implied_mu_channel_mean"] = round(sum(cands[name]["implied_mu"]) / 3, 4)
    # A's columns are nearly parallel (stem filters see the three channels alike): the channel mean of mu is
    # well determined, the differences between channels much less (singular values below)
    sv = torch.linalg.svdvals(a)
    return {
        "fitted_mu": [round(float(v), 4) for v in mu],
        "fitted_mu_channel_mean": round(float(mu.mean()), 4),
        "fit_R2": round(r2, 4),
        "singular_values_of_A": [round(float(v), 3) for v in sv],
        "rms_running_mean": round(float(rm.pow(2).mean().sqrt()), 4),
        "candidates": cands,
        "implied_mean_if_std_0.5": round(float(pixel.mean() - mu.mean() * 0.5), 4),
        "implied_std_if_mean_0.5": round(float((pixel.mean() - 0.5) / mu.mean()), 4),
    }


def _activation_stats(images: torch.Tensor, options: list[str]) -> dict[str, Any]:
    """Per normalisation: distance of each BatchNorm's input batch statistics from its running statistics
    (mean over channels of KL(N(batch) || N(running)), median and max over layers) and the fraction of
    ReLU6 outputs clipped at 6 and at 0, with the unfolded lite0 feature network up to stride 16."""
    from timm.layers import BatchNormAct2d

    from adx.models.components.extractor import Backbone, _drop_unused_stages

    net = Backbone(strides=(8, 16), optimize=False).model  # BatchNorm unfolded
    _drop_unused_stages(net)
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    acts = [
        m.act for m in net.modules() if isinstance(m, BatchNormAct2d) and isinstance(m.act, torch.nn.ReLU6)
    ]
    state: dict[str, Any] = {}

    def bn_hook(mod, inp, _out):  # noqa: ANN001
        x = inp[0]
        mb = x.mean((0, 2, 3))
        vb = (x * x).mean((0, 2, 3)) - mb * mb + mod.eps
        mr, vr = mod.running_mean, mod.running_var + mod.eps
        kl = 0.5 * (torch.log(vr / vb) + (vb + (mb - mr) ** 2) / vr - 1)
        state["kl"].setdefault(id(mod), []).append(float(kl.mean()))

    def act_hook(_mod, _inp, y):  # noqa: ANN001
        state["clip6"] += int((y >= 6 - 1e-6).sum())
        state["clip0"] += int((y <= 0).sum())
        state["count"] += y.numel()

    hooks = [m.register_forward_hook(bn_hook) for m in bns] + [
        a.register_forward_hook(act_hook) for a in acts
    ]
    out = {}
    for option in options:
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in stats_of(option))
        state.update(kl={}, clip6=0, clip0=0, count=0)
        with torch.no_grad():
            for i in range(0, len(images), 16):
                net((images[i : i + 16] - mean) / std)
        per_layer = [sum(state["kl"][id(m)]) / len(state["kl"][id(m)]) for m in bns]  # bns in forward order
        s = sorted(per_layer)
        out[option] = {
            "bn_kl_median": round(s[len(s) // 2], 4),
            "bn_kl_mean": round(sum(s) / len(s), 4),
            "bn_kl_first_layer": round(per_layer[0], 4),
            "bn_kl_last_layer": round(per_layer[-1], 4),
            "relu6_clipped_at_6": round(state["clip6"] / state["count"], 5),
            "relu6_zero": round(state["clip0"] / state["count"], 4),
        }
    for h in hooks:
        h.remove()
    return out


def cmd_probe(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"command": _command(["python", "tools/ablate_normalization.py", *sys.argv[1:]])}
    result["stem_batchnorm_fit"] = _stem_fit()
    natural = _natural_crops()
    main_opts = [VARIANTS[n][0] for n in ("backbone", "imagenet", "shift", "scale", "gray-imagenet", "none")]
    result["classification_of_natural_photos"] = _classify(natural, main_opts)
    result["activations"] = {"natural_photos": _activation_stats(natural, main_opts)}
    from adx.data import MVTec
    from adx.data.dataset import AnomalyDataset

    for root, category in [
        ("mvtec_ad", "screw"),
        ("magnetic_tile", "magnetic_tile"),
        ("mvtec_loco", "juice_bottle"),
    ]:
        dm = MVTec(
            root=str(Path(args.data) / root),
            category=category,
            image_size=256,
            num_workers=0,
            val_source="none",
            batch_size=32,
        )
        dm.setup("fit")
        samples = dm.train_samples[:: max(1, len(dm.train_samples) // args.images)][: args.images]
        ds = AnomalyDataset(samples, 256)
        train = torch.stack([ds[i]["image"] for i in range(len(ds))])
        opts = main_opts + [data_matched(train)]
        result["activations"][category] = _activation_stats(train, opts)
        result["activations"][category]["pixels"] = {
            "mean": [round(float(v), 3) for v in train.mean((0, 2, 3))],
            "std": [round(float(v), 3) for v in train.std((0, 2, 3))],
            "data_matched": opts[-1],
        }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


# ------------------------------------------------------------------------------------------- table
def method_table(records: list[dict[str, Any]], method: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows (normalisation x category: image AUROC / pixel AUROC / AUPRO) of one method's records."""
    rows = [r for r in records if r["method"] == method]
    cats = list(dict.fromkeys(r["category"] for r in rows))
    body = []
    for key in dict.fromkeys(_row_key(r) for r in rows):
        cells = []
        for cat in cats:
            hit = [r for r in rows if r["category"] == cat and _row_key(r) == key]
            cells.append(
                " ; ".join(f"{r['image_AUROC']:.3f} / {r['pixel_AUROC']:.3f} / {r['AUPRO']:.3f}" for r in hit)
                or "-"
            )
        first = next(r for r in rows if _row_key(r) == key)
        stats = _fmt(tuple(first["mean"]), tuple(first["std"])) if first["norm"] != "data" else "from data"
        body.append([key, stats, *cells])
    return ["normalisation", "mean / std", *cats], body


def cmd_table(args: argparse.Namespace) -> None:
    """Markdown table (image AUROC / pixel AUROC / AUPRO) per category x norm from record files."""
    records = [r for path in args.files for r in json.loads(Path(path).read_text())]
    for method in dict.fromkeys(r["method"] for r in records):
        header, body = method_table(records, method)
        print(f"\n{method}: image AUROC / pixel AUROC / AUPRO\n")
        for cells in [header, ["---"] * len(header), *body]:
            print("| " + " | ".join(cells) + " |")


def _row_key(r: dict[str, Any]) -> str:
    extra = {k: v for k, v in r["options"].items() if k in ("seed", "gray")}
    return r["norm"] + ("".join(f", {k}={v}" for k, v in extra.items()) if extra else "")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run", help="PatchCore or PaDiM in one process, one run per --norm")
    p.add_argument("--method", choices=["patchcore", "padim"], default="patchcore")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--ratio", type=float, default=0.01, help="PatchCore coreset ratio")
    p.add_argument("--gray", action="store_true", help="replace each image by its luminance in all channels")
    f = sub.add_parser("fit", help="any method through adx fit, one fit per --norm")
    f.add_argument("--method", choices=list(CONFIGS), required=True)
    f.add_argument("--root_dir", default="/tmp/adx_normalization_runs")
    for q in (p, f):
        q.add_argument("--root", required=True)
        q.add_argument("--category", required=True)
        q.add_argument(
            "--norm",
            nargs="+",
            default=["backbone", "imagenet"],
            help=f"variants {', '.join(VARIANTS)} or an extractor option",
        )
        q.add_argument(
            "--set", action="append", default=[], help="run: model argument key=json; fit: option=value"
        )
        q.add_argument("--out", default=None)
        q.add_argument("--threads", type=int, default=None)
    r = sub.add_parser("probe", help="weights-only and activation probes")
    r.add_argument("--data", required=True, help="folder holding mvtec_ad, magnetic_tile and mvtec_loco")
    r.add_argument("--images", type=int, default=24, help="training images per dataset (evenly spaced)")
    r.add_argument("--out", default=None)
    r.add_argument("--threads", type=int, default=None)
    t = sub.add_parser("table", help="markdown tables from record files")
    t.add_argument("files", nargs="+")
    args = parser.parse_args()
    {"run": cmd_run, "fit": cmd_fit, "probe": cmd_probe, "table": cmd_table}[args.cmd](args)


if __name__ == "__main__":
    main()
