"""``adx serve``: an inspection page and a JSON API for a fitted model, one FastAPI + uvicorn process.

``adx serve --bundle DIR`` (or ``--ckpt FILE``, exported first) serves ``/`` (upload images, see score,
decision, heatmap and mask outline; a threshold slider that relabels in the browser; a finished run's gallery
with ``--run``; the model card) and ``/api/*`` for line integration. See docs/serve.md. Needs
``pip install "adx[serve]"`` (FastAPI, uvicorn, python-multipart) and a runtime of ``adx[deploy]``.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> None:
    """Run ``adx serve`` with ``argv`` (the arguments after ``serve``)."""
    from adx.serve.cli import main as serve_main

    serve_main(argv)


__all__ = ["main"]
