"""The FastAPI app of ``adx serve``: the inspection page, the JSON API and a finished run's gallery.

    GET  /                    the page (static/index.html, app.js, style.css)
    GET  /api/health          liveness, request counts
    GET  /api/model           the model card: method, input size, backbone, thresholds and their source, run metrics
    POST /api/predict         one image (multipart field ``file``, or the raw bytes with Content-Type image/*)
                              -> score, normalised score, label, map (?map=png|array|none), preview (?preview=true)
    GET  /api/run             the --run folder's results, sorted by score, FP/FN marked
    GET  /api/run/file?path=  one image of the --run folder (confined to it)

Errors are JSON ``{"error": ..., "fix": ..., "status": ...}`` with a 4xx status; uploads never touch the disk.
"""

from __future__ import annotations

import base64
import io
import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Literal

import anyio
import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.exceptions import HTTPException

import adx
from adx.deploy import Inferencer
from adx.serve.gallery import RunFolder, safe_file
from adx.serve.uploads import ServeError, Upload, decode_upload, parse_multipart, read_body

STATIC = Path(__file__).resolve().parent / "static"
MapFormat = Literal["png", "array", "none"]
_SEND_IMAGE = (
    "POST the image as multipart/form-data field 'file' (curl -F file=@part.png URL/api/predict), or its raw "
    "bytes with Content-Type image/png, image/jpeg, image/tiff or application/octet-stream"
)


def png_base64(image: np.ndarray) -> str:
    """uint8 (H, W) or (H, W, 3) -> base64 text of its PNG file."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def map_to_uint8(norm_map: np.ndarray, pred_mask: np.ndarray) -> np.ndarray:
    """Normalised map in [0, 1] -> uint8 (value / 255), rounded so that ``value >= 128`` is exactly pred_mask."""
    values = np.rint(np.clip(np.nan_to_num(norm_map, nan=0.0), 0.0, 1.0) * 255.0).astype(np.uint8)
    values[pred_mask & (values < 128)] = 128
    values[~pred_mask & (values >= 128)] = 127
    return values


def preview(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The decoded image (float H x W x 3 in [0, 1]) as uint8 RGB at the model's input size (h, w)."""
    image = Image.fromarray(np.rint(np.clip(pixels, 0.0, 1.0) * 255.0).astype(np.uint8))
    return np.asarray(image.resize((size[1], size[0]), Image.Resampling.BILINEAR))


def _number(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


class Service:
    """The model, the optional run folder and the limits behind the routes (one per app)."""

    def __init__(
        self,
        inferencer: Inferencer,
        run: RunFolder | None,
        max_pixels: int,
        max_upload_bytes: int,
        concurrency: int,
    ) -> None:
        self.inferencer, self.run = inferencer, run
        self.max_pixels, self.max_upload_bytes = int(max_pixels), int(max_upload_bytes)
        self.limiter = anyio.CapacityLimiter(max(1, concurrency))
        self.started = time.time()
        self.counts = {"predictions": 0, "refused": 0}
        self._lock = threading.Lock()

    def count(self, key: str) -> None:
        with self._lock:
            self.counts[key] += 1

    def card(self) -> dict[str, Any]:
        """The model card as JSON."""
        meta = self.inferencer.metadata
        calibration = dict(meta.get("calibration", {}))
        for key, value in calibration.items():
            if isinstance(value, float) and not math.isfinite(value):
                calibration[key] = None
        return {
            "method": meta.get("method"),
            "input_size": list(self.inferencer.input_size),
            "backbone": meta.get("backbone", {}),
            "calibration": calibration,
            "calibrated": calibration.get("image_threshold") is not None,
            "normalisation": "pred_score and the map are min-max normalised so that 0.5 = the calibrated "
            "threshold (clipped to [0, 1]); the map PNG holds norm_map x 255, pred_mask = value >= 128",
            "hparams": meta.get("hparams", {}),
            "bundle": {
                "folder": str(self.inferencer.bundle),
                "format": meta.get("format"),
                "runtime": self.inferencer.runtime,
                "adx_version": meta.get("adx_version"),
                "created": meta.get("created"),
                "checkpoint": meta.get("checkpoint"),
                "checkpoint_sha256": meta.get("checkpoint_sha256"),
            },
            "server": {
                "adx_version": adx.__version__,
                "max_pixels": self.max_pixels,
                "max_upload_mb": round(self.max_upload_bytes / 2**20, 3),
                "concurrency": int(self.limiter.total_tokens),
            },
            "run": self.run.card() if self.run else None,
        }

    def predict(self, upload: Upload, map_format: MapFormat, with_preview: bool) -> dict[str, Any]:
        """Decode and score one upload (runs in a worker thread)."""
        t0 = time.perf_counter()
        decoded = decode_upload(upload, self.max_pixels, self.inferencer.bit_depth)
        try:
            result = self.inferencer.predict([decoded.pixels])[0]
        except Exception as exc:  # the runtime failed on a decodable image: say so, keep serving
            raise ServeError(
                500,
                f"the model failed on '{upload.filename}' ({type(exc).__name__}: {exc})",
                "report this with the image; the server keeps serving other requests",
            ) from exc
        pred_score = _number(result.pred_score)
        out: dict[str, Any] = {
            "filename": upload.filename,
            "format": decoded.format,
            "mode": decoded.mode,
            "decoded_as": decoded.decoded_as,
            "orig_size": list(result.orig_size),
            "input_size": list(self.inferencer.input_size),
            "image_score": float(result.image_score),
            "pred_score": pred_score,
            "pred_label": bool(result.pred_label),
            "label": ("anomalous" if result.pred_label else "normal")
            if pred_score is not None
            else "uncalibrated",
            "image_threshold": _number(float(self.inferencer.thresholds.get("image_threshold", math.nan))),
            "mask_pixels": int(result.pred_mask.sum()),
        }
        if map_format == "png":
            out["map_png"] = png_base64(map_to_uint8(result.norm_map, result.pred_mask))
        elif map_format == "array":
            out["norm_map"] = np.nan_to_num(result.norm_map, nan=0.0).tolist()
            out["anomaly_map"] = result.anomaly_map.tolist()
            out["pred_mask"] = result.pred_mask.astype(np.uint8).tolist()
        if with_preview:
            out["preview_png"] = png_base64(preview(decoded.pixels, self.inferencer.input_size))
        out["seconds"] = round(time.perf_counter() - t0, 4)
        self.count("predictions")
        return out


async def _upload(request: Request, service: Service, filename: str | None) -> Upload:
    """The one image of a predict request, read into memory."""
    ctype = request.headers.get("content-type", "")
    body = await read_body(request.stream(), request.headers.get("content-length"), service.max_upload_bytes)
    if ctype.startswith("multipart/form-data"):
        uploads = parse_multipart(body, ctype)
        if not uploads:
            raise ServeError(400, "the form has no file field", _SEND_IMAGE)
        if len(uploads) > 1:
            raise ServeError(
                400, f"the form holds {len(uploads)} files; send one image per request", _SEND_IMAGE
            )
        return uploads[0]
    if ctype.split(";")[0].strip() in ("application/octet-stream", "") or ctype.startswith("image/"):
        return Upload(filename or "upload", body)
    raise ServeError(415, f"unsupported Content-Type {ctype!r}", _SEND_IMAGE)


def create_app(
    inferencer: Inferencer,
    run: RunFolder | None = None,
    max_pixels: int = 50_000_000,
    max_upload_mb: float = 100.0,
    concurrency: int | None = None,
) -> FastAPI:
    """The app serving ``inferencer``'s bundle (and ``run``'s gallery when given)."""
    service = Service(
        inferencer, run, max_pixels, int(max_upload_mb * 2**20), concurrency or min(4, os.cpu_count() or 1)
    )
    app = FastAPI(title="adx serve", version=adx.__version__, docs_url="/api/docs", redoc_url=None)
    app.state.service = service

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError) -> JSONResponse:
        service.count("refused")
        return JSONResponse(exc.payload(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        fix = "see GET /api/docs for the API" if exc.status_code == 404 else "check the request"
        body = {"error": str(exc.detail), "fix": fix, "status": exc.status_code}
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        body = {"error": f"invalid request ({problems})", "fix": "see GET /api/docs", "status": 422}
        return JSONResponse(body, status_code=422)

    @app.get("/api/health")
    def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "method": inferencer.metadata.get("method"),
            "uptime_s": round(time.time() - service.started, 1),
            **service.counts,
        }

    @app.get("/api/model")
    def model_card() -> dict[str, Any]:
        return service.card()

    @app.post("/api/predict")
    async def predict(
        request: Request,
        map_format: MapFormat = Query("png", alias="map"),
        preview: bool = False,
        filename: str | None = None,
    ) -> dict[str, Any]:
        upload = await _upload(request, service, filename)
        return await anyio.to_thread.run_sync(
            service.predict, upload, map_format, preview, limiter=service.limiter
        )

    @app.get("/api/run")
    def run_results() -> dict[str, Any]:
        if service.run is None:
            raise ServeError(404, "this server shows no run", "restart it with --run <run folder>")
        return service.run.gallery()

    @app.get("/api/run/file")
    def run_file(path: str = "") -> FileResponse:
        if service.run is None:
            raise ServeError(404, "this server shows no run", "restart it with --run <run folder>")
        return FileResponse(safe_file(service.run.root, path))

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
