"""docs/benchmarks.md's generated tables agree with the JSON reports under docs/bench/ (tools/bench_tables.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "bench_tables.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT)


def test_benchmarks_md_is_up_to_date_with_its_json() -> None:
    result = _run("--check")
    assert result.returncode == 0, result.stderr


def test_a_changed_report_is_caught_and_rewritten_without_touching_prose(tmp_path: Path) -> None:
    doc, bench = tmp_path / "benchmarks.md", tmp_path / "bench"
    shutil.copy(ROOT / "docs" / "benchmarks.md", doc)
    shutil.copytree(ROOT / "docs" / "bench", bench)
    report = json.loads((bench / "padim_screw.json").read_text())
    report["adx"]["metrics"]["image_AUROC"] = 0.5004
    (bench / "padim_screw.json").write_text(json.dumps(report))
    args = ("--doc", str(doc), "--bench", str(bench))

    result = _run("--check", *args)
    assert result.returncode == 1
    assert "+| PaDiM (100 of 176 channels) | mvtec_ad/screw | 256 | 0.500 |" in result.stderr
    before = doc.read_text()
    assert _run(*args).returncode == 0
    after = doc.read_text()
    assert len(before.splitlines()) == len(after.splitlines())
    changed = [(a, b) for a, b in zip(before.splitlines(), after.splitlines(), strict=True) if a != b]
    assert len(changed) == 1
    assert changed[0][1].startswith("| PaDiM (100 of 176 channels) | mvtec_ad/screw | 256 | 0.500 |")
    assert _run("--check", *args).returncode == 0


def test_missing_reports_and_markers_are_named(tmp_path: Path) -> None:
    doc, bench = tmp_path / "benchmarks.md", tmp_path / "bench"
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    shutil.copytree(ROOT / "docs" / "bench", bench)
    args = ("--check", "--doc", str(doc), "--bench", str(bench))

    doc.write_text(text.replace("<!-- table:flows-long -->\n", "", 1))
    result = _run(*args)
    assert result.returncode == 2 and "flows-long" in result.stderr

    doc.write_text(text)
    (bench / "cflow40_screw_metrics.json").unlink()
    result = _run(*args)
    assert result.returncode == 2 and "cflow40_screw_metrics.json" in result.stderr


def test_a_side_by_side_row_without_a_peer_side_is_an_error_not_none(tmp_path: Path) -> None:
    # an adx-only report put in a side-by-side row once printed "none" in every peer cell
    doc, bench = tmp_path / "benchmarks.md", tmp_path / "bench"
    shutil.copy(ROOT / "docs" / "benchmarks.md", doc)
    shutil.copytree(ROOT / "docs" / "bench", bench)
    report = json.loads((bench / "draem_screw.json").read_text())
    del report["peer"]
    (bench / "draem_screw.json").write_text(json.dumps(report))
    result = _run("--check", "--doc", str(doc), "--bench", str(bench))
    assert result.returncode == 2
    assert "reconstruction-vs-peer" in result.stderr and "no peer side" in result.stderr
