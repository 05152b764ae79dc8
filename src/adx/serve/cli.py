"""``adx serve``: command-line options, the bundle to serve (exporting a checkpoint first if asked), uvicorn.

adx serve --bundle RUN/export/onnx [--run RUN] [--host 127.0.0.1] [--port 8000]
adx serve --ckpt RUN/checkpoints/last.ckpt          # exported to a temporary bundle, removed on exit
adx serve --run RUN                                 # RUN/export/onnx if present, else RUN's last.ckpt
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from adx.deploy import BundleError, Inferencer
from adx.serve.gallery import RunFolder, RunFolderError, load_run


def _bit_depth(text: str) -> str | int:
    if text == "auto" or (text.isdigit() and 8 <= int(text) <= 16):
        return text if text == "auto" else int(text)
    raise argparse.ArgumentTypeError(f"expected auto or 8..16 (the bits your camera writes), got {text!r}")


def parser() -> argparse.ArgumentParser:
    """The options of ``adx serve``."""
    p = argparse.ArgumentParser(
        prog="adx serve",
        description="Serve a fitted model as an inspection page and a JSON API (docs/serve.md).",
    )
    source = p.add_argument_group("model (one of --bundle, --ckpt; or --run alone)")
    source.add_argument("--bundle", default=None, help="bundle folder written by adx export")
    source.add_argument("--ckpt", default=None, help="checkpoint: exported to a temporary ONNX bundle first")
    p.add_argument("--run", default=None, help="a finished run folder: its test results as a gallery")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--max_pixels", type=int, default=50_000_000, help="refuse larger images (from the header)"
    )
    p.add_argument("--max_upload_mb", type=float, default=100.0, help="refuse larger request bodies")
    p.add_argument("--runtime", default=None, help="onnxruntime | openvino | torch (default: the bundle's)")
    p.add_argument(
        "--concurrency", type=int, default=None, help="images scored at once (default: min(4, CPUs))"
    )
    p.add_argument(
        "--threads", type=int, default=None, help="runtime threads per image (default: CPUs // concurrency)"
    )
    p.add_argument(
        "--bit_depth",
        type=_bit_depth,
        default="auto",
        help="significant bits of 16-bit images: auto or 8..16",
    )
    p.add_argument("--log_level", default="warning", help="uvicorn log level (info logs every request)")
    return p


@contextlib.contextmanager
def bundle_folder(bundle: str | None, ckpt: str | None, run: str | None) -> Iterator[Path]:
    """The bundle to serve; a checkpoint is exported to a temporary folder, deleted when the server stops."""
    if bundle and ckpt:
        raise SystemExit("adx serve: pass --bundle or --ckpt, not both.")
    if not bundle and not ckpt and run:
        exported = Path(run) / "export" / "onnx"
        if (exported / "metadata.json").is_file():
            bundle = str(exported)
        elif (Path(run) / "checkpoints" / "last.ckpt").is_file():
            ckpt = str(Path(run) / "checkpoints" / "last.ckpt")
    if bundle:
        yield Path(bundle)
        return
    if not ckpt:
        raise SystemExit(
            "adx serve: pass --bundle <bundle folder>, --ckpt <checkpoint> or --run <run folder>."
        )
    from adx.deploy_cli import load_model
    from adx.export import ExportError, export

    model = load_model(ckpt)
    with tempfile.TemporaryDirectory(prefix="adx_serve_") as tmp:
        print(f"adx serve: exporting {ckpt} to a temporary ONNX bundle ...", file=sys.stderr)
        try:
            out = export(model, Path(tmp) / "bundle", "onnx", ckpt_path=ckpt)
        except ExportError as exc:
            raise SystemExit(f"adx serve: {exc}") from None
        del model
        yield out


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``adx serve`` (and ``python -m adx.serve``)."""
    args = parser().parse_args(argv)
    import uvicorn

    from adx.serve.app import create_app

    run: RunFolder | None = None
    if args.run:
        try:
            run = load_run(args.run)
        except RunFolderError as exc:
            raise SystemExit(f"adx serve: {exc}") from None
    with bundle_folder(args.bundle, args.ckpt, args.run) as bundle:
        concurrency = args.concurrency or min(4, os.cpu_count() or 1)
        threads = args.threads
        if threads is None and not os.environ.get("OMP_NUM_THREADS"):
            threads = max(1, (os.cpu_count() or 1) // concurrency)  # the cores, shared by concurrent scorings
        try:
            inferencer = Inferencer(bundle, runtime=args.runtime, threads=threads, bit_depth=args.bit_depth)
        except (BundleError, ValueError) as exc:
            raise SystemExit(f"adx serve: {exc}") from None
        app = create_app(inferencer, run, args.max_pixels, args.max_upload_mb, concurrency)
        if not _loopback(args.host):
            print(
                f"adx serve: WARNING: bound to {args.host}: anyone who can reach this address can use the page "
                "and the API (there is no authentication). Use --host 127.0.0.1 unless the network is trusted.",
                file=sys.stderr,
            )
        shown = f"[{args.host}]" if ":" in args.host else args.host
        print(
            f"adx serve: {inferencer.metadata.get('method')} from {bundle} on http://{shown}:{args.port}/ "
            f"({concurrency} images at a time, {threads or 'default'} runtime threads each; Ctrl+C stops)",
            file=sys.stderr,
            flush=True,
        )
        # uvicorn re-raises SIGTERM after its graceful shutdown: exit through the with-block, so a temporary
        # bundle is deleted
        signal.signal(signal.SIGTERM, _exit)
        try:
            uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
        except KeyboardInterrupt:  # Ctrl+C, re-raised by uvicorn after its graceful shutdown
            print("adx serve: stopped", file=sys.stderr)


def _exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)
