"""Detection-quality floors on real images, run through ``adx fit`` as a user runs it.

A change that makes a method detect worse fails here, in CI, instead of in the next benchmark. PatchCore
and PaDiM run their shipped offline configs on MVTec AD screw against fixed floors. The trained methods
run a short schedule that fits CI and must stay within MARGIN of the value it measured. Runs are seeded,
so they repeat to the last digit on one machine. The four runs took 9.5 minutes on the 2-core machine
with one torch thread while other jobs shared it (PatchCore 409 s, CFlow 88 s, FastFlow 34 s, PaDiM 32 s).
Since the coreset's principal-axis bounds (2026-12-03, same selection) PatchCore's run takes about half
as long: 290 s in a CI-equivalent run of the whole suite (two workers), 221 s alone on the idle machine.

The values were measured on 2026-12-01 on the 2-core CPU machine, with the working tree of that
day (HEAD f48af40 plus the uncommitted Core v2 work), OMP_NUM_THREADS=1, three times per trained method
with identical results. The commands were those below, as in FLOORS, with
``--root_dir RUNS --trainer.enable_progress_bar false --heatmaps.enabled false`` added. Full reports:
docs/bench/floor_<method>.json, with the table in docs/benchmarks.md. When a change moves a value on
purpose, re-measure, update FLOORS and the JSON, then run ``python tools/bench_tables.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from tests.conftest import CONFIGS, quiet_cli

ROOT = Path(__file__).resolve().parents[2]
MARGIN = 0.03  # allowed drop of a trained method below its measured short-schedule value

# the short schedule of the trained methods: 128 px, 5 epochs, batch 16, 2 loader workers
SHORT = [
    "--data.image_size", "128", "--trainer.max_epochs", "5",
    "--data.batch_size", "16", "--data.num_workers", "2",
]  # fmt: skip

FLOORS = [
    # adx fit --config configs/patchcore/offline.yaml --data.root ../shared/data/mvtec_ad --data.category screw
    #   measured image AUROC 0.9647, pixel AUROC 0.9947 (0.9652 in a run before later edits to the code,
    #   as in docs/benchmarks.md's quality table); the floor of 0.93 comes from the Core v2 issue
    pytest.param(
        "patchcore", "mvtec_ad", "screw", ["--model.progress", "false"], {"image_AUROC": 0.93}, id="patchcore"
    ),
    # adx fit --config configs/padim/offline.yaml --data.root ../shared/data/mvtec_ad --data.category screw
    #   measured image AUROC 0.8436, pixel AUROC 0.9844 (twice; the quality table's 0.848 is from an older
    #   run); the floor of 0.82 comes from the Core v2 issue
    pytest.param("padim", "mvtec_ad", "screw", [], {"image_AUROC": 0.82}, id="padim"),
    # adx fit --config configs/fastflow/offline.yaml --data.root ../shared/data/mvtec_loco
    #   --data.category juice_bottle --data.image_size 128 --trainer.max_epochs 5 --data.batch_size 16
    #   --data.num_workers 2
    #   measured image AUROC 0.8598, pixel AUROC 0.8151 (3 runs). Juice_bottle, not screw: on screw this
    #   schedule scores near chance (image AUROC 0.602), which would let a broken model pass.
    pytest.param(
        "fastflow",
        "mvtec_loco",
        "juice_bottle",
        SHORT,
        {"image_AUROC": 0.860 - MARGIN, "pixel_AUROC": 0.815 - MARGIN},
        id="fastflow",
    ),
    # adx fit --config configs/cflow/offline.yaml --data.root ../shared/data/mvtec_loco
    #   --data.category juice_bottle --data.image_size 128 --trainer.max_epochs 5 --data.batch_size 16
    #   --data.num_workers 2
    #   measured image AUROC 0.8475, pixel AUROC 0.8646 (3 runs); on screw the same schedule gave image
    #   AUROC 0.477 (chance), pixel AUROC 0.908
    pytest.param(
        "cflow",
        "mvtec_loco",
        "juice_bottle",
        SHORT,
        {"image_AUROC": 0.848 - MARGIN, "pixel_AUROC": 0.865 - MARGIN},
        id="cflow",
    ),
]


@pytest.mark.real_data
@pytest.mark.slow
@pytest.mark.parametrize(("method", "dataset", "category", "extra", "floors"), FLOORS)
def test_quality_floor(
    method: str,
    dataset: str,
    category: str,
    extra: list[str],
    floors: dict[str, float],
    shared_data: Path,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    runs = tmp_path / "runs"
    root = shared_data / dataset
    config = CONFIGS / method / "offline.yaml"
    args = ["fit", "--config", str(config), "--data.root", str(root), "--data.category", category]
    # its own process, as a user runs it: nothing another test loaded (runtimes, traced graphs) is shared
    proc = subprocess.run(
        [
            sys.executable,
            "-X",
            "faulthandler",
            "-c",
            "import sys; from adx.cli import main; main(sys.argv[1:])",
        ]
        + args
        + quiet_cli(runs)
        + extra,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
    )
    assert proc.returncode == 0, f"adx fit exited with {proc.returncode}:\n{proc.stderr[-4000:]}"
    (report,) = runs.rglob("metrics.json")  # one run folder
    metrics = json.loads(report.read_text())["metrics"]
    record_property("metrics", json.dumps(metrics))
    print(f"{method} {dataset}/{category}: {json.dumps(metrics)}")  # shown by pytest -rA or -s
    low = {k: round(metrics[k], 4) for k, floor in floors.items() if metrics[k] < floor}
    assert not low, f"{method} on {dataset}/{category} fell below its floor: {low} < {floors}"


def test_floors_match_their_reports_in_docs_bench() -> None:
    # docs/benchmarks.md's floor table is generated from these reports (tools/bench_tables.py)
    for case in FLOORS:
        method, *_, floors = case.values
        report = json.loads((ROOT / "docs" / "bench" / f"floor_{method}.json").read_text())
        assert report["floor"] == pytest.approx(floors), method
        assert all(report["metrics"][k] >= v for k, v in floors.items()), method


def test_missing_real_data_skips_locally_and_fails_in_ci(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests import conftest

    monkeypatch.setattr(conftest, "SHARED_DATA", tmp_path / "absent")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="ADX_SHARED_DATA"):
        conftest.no_shared_data()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=f"{tmp_path / 'absent'}.*ADX_SHARED_DATA"):
        conftest.no_shared_data()
