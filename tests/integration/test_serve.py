"""``adx serve``'s JSON API: predictions equal the Inferencer's, every bad input gets a clear 4xx, load.

The API runs in-process with FastAPI's TestClient; the load test starts a real uvicorn server
(``python -m adx.serve``) on a free port of 127.0.0.1 and sends it 200 requests from 20 concurrent clients.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from tests.serve_support import ServeRun, serve_run

from adx.deploy import Inferencer
from adx.serve.app import create_app
from adx.serve.gallery import RunFolderError, load_run
from adx.serve.loadtest import hammer, running_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sr(tmp_path_factory: pytest.TempPathFactory) -> ServeRun:
    return serve_run(tmp_path_factory)


@pytest.fixture(scope="module")
def inferencer(sr: ServeRun) -> Inferencer:
    return Inferencer(sr.bundle)


@pytest.fixture(scope="module")
def client(sr: ServeRun, inferencer: Inferencer) -> Iterator[TestClient]:
    with TestClient(create_app(inferencer, load_run(sr.run), max_pixels=50_000_000)) as c:
        yield c


def _png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _post(client: TestClient, name: str, data: bytes, **params: str):  # noqa: ANN202 - an httpx Response
    return client.post("/api/predict", params=params, files={"file": (name, data)})


def _header_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (its pixel data is one grey pixel's)."""
    data = bytearray(_png(Image.new("L", (1, 1))))
    data[16:20], data[20:24] = width.to_bytes(4, "big"), height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")  # IHDR's CRC
    return bytes(data)


def _refused(resp, status: int, *words: str) -> dict:  # noqa: ANN001 - an httpx Response
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) >= {"error", "fix"} and body["fix"], body
    for word in words:
        assert word.lower() in (body["error"] + " " + body["fix"]).lower(), (word, body)
    return body


def test_predictions_equal_the_inferencers(client: TestClient, sr: ServeRun, inferencer: Inferencer) -> None:
    for path in sr.images():
        want = inferencer.predict([str(path)])[0]
        got = _post(client, path.name, path.read_bytes(), preview="true").json()
        assert got["image_score"] == pytest.approx(want.image_score, rel=1e-6, abs=1e-6)
        assert got["pred_score"] == pytest.approx(want.pred_score, abs=1e-6)
        assert got["pred_label"] is want.pred_label
        assert got["label"] == ("anomalous" if want.pred_label else "normal")
        assert (got["mode"], got["format"], got["orig_size"]) == ("RGB", "PNG", list(want.orig_size))
        stored = np.asarray(Image.open(io.BytesIO(base64.b64decode(got["map_png"]))))
        assert stored.shape == want.norm_map.shape and stored.dtype == np.uint8
        np.testing.assert_array_equal(stored >= 128, want.pred_mask)  # the mask, exactly, from the PNG
        assert np.abs(stored / 255.0 - np.clip(want.norm_map, 0, 1)).max() <= 1 / 255 + 1e-6
        preview = Image.open(io.BytesIO(base64.b64decode(got["preview_png"])))
        assert preview.size[::-1] == inferencer.input_size
    # the map as arrays on request; the raw image bytes as the body instead of a form
    path = sr.images()[-1]
    want = inferencer.predict([str(path)])[0]
    got = client.post(
        "/api/predict?map=array", content=path.read_bytes(), headers={"content-type": "image/png"}
    ).json()
    np.testing.assert_allclose(np.array(got["norm_map"]), want.norm_map, atol=1e-6)
    np.testing.assert_allclose(np.array(got["anomaly_map"]), want.anomaly_map, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.array(got["pred_mask"], dtype=bool), want.pred_mask)
    assert (
        "map_png" not in got and "map_png" not in _post(client, "x.png", path.read_bytes(), map="none").json()
    )


def test_model_card_and_health(client: TestClient, sr: ServeRun, inferencer: Inferencer) -> None:
    card = client.get("/api/model").json()
    meta = inferencer.metadata
    assert card["method"] == "PatchCore" and card["input_size"] == meta["input_size"]
    assert card["backbone"]["name"] == meta["backbone"]["name"]
    assert card["calibration"]["source"] == meta["calibration"]["source"] and card["calibrated"]
    metrics = json.loads((sr.run / "metrics.json").read_text())
    assert card["run"]["metrics"] == metrics["metrics"] and card["run"]["folder"] == str(sr.run)
    health = client.get("/api/health").json()
    assert health["status"] == "ok" and health["method"] == "PatchCore"
    page = client.get("/")
    assert page.status_code == 200 and "threshold" in page.text
    assert client.get("/static/app.js").status_code == 200


def test_modes_decoded_by_adx_rules(
    client: TestClient, sr: ServeRun, inferencer: Inferencer, tmp_path: Path
) -> None:
    rgb = np.asarray(Image.open(sr.images()[-1]).convert("RGB"))
    cmyk = tmp_path / "part_cmyk.jpg"
    Image.fromarray(rgb).convert("CMYK").save(cmyk, "JPEG", quality=95)
    grey16 = tmp_path / "part_16bit.png"
    Image.fromarray(rgb[..., 1].astype(np.uint16) * 257).save(grey16)
    assert Image.open(grey16).mode == "I;16"
    for path, mode, words in ((cmyk, "CMYK", "CMYK"), (grey16, "I;16", "16-bit")):
        got = _post(client, path.name, path.read_bytes())
        assert got.status_code == 200, got.text
        body = got.json()
        want = inferencer.predict([str(path)])[0]
        assert body["mode"] == mode and words in body["decoded_as"]
        assert body["image_score"] == pytest.approx(want.image_score, rel=1e-6, abs=1e-6)
        assert body["pred_label"] is want.pred_label


def test_bad_inputs_get_clear_errors_and_the_server_keeps_serving(client: TestClient, sr: ServeRun) -> None:
    good = sr.images()[0].read_bytes()
    _refused(_post(client, "empty.png", b""), 400, "empty")
    _refused(_post(client, "notes.txt", b"this is not an image\n" * 20), 415, "not an image", "PNG")
    _refused(_post(client, "cut.png", good[: len(good) // 2]), 422, "truncated", "complete file")
    jpeg = _png(Image.open(sr.images()[0]).convert("RGB").resize((256, 256)), "JPEG")
    _refused(_post(client, "cut.jpg", jpeg[: len(jpeg) * 3 // 4]), 422, "truncated")  # pixel data cut
    _refused(_post(client, "head.jpg", jpeg[:300]), 422, "JPEG", "truncated")  # header cut
    _refused(_post(client, "huge.png", _header_claiming(20_000, 20_000)), 413, "400.0 MP", "before decoding")
    _refused(_post(client, "big.png", _header_claiming(8_000, 8_000)), 413, "8000 x 8000", "--max_pixels")
    floats = io.BytesIO()
    Image.fromarray(np.full((32, 32), 1000.0, np.float32), mode="F").save(floats, "TIFF")
    _refused(_post(client, "float.tif", floats.getvalue()), 422, "float", "[0, 1]", "rescale")
    ints = io.BytesIO()
    Image.fromarray(np.full((32, 32), 70_000, np.int32), mode="I").save(ints, "TIFF")
    _refused(_post(client, "int32.tif", ints.getvalue()), 422, "32-bit", "16-bit")
    two = [("file", ("a.png", good)), ("file", ("b.png", good))]
    _refused(client.post("/api/predict", files=two), 400, "one image per request")
    _refused(client.post("/api/predict", files={"note": (None, "x")}), 400, "no file")
    _refused(client.post("/api/predict", content=b"{}", headers={"content-type": "application/json"}), 415)
    _refused(client.post("/api/predict?map=jpeg", files={"file": ("a.png", good)}), 422, "map")
    for status, body in ((200, good), (200, good)):  # still serving
        assert _post(client, "ok.png", body).status_code == status
    health = client.get("/api/health").json()
    assert health["status"] == "ok" and health["refused"] >= 12


def test_limits_and_uploads_stay_in_memory(
    sr: ServeRun, inferencer: Inferencer, monkeypatch, tmp_path: Path
) -> None:
    watched = tmp_path / "tmp"
    watched.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(watched))  # where a spooled upload would go
    rng = np.random.default_rng(0)
    big = _png(Image.fromarray(rng.integers(0, 256, (1000, 1000, 3), dtype=np.uint8)))
    assert len(big) > 2 * 2**20
    with TestClient(create_app(inferencer, None, max_pixels=2_000_000, max_upload_mb=8)) as c:
        assert _post(c, "big.png", big).status_code == 200
        _refused(_post(c, "small.png", _header_claiming(2_000, 1_001)), 413, "2.0 MP", "--max_pixels")
        _refused(_post(c, "noise.bin", b"\0" * (9 * 2**20)), 413, "--max_upload_mb")
        _refused(c.get("/api/run"), 404, "--run")
        _refused(c.get("/api/run/file", params={"path": "metrics.json"}), 404, "--run")
    assert list(watched.iterdir()) == []


def test_run_files_are_confined_to_the_run_folder(client: TestClient, sr: ServeRun) -> None:
    gallery = client.get("/api/run").json()
    panel = next(item["panel"] for item in gallery["items"] if item["panel"])
    ok = client.get("/api/run/file", params={"path": panel})
    assert ok.status_code == 200 and ok.headers["content-type"].startswith("image/")
    secret = sr.run.parent / "secret.png"  # an image next to the run folder, reachable by ../
    shutil.copyfile(sr.images()[0], secret)
    for bad in (
        "../secret.png",
        "heatmaps/../../secret.png",
        "../../../../../../etc/passwd",
        "%2e%2e/secret.png",
    ):
        _refused(client.get("/api/run/file", params={"path": bad}), 403 if "%" not in bad else 404, bad)
    assert client.get("/api/run/file?path=..%2Fsecret.png").status_code == 403
    assert client.get("/api/run/file?path=heatmaps/..%2f..%2fsecret.png").status_code == 403
    _refused(client.get("/api/run/file", params={"path": str(secret)}), 403, "relative")
    _refused(client.get("/api/run/file", params={"path": "config.yaml"}), 403, "not an image")
    _refused(client.get("/api/run/file", params={"path": "checkpoints/last.ckpt"}), 403)
    _refused(client.get("/api/run/file", params={"path": "heatmaps/none.jpg"}), 404)
    _refused(client.get("/api/nothing"), 404)


def test_gallery_sorted_with_fp_and_fn(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "heatmaps" / "good").mkdir(parents=True)
    (run / "heatmaps" / "crack").mkdir(parents=True)
    for name in ("good/a.jpg", "crack/a.jpg", "crack/a_1.jpg"):
        Image.new("RGB", (8, 8)).save(run / "heatmaps" / name)
    rows = [  # path, defect_type, label, image_score, pred_score, pred_label
        ("/d/good/a.png", "good", 0, 9.0, 0.9, True),  # FP
        ("/d/good/b.png", "good", 0, 1.0, 0.1, False),  # TN
        ("/d/crack/a.png", "crack", 1, 3.0, 0.3, False),  # FN
        ("/e/crack/a.png", "crack", 1, 7.0, 0.7, True),  # TP, the second crack/a (panel a_1)
    ]
    lines = ["path,defect_type,label,image_score,pred_score,pred_label"] + [
        ",".join(map(str, r)) for r in rows
    ]
    (run / "scores.csv").write_text("\n".join(lines) + "\n")
    (run / "scores_1.csv").write_text("\n".join(lines[:2]) + "\n")  # a later test of the run: newest wins
    calibration = {"image_threshold": 5.0, "source": "F1-optimal on validation 'test_split'"}
    (run / "metrics_1.json").write_text(
        json.dumps({"metrics": {"image_AUROC": 0.5}, "calibration": calibration})
    )
    assert len(load_run(run).rows) == 1
    (run / "scores_1.csv").unlink()
    (run / "metrics.json").write_text(
        json.dumps({"metrics": {"image_AUROC": 0.75}, "calibration": calibration})
    )
    g = load_run(run).gallery()
    assert [i["image_score"] for i in g["items"]] == [9.0, 7.0, 3.0, 1.0]
    assert [i["mark"] for i in g["items"]] == ["FP", "TP", "FN", "TN"]
    assert g["counts"] == {"FP": 1, "TP": 1, "FN": 1, "TN": 1} and g["source"] == calibration["source"]
    assert [i["panel"] for i in g["items"]] == [
        "heatmaps/good/a.jpg",
        "heatmaps/crack/a_1.jpg",
        "heatmaps/crack/a.jpg",
        None,
    ]
    (run / "predictions.csv").write_text("path,image_score,pred_score,pred_label\n/x/p.png,2.0,0.2,False\n")
    for csv_name in ("scores.csv", "metrics.json", "metrics_1.json"):
        (run / csv_name).unlink()
    g = load_run(run).gallery()
    assert not g["has_labels"] and g["items"][0]["mark"] == "" and "unknown" in g["source"]
    (run / "predictions.csv").unlink()
    with pytest.raises(RunFolderError, match="adx test --ckpt"):
        load_run(run)


def test_ckpt_is_exported_to_a_temporary_bundle(sr: ServeRun, monkeypatch) -> None:
    """``--ckpt``: the checkpoint is loaded and exported (export itself is covered by test_export.py)."""
    import adx.export
    from adx.serve.cli import bundle_folder

    calls = []

    def fake_export(model, out: Path, fmt: str, ckpt_path: str) -> Path:  # noqa: ANN001
        calls.append((type(model).__name__, fmt, ckpt_path))
        return Path(shutil.copytree(sr.bundle, out))

    monkeypatch.setattr(adx.export, "export", fake_export)
    with bundle_folder(None, str(sr.ckpt), None) as bundle:
        assert (bundle / "metadata.json").is_file() and Inferencer(bundle).metadata["method"] == "PatchCore"
    assert calls == [("PatchCore", "onnx", str(sr.ckpt))] and not bundle.parent.exists()
    with bundle_folder(None, None, str(sr.run)) as bundle:  # --run alone: the run's exported bundle
        assert bundle == sr.run / "export" / "onnx"
    with pytest.raises(SystemExit, match="--bundle"), bundle_folder(None, None, None):
        pass


def test_load_200_requests_from_20_clients(sr: ServeRun, tmp_path: Path) -> None:
    files = [(p.name, p.read_bytes()) for p in sr.images()]
    log = tmp_path / "server.log"
    with running_server(["--bundle", str(sr.bundle), "--run", str(sr.run)], log=log) as url:
        stats = hammer(url, files, requests=200, concurrency=20)
        import httpx

        health = httpx.get(url + "/api/health").json()
    print(
        f"\nserve load: {stats['requests']} requests, {stats['concurrency']} clients: p50 {stats['p50_ms']} ms, "
        f"p95 {stats['p95_ms']} ms, max {stats['max_ms']} ms, {stats['throughput_rps']} req/s"
    )
    assert stats["n_failures"] == 0, stats["failures"]
    assert health["predictions"] == 200 and health["refused"] == 0


def test_command_line_errors_and_no_torch(tmp_path: Path) -> None:
    from adx.serve.cli import main

    with pytest.raises(SystemExit, match="not an adx bundle"):
        main(["--bundle", str(tmp_path)])
    with pytest.raises(SystemExit, match="scores.csv"):
        main(["--bundle", str(tmp_path), "--run", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["--bundle", str(tmp_path), "--bit_depth", "7"])
    code = "import sys, adx.serve.app, adx.serve.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)  # serving a bundle needs no torch
