"""Uploads in memory: read a request body under a size limit, take the image out of it, decode it by adx's rules.

Nothing touches the disk: the body is read into memory (a multipart form is parsed with python-multipart's
streaming parser, not Starlette's form reader, which spools large files to a temporary file). Every problem
raises :class:`ServeError` with an HTTP status, the problem and its fix, which the app returns as JSON.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from adx.imageio import AdxDataError, BitDepth, decode_pil

_SIGNATURES = (  # leading bytes of the image formats adx reads
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
    (b"GIF8", "GIF"),
)


class ServeError(Exception):
    """A request the server refuses: ``status`` (4xx), what is wrong (``error``) and what to do (``fix``)."""

    def __init__(self, status: int, error: str, fix: str) -> None:
        super().__init__(error)
        self.status, self.error, self.fix = status, error, fix

    def payload(self) -> dict[str, object]:
        """The JSON body of the error response."""
        return {"error": self.error, "fix": self.fix, "status": self.status}


@dataclass
class Upload:
    """One uploaded file: its name (as the client sent it) and its bytes."""

    filename: str
    data: bytes


@dataclass
class Decoded:
    """A decoded upload: pixels (float32 H x W x 3 in [0, 1]) and what the file was."""

    pixels: np.ndarray
    mode: str  # PIL mode of the file: RGB, L, CMYK, I;16, F, ...
    format: str  # PIL format: PNG, JPEG, TIFF, ...
    decoded_as: str  # the adx rule that scaled its values


async def read_body(chunks: AsyncIterator[bytes], length: str | None, max_bytes: int) -> bytes:
    """The request body, refused with 413 as soon as it (or its Content-Length) exceeds ``max_bytes``."""
    too_big = ServeError(
        413,
        f"the upload is larger than the server's limit of {max_bytes / 2**20:.0f} MiB",
        "send a smaller file (PNG/JPEG/TIFF of the part), or restart the server with a larger --max_upload_mb",
    )
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise too_big
    buffer = bytearray()
    async for chunk in chunks:
        buffer.extend(chunk)
        if len(buffer) > max_bytes:
            raise too_big
    return bytes(buffer)


class _Parts:
    """python-multipart callbacks that collect each part's headers and bytes in memory."""

    def __init__(self) -> None:
        self.uploads: list[Upload] = []
        self.headers: dict[bytes, bytes] = {}
        self.field, self.value, self.data = b"", b"", bytearray()

    def on_part_begin(self) -> None:
        self.headers, self.field, self.value, self.data = {}, b"", b"", bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.value += data[start:end]

    def on_header_end(self) -> None:
        self.headers[self.field.lower()] = self.value
        self.field, self.value = b"", b""

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self.data.extend(data[start:end])

    def on_part_end(self) -> None:
        from python_multipart.multipart import parse_options_header

        _, disposition = parse_options_header(self.headers.get(b"content-disposition", b""))
        if b"filename" in disposition:
            name = disposition[b"filename"].decode("utf-8", "replace")
            self.uploads.append(Upload(name or "upload", bytes(self.data)))

    def callbacks(self) -> dict[str, object]:
        names = ("part_begin", "header_field", "header_value", "header_end", "part_data", "part_end")
        return {f"on_{n}": getattr(self, f"on_{n}") for n in names}


def parse_multipart(body: bytes, content_type: str) -> list[Upload]:
    """The file parts of a multipart/form-data body (in memory); fields without a filename are skipped."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise ServeError(
            400, "the multipart request has no boundary", "send the image as a multipart form field 'file'"
        )
    parts = _Parts()
    try:
        parser = MultipartParser(boundary, parts.callbacks())  # type: ignore[arg-type]
        parser.write(body)
        parser.finalize()
    except Exception as exc:  # python-multipart raises its own error types for malformed bodies
        raise ServeError(
            400,
            f"the multipart body cannot be parsed ({exc})",
            "send the image as a multipart form field 'file'",
        ) from exc
    return parts.uploads


def open_image(upload: Upload, max_pixels: int) -> Image.Image:
    """Open the upload's header (no pixels decoded yet) and refuse it if it is empty, not an image or too big."""
    if not upload.data:
        raise ServeError(400, f"'{upload.filename}' is empty (0 bytes)", "upload the image file itself")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(upload.data))
    except (
        Image.DecompressionBombError
    ) as exc:  # Pillow's own limit (2 x Image.MAX_IMAGE_PIXELS), from the header
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = (
            f"{int(found.group(1)) / 1e6:.1f} MP"
            if found
            else "larger than Pillow's decompression-bomb limit"
        )
        raise ServeError(
            413,
            f"'{upload.filename}' is {size}, above the server's limit of {max_pixels / 1e6:.1f} MP and Pillow's "
            "decompression-bomb limit (refused from its header, before decoding)",
            "downscale or crop the image before sending it",
        ) from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        kind = next((k for magic, k in _SIGNATURES if upload.data.startswith(magic)), None)
        if kind is not None:  # an image file whose header is cut short or damaged
            raise ServeError(
                422,
                f"'{upload.filename}' starts like a {kind} file but its header cannot be read: the file is "
                f"truncated or corrupt ({type(exc).__name__}: {exc})",
                "upload the complete file again (check the camera's transfer), or re-save it as PNG",
            ) from exc
        raise ServeError(
            415,
            f"'{upload.filename}' is not an image file Pillow can read ({type(exc).__name__})",
            "upload a PNG, JPEG, TIFF or BMP image (the formats adx trains on)",
        ) from exc
    width, height = img.size
    if width * height > max_pixels:
        img.close()
        raise ServeError(
            413,
            f"'{upload.filename}' is {width} x {height} = {width * height / 1e6:.1f} MP, above the server's "
            f"limit of {max_pixels / 1e6:.1f} MP (refused from its header, before decoding)",
            "downscale or crop the image, or restart the server with a larger --max_pixels",
        )
    if width == 0 or height == 0:
        raise ServeError(
            422, f"'{upload.filename}' has no pixels ({width} x {height})", "upload a real image"
        )
    return img


def describe_decoding(mode: str, bit_depth: BitDepth) -> str:
    """The adx decode rule applied to an image of this PIL mode, in words."""
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        top = 65535 if bit_depth == "auto" else 2**bit_depth - 1
        return f"16-bit grey, divided by {top} (bit_depth {bit_depth}), replicated to RGB"
    if mode == "F":
        return "float grey, read as intensities in [0, 1], replicated to RGB"
    if mode in ("L", "1", "LA", "La"):
        return "8-bit grey / 255, replicated to RGB" + (" (alpha dropped)" if "A" in mode else "")
    if mode == "RGB":
        return "8-bit RGB / 255"
    return f"{mode} converted to 8-bit RGB by Pillow, / 255" + (" (alpha dropped)" if "A" in mode else "")


def decode_upload(upload: Upload, max_pixels: int, bit_depth: BitDepth) -> Decoded:
    """Bytes -> :class:`Decoded` by adx's rules (:func:`adx.imageio.decode_pil`), or a ServeError (4xx)."""
    img = open_image(upload, max_pixels)
    mode, fmt = img.mode, str(img.format or "unknown")
    try:
        with img:
            pixels = decode_pil(img, bit_depth, upload.filename)
    except AdxDataError as exc:  # a file adx refuses by its rules (values out of range, 32-bit ints, ...)
        raise ServeError(422, f"adx cannot use '{upload.filename}' (mode {mode}): {exc}", _fix(exc)) from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        truncated = "truncated" in str(exc).lower() or isinstance(exc, EOFError)
        raise ServeError(
            422,
            f"'{upload.filename}' ({fmt}, mode {mode}) cannot be decoded: "
            f"{'the file is truncated' if truncated else 'its data are corrupt'} ({type(exc).__name__}: {exc})",
            "upload the complete file again (check the camera's transfer), or re-save it as PNG",
        ) from exc
    return Decoded(pixels, mode, fmt, describe_decoding(mode, bit_depth))


def _fix(exc: AdxDataError) -> str:
    text = str(exc)
    return text.split(". ", 1)[1] if ". " in text else "save the image as 8- or 16-bit PNG/TIFF"
