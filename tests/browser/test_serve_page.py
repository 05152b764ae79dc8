"""The inspection page in a real headless browser: Debian's chromium driven by Playwright, against ``adx serve``.

Uploads images and checks the scores and decisions shown against the Inferencer's, moves the threshold slider
and checks that labels follow it with no new /api/predict request, opens the run gallery and checks its order,
FP/FN marks (against scores.csv) and the threshold's source, and saves a screenshot. Without chromium the test
skips (outside CI) or fails (CI=true).
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.conftest import in_ci
from tests.serve_support import ServeRun, serve_run

from adx.deploy import Inferencer
from adx.serve.loadtest import running_server

pytestmark = pytest.mark.slow
CHROMIUM = Path("/usr/bin/chromium")


def _need_browser() -> None:
    problem = None
    if not CHROMIUM.is_file():
        problem = f"chromium not found at {CHROMIUM} (apt-get install chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            problem = "the playwright package is not installed (pip install playwright)"
    if problem:
        if in_ci():
            pytest.fail(f"{problem}: with CI=true the browser test must run, not skip", pytrace=False)
        pytest.skip(problem)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, ServeRun]]:
    """A real ``adx serve --bundle B --run R`` on a free port of 127.0.0.1."""
    _need_browser()
    sr = serve_run(tmp_path_factory)
    log = tmp_path_factory.mktemp("serve_page") / "server.log"
    with running_server(["--bundle", str(sr.bundle), "--run", str(sr.run)], log=log) as url:
        yield url, sr


def _labels(page) -> dict[str, str]:  # noqa: ANN001 - a playwright Page
    return page.evaluate(
        "() => Object.fromEntries([...document.querySelectorAll('[data-testid=result]')]"
        ".map(n => [n.dataset.name, n.dataset.label]))"
    )


def _set_threshold(page, k: int) -> None:  # noqa: ANN001
    """Move the slider (0..1000 = normalised 0..1) as a user does: focus it and press keys."""
    slider = page.locator("#threshold")
    slider.focus()
    slider.press("Home")  # to 0
    if k:
        slider.fill(str(k))
    assert int(slider.input_value()) == k


def test_page_uploads_relabels_and_shows_the_gallery(served: tuple[str, ServeRun], tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    url, sr = served
    images = sr.images()
    names = [p.name if p.parent.name == "good" else f"d{p.name}" for p in images]  # unique file names
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    files = []
    for path, name in zip(images, names, strict=True):
        files.append(uploads / name)
        shutil.copyfile(path, files[-1])
    expected = {
        name: r
        for name, r in zip(names, Inferencer(sr.bundle).predict([str(p) for p in images]), strict=True)
    }
    rows = list(csv.DictReader((sr.run / "scores.csv").open()))
    source = json.loads((sr.run / "metrics.json").read_text())["calibration"]["source"]

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        predicts: list[str] = []
        page.on("request", lambda req: predicts.append(req.url) if "/api/predict" in req.url else None)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(url)
        page.wait_for_selector("body[data-ready=true]")
        assert source in page.text_content("#threshold-source")

        # upload: one request per image; scores and decisions as the Inferencer's
        page.set_input_files("#files", [str(f) for f in files])
        page.wait_for_function(
            f"document.body.dataset.pending === '0' && "
            f"document.querySelectorAll('[data-testid=result][data-label]:not([data-label=pending])').length "
            f"=== {len(files)}"
        )
        assert len(predicts) == len(files)
        shown = _labels(page)
        for name, r in expected.items():
            assert shown[name] == ("anomalous" if r.pred_label else "normal"), name
            card = page.locator(f"[data-testid=result][data-name='{name}']")
            assert f"score {r.image_score:.4f}" in card.text_content()
            assert abs(float(card.get_attribute("data-pred-score")) - r.pred_score) < 1e-6

        # the slider relabels in the browser: labels follow pred_score >= t, no new predict request
        before = len(predicts)
        changed = False
        for k in (0, 300, 700, 1000, 500):
            _set_threshold(page, k)
            shown = _labels(page)
            for name, r in expected.items():
                want = r.pred_label if k == 500 else r.pred_score >= k / 1000
                assert shown[name] == ("anomalous" if want else "normal"), (k, name, r.pred_score)
            changed |= any(
                (shown[n] == "anomalous") != expected[n].pred_label for n in expected
            )  # some label differs from the calibrated decision at some position
        assert changed, "moving the slider changed no label"
        assert len(predicts) == before, "the slider sent /api/predict requests"

        # the gallery: sorted by score, FP/FN marks as scores.csv says, the threshold's source stated
        page.click("#tab-gallery")
        page.wait_for_selector("[data-testid=gallery-item]")
        items = page.locator("[data-testid=gallery-item]")
        scores = [float(s) for s in items.evaluate_all("ns => ns.map(n => n.dataset.score)")]
        assert len(scores) == len(rows) and scores == sorted(scores, reverse=True)
        keys = items.evaluate_all("ns => ns.map(n => n.dataset.key)")
        marks = dict(zip(keys, items.evaluate_all("ns => ns.map(n => n.dataset.mark)"), strict=True))
        for row in rows:
            label, pred = int(row["label"]), row["pred_label"] == "True"
            want = {(0, True): "FP", (1, False): "FN", (0, False): "TN", (1, True): "TP"}[(label, pred)]
            assert marks[f"{row['defect_type']}/{Path(row['path']).name}"] == want, row
        counts = page.locator("#gallery-counts")
        want_fn = sum(r["label"] == "1" and r["pred_label"] == "False" for r in rows)
        want_fp = sum(r["label"] == "0" and r["pred_label"] == "True" for r in rows)
        assert (int(counts.get_attribute("data-fn")), int(counts.get_attribute("data-fp"))) == (
            want_fn,
            want_fp,
        )
        assert source in page.text_content("#gallery-source")
        _set_threshold(page, 0)  # everything anomalous: every normal image is a false positive
        n_normal = sum(r["label"] == "0" for r in rows)
        assert int(counts.get_attribute("data-fp")) == n_normal > 0
        assert page.locator("[data-testid=gallery-item][data-mark=FP]").count() == n_normal
        _set_threshold(page, 500)
        page.wait_for_function("[...document.querySelectorAll('.gitem img')].every(i => i.complete)")
        shot = tmp_path / "serve_gallery.png"
        page.screenshot(path=str(shot), full_page=True)
        page.click("[data-tab=inspect]")
        page.screenshot(path=str(tmp_path / "serve_inspect.png"), full_page=True)
        browser.close()
    assert not errors, errors
    for path in (shot, tmp_path / "serve_inspect.png"):
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, (path, len(data))
    print(f"\nscreenshots: {shot} {tmp_path / 'serve_inspect.png'}")
