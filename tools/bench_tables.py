"""Write the tables of docs/benchmarks.md from the raw reports under docs/bench/, so the two cannot drift.

    python tools/bench_tables.py            # rewrite the generated tables in place
    python tools/bench_tables.py --check    # exit 1 (with a diff) when a table differs from its JSON

Exit status 2: a declared report or key is missing, or a marker is missing, unknown or unclosed.

A generated table sits between ``<!-- table:NAME -->`` and ``<!-- /table -->`` in the Markdown; this
script owns those lines and leaves everything else (prose, commands, hand-written tables) alone. Each
table is declared in TABLES below: its columns (header + where the value is in the JSON + how it is
printed) and its rows (a label and the JSON file(s) the row is read from). To add a measured row, put
its report in docs/bench/, add a row here and run the script.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from functools import partial
from pathlib import Path
from typing import Any

import ablate_normalization  # tools/ is on sys.path when this runs as a script
import bench_kshot
import bench_tiling

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
BENCH = ROOT / "docs" / "bench"
BLOCK = re.compile(r"^<!-- table:(?P<name>[\w-]+) -->\n(?P<body>.*?)^<!-- /table -->$", re.M | re.S)


# ----------------------------------------------------------------------------------------------------
# formatting: half-up rounding of the number as written in the JSON (8.25 -> 8.3, as a person rounds)


def fixed(digits: int) -> Callable[[Any], str]:
    """A formatter with ``digits`` decimals, rounded half up."""

    def fmt(value: Any) -> str:
        step = Decimal(1).scaleb(-digits)
        return str(Decimal(repr(float(value))).quantize(step, rounding=ROUND_HALF_UP))

    return fmt


def whole(value: Any) -> str:
    """A whole number with thousands separators: 1763.4 -> 1,763."""
    return f"{int(Decimal(repr(float(value))).quantize(Decimal(1), rounding=ROUND_HALF_UP)):,}"


def text(value: Any) -> str:
    return str(value)


def ratio(digits: int, suffix: str = "x") -> Callable[[Any], str]:
    return lambda value: fixed(digits)(value) + suffix


def image_size(value: Sequence[int] | int) -> str:
    """``[320, 320]`` -> 320, ``[400, 200]`` -> 400x200 (H x W)."""
    h, w = (value, value) if isinstance(value, int) else value
    return str(h) if h == w else f"{h}x{w}"


def dataset(data: dict[str, Any]) -> str:
    """``mvtec_ad/screw``, or ``magnetic_tile`` where dataset and category share the name."""
    name, category = data["name"], data["category"]
    return name if name == category else f"{name}/{category}"


# ----------------------------------------------------------------------------------------------------
# declarations


@dataclass(frozen=True)
class Col:
    """A column: header, the row's source and dotted path of the value, and its formatter."""

    header: str
    source: str
    path: str = ""
    fmt: Callable[[Any], str] = text
    missing: str | None = None  # printed when the value is absent (None: an error)


@dataclass(frozen=True)
class Row:
    """A row: its label (the ``label`` source) and the JSON file of each other source, relative to docs/bench."""

    label: str
    files: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Table:
    """Columns x rows; each cell is a column's value in its row's JSON."""

    columns: list[Col]
    rows: list[Row]


@dataclass(frozen=True)
class Transposed:
    """A table with one row per quantity, read from one report."""

    header: list[str]
    file: str
    rows: list[Callable[[dict[str, Any]], list[str]]]


@dataclass(frozen=True)
class Rendered:
    """A table whose header and rows a function builds from its reports (keyed by file name)."""

    files: list[str]
    build: Callable[[dict[str, Any]], tuple[list[str], list[list[str]]]]


def lookup(tree: Any, path: str) -> Any:
    """``tree["a"]["b"]`` for path ``a.b`` (``a.0`` indexes lists); the whole tree for an empty path."""
    for part in path.split(".") if path else []:
        tree = tree[int(part)] if isinstance(tree, list) else tree[part]
    return tree


def quality_row(label: str, model: str, category: str) -> Row:
    """A row of the PatchCore/PaDiM quality table: tools/bench.py's report and the run's metrics.json."""
    return Row(label, {"bench": f"{model}_{category}.json", "run": f"{model}_{category}_metrics.json"})


def flow_row(label: str, stem: str) -> Row:
    return Row(label, {"run": f"{stem}_metrics.json"})


QUALITY = Table(
    columns=[
        Col("model", "label"),
        Col("category", "run", "data", dataset),
        Col("image size", "run", "data.image_size", image_size),
        Col("image AUROC", "bench", "adx.metrics.image_AUROC", fixed(3)),
        Col("pixel AUROC", "bench", "adx.metrics.pixel_AUROC", fixed(3)),
        Col("AUPRO (FPR 0.3)", "bench", "adx.metrics.AUPRO", fixed(3)),
        Col("image F1-max", "bench", "adx.metrics.image_F1max", fixed(3)),
        Col("fit, s", "bench", "adx.fit_s", whole),
        Col("test, images/s", "bench", "adx.test_img_per_s", fixed(1)),
        Col("latency, ms/image", "bench", "adx.latency.ms_per_image", whole),
        Col("peak RSS, MB", "bench", "adx.peak_rss_mb", whole),
    ],
    rows=[
        quality_row("PatchCore (10 % coreset)", "patchcore", "screw"),
        quality_row("PatchCore (1 % coreset) ¹", "patchcore", "magnetic_tile"),
        quality_row("PatchCore (10 % coreset)", "patchcore", "juice_bottle"),
        quality_row("PaDiM (100 of 176 channels)", "padim", "screw"),
        quality_row("PaDiM", "padim", "magnetic_tile"),
        quality_row("PaDiM", "padim", "juice_bottle"),
    ],
)

# fit seconds, whole-command seconds and peak RSS of these runs were not recorded in their metrics.json:
# they stay in a hand-written table next to the generated one
FLOW_COLUMNS = [
    Col("model", "label"),
    Col("category", "run", "data", dataset),
    Col("epochs", "run", "fit.epochs"),
    Col("image AUROC", "run", "metrics.image_AUROC", fixed(3)),
    Col("pixel AUROC", "run", "metrics.pixel_AUROC", fixed(3)),
    Col("AUPRO (FPR 0.3)", "run", "metrics.AUPRO", fixed(3)),
    Col("image F1-max", "run", "metrics.image_F1max", fixed(3)),
    Col("pixel F1-max", "run", "metrics.pixel_F1max", fixed(3)),
    Col("test, images/s", "run", "test_images_per_second", fixed(1)),
]
CATEGORIES = ("screw", "magnetic_tile", "juice_bottle")

FLOWS = Table(
    FLOW_COLUMNS,
    [flow_row("FastFlow", f"fastflow_{c}") for c in CATEGORIES]
    + [flow_row("CFlow", f"cflow_{c}") for c in CATEGORIES],
)
FLOWS_LONG = Table(
    FLOW_COLUMNS,
    [flow_row("FastFlow", f"fastflow50_{c}") for c in CATEGORIES]
    + [flow_row("FastFlow, `zscore_map`", f"fastflow50_zscore_{c}") for c in CATEGORIES]
    + [flow_row("CFlow", f"cflow40_{c}") for c in CATEGORIES],
)

# bench_train.py reports: throughput of both sides, their ratio and both peak RSS
TRAIN_PEER_COLUMNS = [
    Col("adx, images/s", "r", "adx.train_img_per_s", fixed(1)),
    Col("anomalib 2.7, images/s", "r", "peer.train_img_per_s", fixed(1)),
    Col("ratio", "r", "train_throughput_ratio", ratio(2)),
    Col(
        "peak RSS adx / peer, MB",
        "r",
        "",
        lambda r: f"{whole(r['adx']['peak_rss_mb'])} / {whole(r['peer']['peak_rss_mb'])}",
    ),
]

TRAIN_VS_PEER = Table(
    columns=[Col("method", "label"), *TRAIN_PEER_COLUMNS],
    rows=[
        Row("FastFlow", {"r": "fastflow_train_vs_peer.json"}),
        Row("CFlow", {"r": "cflow_train_vs_peer.json"}),
    ],
)


def _epochs(r: dict[str, Any]) -> str:
    """Per-epoch seconds, e.g. ``31.7 / 30.7 / 26.8``."""
    return " / ".join(fixed(1)(s) for s in r["epoch_seconds"])


def train_cache_table(rows: dict[str, str]) -> Table:
    """Per-epoch seconds and images/s of tools/bench_train.py reports, adx (cached) against the peer, one row
    per ``{label: report file}``."""
    return Table(
        columns=[
            Col("method", "label"),
            Col("adx epochs, s (1st fills the cache)", "r", "adx", _epochs),
            Col("anomalib 2.7 epochs, s", "r", "peer", _epochs),
            *TRAIN_PEER_COLUMNS,
        ],
        rows=[Row(label, {"r": file}) for label, file in rows.items()],
    )


TRAIN_CACHE_VS_PEER = train_cache_table(
    {"FastFlow": "fastflow_train_cache_vs_peer.json", "CFlow": "cflow_train_cache_vs_peer.json"}
)


TILING = Rendered(
    files=[f"tiling_{name}.json" for name in bench_tiling.RUNS],
    build=lambda reports: (
        bench_tiling.HEADER,
        [bench_tiling.row(name, reports[f"tiling_{name}.json"]) for name in bench_tiling.RUNS],
    ),
)


def _runtime(reports: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """One row per model x batch size: median ms per call of each runtime, images/s and speed-up vs torch."""
    header = [
        "model",
        "batch",
        "torch, ms",
        "ONNX Runtime, ms",
        "OpenVINO, ms",
        "images/s torch / ORT / OV",
        "ORT vs torch",
        "OV vs torch",
    ]
    body = []
    for m in reports["runtime_cpu.json"]["models"]:
        h, w = m["input_size"]
        bank = f", bank {whole(m['bank_rows'])} rows" if m.get("bank_rows") else ""
        for batch, per in m["batches"].items():
            t, o, v = (per[k] for k in ("torch", "onnxruntime", "openvino"))
            body.append(
                [
                    f"{m['method']} ({image_size([h, w])} px{bank})",
                    batch,
                    fixed(1)(t["median_ms"]),
                    fixed(1)(o["median_ms"]),
                    fixed(1)(v["median_ms"]),
                    " / ".join(fixed(1)(r["images_per_s"]) for r in (t, o, v)),
                    ratio(2)(o["speedup_vs_torch"]),
                    ratio(2)(v["speedup_vs_torch"]),
                ]
            )
    return header, body


RUNTIME = Rendered(files=["runtime_cpu.json"], build=_runtime)


def serve_row(label: str, file: str) -> Row:
    return Row(label, {"r": file})


SERVE = Table(
    columns=[
        Col("bundle", "label"),
        Col("1 client p50 / p95, ms", "r", "single_client", lambda c: f"{c['p50_ms']} / {c['p95_ms']}"),
        Col("20 clients p50 / p95, ms", "r", "", lambda r: f"{r['p50_ms']} / {r['p95_ms']}"),
        Col("requests/s (20 clients)", "r", "throughput_rps", fixed(1)),
        Col("failures / requests", "r", "", lambda r: f"{r['n_failures']} / {r['requests']}"),
        Col("load before", "r", "machine.load_average_before", fixed(2)),
    ],
    rows=[
        serve_row("PatchCore demo (synthetic, 128 px), shared machine", "serve_load.json"),
        serve_row("PaDiM, screw (256 px)", "serve_load_padim_screw.json"),
        serve_row("PatchCore, screw (320 px, 46,080-row bank)", "serve_load_patchcore_screw.json"),
    ],
)

KSHOT_FILES = [f"kshot_{c}.json" for c in ("screw", "juice_bottle", "magnetic_tile")]
KSHOT = Rendered(
    files=KSHOT_FILES,
    build=lambda reports: (
        bench_kshot.HEADER,
        [row for f in KSHOT_FILES for row in bench_kshot.rows(reports[f])],
    ),
)


def normalization_table(method: str) -> Rendered:
    """image AUROC / pixel AUROC / AUPRO per normalisation x category of one method (docs/normalization.md)."""
    file = f"normalization_{method}.json"
    return Rendered(
        files=[file],
        build=lambda reports: ablate_normalization.method_table(reports[file], method),
    )


HIGHRES = Transposed(
    header=["quantity", "value"],
    file="highres_wrn50_1024.json",
    rows=[
        lambda r: [
            "training images x patches",
            f"{r['pool_images']} x {whole(r['pool_patches'] / r['pool_images'])}",
        ],
        lambda r: [
            "pool patches (kept on disk)",
            f"{whole(r['pool_patches'])} ({'yes' if r['pool_on_disk'] else 'no'})",
        ],
        lambda r: ["memory bank (1 %)", whole(r["bank_size"])],
        lambda r: [
            "features, s / peak RSS, MB",
            f"{whole(r['features_s'])} / {whole(r['peak_rss_features_mb'])}",
        ],
        lambda r: [
            "coreset and bank, s / peak RSS, MB",
            f"{whole(r['coreset_and_bank_s'])} / {whole(r['peak_rss_after_coreset_mb'])}",
        ],
        lambda r: ["test, s", whole(r["test_s"])],
        lambda r: [
            "fit + test, s / overall peak RSS, MB",
            f"{whole(r['fit_and_test_s'])} / {whole(r['peak_rss_mb'])}",
        ],
    ],
)


def _less(r: dict[str, Any]) -> str:
    return ratio(1, "x less")(r["peer"]["peak_rss_mb"] / r["adx"]["peak_rss_mb"])


def _both(
    label: str, adx: str, peer: str, fmt: Callable[[Any], str], last: Callable[[Any], str], note: str = ""
) -> Callable[[dict[str, Any]], list[str]]:
    """A row of the transposed peer table: adx's value, the peer's and the ratio column."""
    return lambda r: [
        label.format(n=r["peer"]["n_test"], batch=r["adx"]["latency"]["batch"]),
        fmt(lookup(r, adx)),
        fmt(lookup(r, peer)) + note if peer else "n/a",
        last(r),
    ]


def _none(r: dict[str, Any]) -> str:
    return ""


PATCHCORE_VS_PEER = Transposed(
    header=["", "adx", "anomalib 2.7", "ratio"],
    file="patchcore_screw_vs_peer.json",
    rows=[
        _both(
            "fit (features + coreset + index), s",
            "adx.fit_s",
            "peer.fit_s",
            fixed(1),
            lambda r: ratio(1, "x faster")(r["ratios"]["fit_speedup"]),
        ),
        _both(
            "test loop, images/s ({n} images)",
            "adx.test_img_per_s",
            "peer.test_img_per_s",
            fixed(1),
            lambda r: ratio(1)(r["ratios"]["test_throughput_ratio"]),
        ),
        _both(
            "whole `adx test --ckpt` command, images/s (config, model and checkpoint loading included)",
            "adx.test_cmd_img_per_s",
            "peer.test_img_per_s",
            fixed(1),
            lambda r: ratio(1)(r["ratios"]["test_cmd_throughput_ratio"]),
            note=" ¹",  # the footnote under the table: the peer's figure excludes its start-up
        ),
        _both(
            "pure model latency, ms/image (batch {batch}, no loading or metrics)",
            "adx.latency.ms_per_image",
            "",
            fixed(1),
            _none,
        ),
        _both("peak RSS, MB", "adx.peak_rss_mb", "peer.peak_rss_mb", whole, _less),
        _both("image AUROC", "adx.metrics.image_AUROC", "peer.metrics.image_AUROC", fixed(3), _none),
        _both("pixel AUROC", "adx.metrics.pixel_AUROC", "peer.metrics.pixel_AUROC", fixed(3), _none),
    ],
)


# docs/bench/floor_<method>.json: the metrics.json of the run that set a CI floor
# (tests/integration/test_quality_floor.py), with the command, date, floor and repeat run added
FLOOR = Table(
    columns=[
        Col("model", "label"),
        Col("category", "run", "data", dataset),
        Col("image size", "run", "data.image_size", image_size),
        Col("epochs", "run", "fit.epochs", missing="-"),
        Col("image AUROC", "run", "metrics.image_AUROC", fixed(3)),
        Col("repeat", "run", "repeat.metrics.image_AUROC", fixed(3)),
        Col("floor", "run", "floor.image_AUROC", fixed(3)),
        Col("pixel AUROC", "run", "metrics.pixel_AUROC", fixed(3)),
        Col("floor", "run", "floor.pixel_AUROC", fixed(3), missing="-"),
        Col("test time, s", "run", "test_call_s", whole),
    ],
    rows=[
        Row(label, {"run": f"floor_{method}.json"})
        for label, method in [
            ("PatchCore, offline config", "patchcore"),
            ("PaDiM, offline config", "padim"),
            ("FastFlow, short schedule", "fastflow"),
            ("CFlow, short schedule", "cflow"),
        ]
    ],
)


def _run_dataset(config: dict[str, Any]) -> str:
    """``mvtec_ad/screw`` from a run's saved config (data root's folder name / category)."""
    data = config["data"]["init_args"]
    return dataset({"name": Path(data["root"]).name, "category": data["category"]})


SCRATCH_METHODS = (
    ("AutoEncoder", "autoencoder"),
    ("DAE", "dae"),
    ("VAE", "vae"),
    ("GANomaly", "ganomaly"),
    ("DRAEM", "draem"),
    ("DSR", "dsr"),
)


def family_table(methods: Sequence[tuple[str, str]], runs: dict[str, str] | None = None) -> Table:
    """One row per method and category: what a bench.py run of the method's offline config measured
    (``<stem>_<category>.json``, or the file ``runs`` gives for that name when the config changed since)."""
    runs = runs or {}
    return Table(
        columns=[
            Col("model", "label"),
            Col("category", "bench", "adx.run_config", _run_dataset),
            Col("image size", "bench", "adx.run_config.data.init_args.image_size", image_size),
            Col("epochs", "bench", "adx.run_config.trainer.max_epochs"),
            *[c for c in QUALITY.columns if c.header not in ("model", "category", "image size")],
        ],
        rows=[
            Row(label, {"bench": runs.get(f"{stem}_{category}", f"{stem}_{category}.json")})
            for label, stem in methods
            for category in CATEGORIES
        ],
    )


# DRAEM's offline config has brightness 0.2 since 2026-12-03: its rows are those runs (seed 0); the runs
# without it stay in the side-by-side table, whose reports hold both sides
RECONSTRUCTION = family_table(
    SCRATCH_METHODS, {f"draem_{c}": f"draem_brightness/{c}_s0.json" for c in CATEGORIES}
)
STUDENT_METHODS = (
    ("STFPM", "stfpm"),
    ("Reverse Distillation", "reversedistillation"),
    ("SimpleNet", "simplenet"),
    ("EfficientAD-S", "efficientad"),
)
STUDENT = family_table(STUDENT_METHODS)


def _adx_peer(path: str, fmt: Callable[[Any], str]) -> Callable[[dict[str, Any]], str]:
    """``adx / peer`` of one value found at ``path`` under each side of a bench.py report; "none" where the
    peer does not report it (anomalib's GANomaly has no map, so no pixel metrics)."""

    def cell(r: dict[str, Any]) -> str:
        if "peer" not in r:  # an adx-only report in a side-by-side row is a mistake, not a missing value
            raise KeyError(f"'peer' (this report has no peer side; path {path})")
        try:
            peer = fmt(lookup(r["peer"], path))
        except KeyError:
            peer = "none"
        return f"{fmt(lookup(r['adx'], path))} / {peer}"

    return cell


SCRATCH_VS_PEER = Table(
    columns=[
        Col("method", "label"),
        Col("category", "r", "adx.run_config", _run_dataset),
        Col("image size", "r", "adx.run_config.data.init_args.image_size", image_size),
        Col("epochs", "r", "adx.run_config.trainer.max_epochs"),
        Col("batch", "r", "adx.run_config.data.init_args.batch_size"),
        Col("image AUROC adx / peer", "r", "", _adx_peer("metrics.image_AUROC", fixed(3))),
        Col("pixel AUROC adx / peer", "r", "", _adx_peer("metrics.pixel_AUROC", fixed(3))),
        Col("peak RSS adx / peer, MB", "r", "", _adx_peer("peak_rss_mb", whole)),
    ],
    rows=[
        # one run of each side with the same settings (adx without brightness: the peer has no such option;
        # the brightness runs against the same peer runs are in the brightness table)
        *[Row("DRAEM", {"r": f"draem_{category}.json"}) for category in CATEGORIES],
        *[Row("GANomaly", {"r": f"ganomaly_{category}.json"}) for category in CATEGORIES],
    ],
)

SCRATCH_TRAIN_VS_PEER = Table(
    columns=[
        Col("method", "label"),
        Col("category", "r", "adx.run_config", _run_dataset),
        Col("adx epochs, s", "r", "adx.train", _epochs),
        Col("anomalib 2.7 epochs, s", "r", "peer", _epochs),
        Col(
            "training images/s adx / peer",
            "r",
            "",
            lambda r: (
                f"{fixed(2)(r['adx']['train']['train_img_per_s'])} / {fixed(2)(r['peer']['train_img_per_s'])}"
            ),
        ),
        Col("ratio", "r", "ratios.train_throughput_ratio", ratio(2)),
    ],
    rows=[
        Row("DRAEM (widths 16 / 8, 128 px, batch 8)", {"r": "draem_train_vs_peer.json"}),
        Row("GANomaly (width 64, 64 px, batch 16)", {"r": "ganomaly_train_vs_peer.json"}),
    ],
)

SEEDS = (0, 1, 2)
SEED_SWEEPS = {  # (method, category): (the seed-0 side-by-side report, the stem of the seed runs)
    ("DRAEM", "mvtec_ad/screw"): ("draem_screw.json", "seeds/draem_screw"),
    ("GANomaly", "mvtec_ad/screw"): ("ganomaly_screw.json", "seeds/ganomaly_screw"),
    ("DRAEM", "mvtec_loco/juice_bottle"): ("draem_juice_bottle.json", "seeds/draem_juice_bottle"),
}


def _seed_file(first: str, stem: str, side: str, seed: int) -> str:
    """Seed 0: the side-by-side report; others: tools/bench.py --seed reports (the peer's with --peer-after)."""
    return first if seed == 0 else f"{stem}_{'peer_' if side == 'peer' else ''}s{seed}.json"


SeedRuns = dict[tuple[str, ...], tuple[Callable[[int], str], str]]
"""Row labels -> (the report of each seed, the side's key in it: "adx" or "peer")."""


def per_seed_table(labels: Sequence[str], runs: SeedRuns) -> Rendered:
    """Image and pixel AUROC of each run for every seed in SEEDS and their mean, a row per run and measure
    (a measure a side does not report, as the peer GANomaly's map, is left out)."""

    def build(reports: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
        header = [*labels, "measure", *(f"seed {s}" for s in SEEDS), "mean"]
        rows = []
        for label, (file_of, key) in runs.items():
            for measure in ("image_AUROC", "pixel_AUROC"):
                values = [reports[file_of(s)][key]["metrics"].get(measure) for s in SEEDS]
                if None in values:
                    continue
                cells = [fixed(3)(v) for v in (*values, sum(values) / len(values))]
                rows.append([*label, measure.replace("_", " "), *cells])
        return header, rows

    return Rendered(files=sorted({file_of(s) for file_of, _ in runs.values() for s in SEEDS}), build=build)


def _seed_runs() -> SeedRuns:
    """SEED_SWEEPS' runs, adx then the peer for each method and category."""
    return {
        (method, category, name): (partial(_seed_file, first, stem, side), side)
        for (method, category), (first, stem) in SEED_SWEEPS.items()
        for side, name in (("adx", "adx"), ("peer", "anomalib 2.7"))
    }


# (method, category, seeds) run with brightness 0.2, in table order
BRIGHTNESS_SWEEPS = (
    ("DRAEM", "mvtec_ad/screw", SEEDS),
    ("DRAEM", "mvtec_loco/juice_bottle", SEEDS),
    ("DRAEM", "magnetic_tile", (0,)),
    ("GANomaly", "mvtec_ad/screw", SEEDS),
)
BRIGHTNESS_RUNS = {  # (method, category, seed): (paper-setting report holding both sides, brightness report)
    (method, category, s): (
        _seed_file(f"{stem}_{name}.json", f"seeds/{stem}_{name}", "adx", s),
        f"{stem}_brightness/{name}_s{s}.json",
    )
    for method, category, seeds in BRIGHTNESS_SWEEPS
    for stem, name in [(method.lower(), category.split("/")[-1])]
    for s in seeds
}


def _peer_report(method: str, category: str, seed: int) -> str:
    """The report holding the peer's run of this method, category and seed (the paper-setting side's)."""
    first = f"{method.lower()}_{category.split('/')[-1]}.json"
    return _seed_file(first, f"seeds/{method.lower()}_{category.split('/')[-1]}", "peer", seed)


def _brightness(reports: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """adx with and without ``brightness`` 0.2, and the peer, per run (image and pixel AUROC)."""
    header = [
        "method",
        "category",
        "seed",
        "image AUROC adx / adx brightness 0.2 / peer",
        "pixel AUROC adx / adx brightness 0.2 / peer",
    ]
    rows = []
    for (method, category, seed), (plain, lit) in BRIGHTNESS_RUNS.items():
        peer = reports[_peer_report(method, category, seed)]["peer"]["metrics"]
        cells = []
        for measure in ("image_AUROC", "pixel_AUROC"):
            values = [reports[plain]["adx"]["metrics"][measure], reports[lit]["adx"]["metrics"][measure]]
            values.append(peer.get(measure))
            cells.append(" / ".join("none" if v is None else fixed(3)(v) for v in values))
        rows.append([method, category, str(seed), *cells])
    return header, rows


BRIGHTNESS = Rendered(
    files=sorted(
        {f for files in BRIGHTNESS_RUNS.values() for f in files}
        | {_peer_report(m, c, s) for m, c, s in BRIGHTNESS_RUNS}
    ),
    build=_brightness,
)


def _score_brightness(reports: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """tools/score_brightness.py's rows: how far each run's image ranking on screw follows brightness."""
    header = ["run", "side", "image AUROC", "rho(score, brightness) all", "within good", "within defective"]
    rows = [
        [r["run"], "anomalib 2.7" if r["side"] == "anomalib" else r["side"]]
        + [fixed(3)(r[k]) for k in ("image_AUROC", "rho_all", "rho_good", "rho_defective")]
        for r in reports["screw_brightness.json"]["rows"]
    ]
    return header, rows


SCORE_BRIGHTNESS = Rendered(files=["screw_brightness.json"], build=_score_brightness)


STUDENT_VS_PEER = Table(
    columns=[
        *SCRATCH_VS_PEER.columns[:5],
        Col("image AUROC adx / peer", "r", "", _adx_peer("metrics.image_AUROC", fixed(3))),
        Col("pixel AUROC adx / peer", "r", "", _adx_peer("metrics.pixel_AUROC", fixed(3))),
        SCRATCH_TRAIN_VS_PEER.columns[4],
        Col("training ratio", "r", "ratios.train_throughput_ratio", ratio(2)),
        Col("model ms/image adx / peer", "r", "", _adx_peer("latency.ms_per_image", fixed(1))),
        Col("peak RSS adx / peer, MB", "r", "", _adx_peer("peak_rss_mb", whole)),
    ],
    rows=[
        Row("STFPM", {"r": "stfpm_screw.json"}),
        Row("EfficientAD-S (60 steps)", {"r": "efficientad_magnetic_tile.json"}),
        *[
            Row(
                "Reverse Distillation (WideResNet-50, random weights)",
                {"r": f"reversedistillation_wrn50_random_{category}.json"},
            )
            for category in ("screw", "juice_bottle")
        ],
    ],
)

STUDENT_TRAIN_VS_PEER = train_cache_table(
    {
        "STFPM (lite0, 256 px, batch 32)": "stfpm_train_vs_peer.json",
        "Reverse Distillation (WideResNet-50, 128 px, batch 16)": "reversedistillation_train_vs_peer.json",
        "Reverse Distillation, anomalib's embedding width 512 (WideResNet-50, 128 px, batch 16)": (
            "reversedistillation_train_vs_peer_same_width.json"
        ),
    }
)


def _same_padding(reports: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """tools/bench_same_padding.py's rows: timm's padded-copy layers against adx's StaticSameConv2d."""
    header = ["what runs", "timm's padding, s", "adx's, s", "speed-up"]
    rows = [
        [r["case"], fixed(3)(r["timm_seconds"]), fixed(3)(r["adx_seconds"]), ratio(2)(r["speedup"])]
        for r in reports["same_padding.json"]["rows"]
    ]
    return header, rows


SAME_PADDING = Rendered(files=["same_padding.json"], build=_same_padding)


# DRAEM on juice_bottle with each side's focal-loss class weights and the other's (adx: brightness 0.2)
DRAEM_FOCAL = per_seed_table(
    ("side", "focal weights [normal, anomalous]", "lr"),
    {
        ("adx", "[1, 1] (the paper's)", "1e-3"): ("draem_brightness/juice_bottle_s{}.json".format, "adx"),
        ("adx", "[1, 1] (the paper's)", "1e-4"): (
            "draem_brightness/juice_bottle_lr1e-4_s{}.json".format,
            "adx",
        ),
        ("adx", "[0, 1]", "1e-3"): ("draem_focal/juice_bottle_alpha0-1_s{}.json".format, "adx"),
        ("anomalib 2.7", "[0, 1] (as shipped)", "1e-4"): (
            lambda s: _peer_report("DRAEM", "mvtec_loco/juice_bottle", s),
            "peer",
        ),
        ("anomalib 2.7", "[1, 1] (the paper's)", "1e-4"): (
            "draem_focal/juice_bottle_peer_alpha-none_s{}.json".format,
            "peer",
        ),
    },
)

# GANomaly on screw as shipped and on its brightness-equalised copy (tools/equalize_brightness.py)
GANOMALY_EQUAL = per_seed_table(
    ("side", "images"),
    {
        ("adx", "screw"): (
            lambda s: _seed_file("ganomaly_screw.json", "seeds/ganomaly_screw", "adx", s),
            "adx",
        ),
        ("anomalib 2.7", "screw"): (lambda s: _peer_report("GANomaly", "mvtec_ad/screw", s), "peer"),
        ("adx", "screw, brightness equalised"): ("screw_equal/ganomaly_s{}.json".format, "adx"),
        ("anomalib 2.7", "screw, brightness equalised"): (
            "screw_equal/ganomaly_peer_s{}.json".format,
            "peer",
        ),
    },
)


TABLES: dict[str, Table | Transposed | Rendered] = {
    "quality": QUALITY,
    "patchcore-vs-peer": PATCHCORE_VS_PEER,
    "flows": FLOWS,
    "flows-long": FLOWS_LONG,
    "train-vs-peer": TRAIN_VS_PEER,
    "train-cache-vs-peer": TRAIN_CACHE_VS_PEER,
    "highres": HIGHRES,
    "tiling": TILING,
    "runtime": RUNTIME,
    "kshot": KSHOT,
    **{f"normalization-{m}": normalization_table(m) for m in ("patchcore", "padim", "fastflow", "cflow")},
    "serve": SERVE,
    "floor": FLOOR,
    "reconstruction": RECONSTRUCTION,
    "reconstruction-vs-peer": SCRATCH_VS_PEER,
    "reconstruction-train-vs-peer": SCRATCH_TRAIN_VS_PEER,
    "reconstruction-seeds-vs-peer": per_seed_table(("method", "category", "side"), _seed_runs()),
    "screw-brightness": SCORE_BRIGHTNESS,
    "brightness": BRIGHTNESS,
    "draem-focal": DRAEM_FOCAL,
    "ganomaly-equal-brightness": GANOMALY_EQUAL,
    "student-teacher": STUDENT,
    "student-teacher-vs-peer": STUDENT_VS_PEER,
    "student-teacher-train-vs-peer": STUDENT_TRAIN_VS_PEER,
    "same-padding": SAME_PADDING,
}


# ----------------------------------------------------------------------------------------------------
# building and writing


class TableError(Exception):
    """A declared table that cannot be built (missing file or key), or a marker problem in the Markdown."""


def _cell(col: Col, data: dict[str, Any]) -> str:
    try:
        value = lookup(data[col.source], col.path)
    except (KeyError, IndexError):
        if col.missing is None:
            raise
        return col.missing
    return col.fmt(value)


def build_table(name: str, bench: Path) -> str:
    """The Markdown lines of table ``name`` from the JSON under ``bench``."""
    spec = TABLES[name]
    files: list[str]
    if isinstance(spec, Rendered):
        files = list(spec.files)
    elif isinstance(spec, Transposed):
        files = [spec.file]
    else:
        files = sorted({f for r in spec.rows for f in r.files.values()})
    missing = [str(bench / f) for f in files if not (bench / f).is_file()]
    if missing:
        raise TableError(f"table {name}: missing report(s) {', '.join(missing)}")
    reports = {f: json.loads((bench / f).read_text()) for f in files}
    try:
        if isinstance(spec, Rendered):
            header, body = spec.build(reports)
        elif isinstance(spec, Transposed):
            header, body = spec.header, [row(reports[spec.file]) for row in spec.rows]
        else:
            header = [c.header for c in spec.columns]
            body = []
            for row in spec.rows:
                data = {src: reports[f] for src, f in row.files.items()} | {"label": row.label}
                body.append([_cell(c, data) for c in spec.columns])
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise TableError(f"table {name}: no value for {exc!r} in {', '.join(files)}") from exc
    rows = ["| " + " | ".join(cells) + " |" for cells in [header, *body]]
    rows.insert(1, "|" + "---|" * len(header))
    return "".join(row.replace("|  |", "| |") + "\n" for row in rows)


def render(doc: str, bench: Path) -> str:
    """``doc`` with every generated table rewritten from the JSON under ``bench``."""
    found = [m.group("name") for m in BLOCK.finditer(doc)]
    unknown = sorted(set(found) - set(TABLES))
    if unknown:
        raise TableError(f"markers for undeclared table(s) {', '.join(unknown)}; declare them in TABLES")
    absent = [n for n in TABLES if found.count(n) != 1]
    if absent:
        raise TableError(
            "each declared table needs exactly one '<!-- table:NAME -->' ... '<!-- /table -->' block; "
            f"check {', '.join(absent)}"
        )
    opened, closed = (
        len(re.findall(rf"^{re.escape(m)}", doc, re.M)) for m in ("<!-- table:", "<!-- /table -->")
    )
    if opened != len(found) or closed != len(found):
        raise TableError("an unclosed or stray table marker ('<!-- table:NAME -->' needs '<!-- /table -->')")
    return BLOCK.sub(
        lambda m: f"<!-- table:{m.group('name')} -->\n{build_table(m.group('name'), bench)}<!-- /table -->",
        doc,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--check", action="store_true", help="do not write; exit 1 if the file is out of date"
    )
    parser.add_argument(
        "--doc", type=Path, default=DOC, help=f"Markdown file (default {DOC.relative_to(ROOT)})"
    )
    parser.add_argument(
        "--bench",
        type=Path,
        default=BENCH,
        help=f"folder of the JSON reports (default {BENCH.relative_to(ROOT)})",
    )
    args = parser.parse_args(argv)
    old = args.doc.read_text()
    try:
        new = render(old, args.bench)
    except TableError as exc:
        print(f"bench_tables: {exc}", file=sys.stderr)
        return 2
    if new == old:
        print(f"bench_tables: {args.doc} is up to date")
        return 0
    if args.check:
        diff = difflib.unified_diff(
            old.splitlines(keepends=True), new.splitlines(keepends=True), str(args.doc), "from the JSON"
        )
        sys.stderr.writelines(diff)
        print(
            f"bench_tables: tables in {args.doc} differ from the JSON in {args.bench}; "
            "run python tools/bench_tables.py and commit the result",
            file=sys.stderr,
        )
        return 1
    args.doc.write_text(new)
    print(f"bench_tables: rewrote the tables of {args.doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
