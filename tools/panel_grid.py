"""Stack the heatmap panels that several test runs wrote for one test image into one labelled PNG.

    python tools/panel_grid.py --image structural_anomalies/012.jpg --height 160 \
        --run "PatchCore=results/patchcore/mvtec_loco/juice_bottle/v1" \
        --run "DRAEM=results/draem/mvtec_loco/juice_bottle/v1" --out docs/img/juice_bottle_panels.png

Each run folder is one ``adx test`` (or fit-then-test) run: its ``heatmaps/<image>`` panel (input with the
ground-truth outline, heatmap overlay, predicted mask) is scaled to ``--height`` and drawn under the
previous one, with the method's name on the left. Runs at different image sizes line up this way.

``LABEL=@GRID.png:ROW`` takes row ROW (from 0) of a grid this script wrote earlier with the same
``--height``, so one method's row can be remade from a new run while the others keep theirs (their run
folders may be gone): the earlier grid is read before the new one is written, so ``--out`` may be it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw


def earlier_row(spec: str, height: int, label_width: int) -> Image.Image:
    """Row ``ROW`` of the grid ``GRID.png`` in ``GRID.png:ROW``, without its label column."""
    path, _, row = spec.rpartition(":")
    if not Path(path).is_file() or not row.isdigit():
        raise SystemExit(f"panel_grid: @{spec} is not GRID.png:ROW of an existing grid")
    old = Image.open(path).convert("RGB")
    if old.height % height or int(row) >= old.height // height:
        raise SystemExit(
            f"panel_grid: {path} is {old.height} px high, not rows of --height {height} with a row {row}"
        )
    top = int(row) * height
    return old.crop((label_width, top, old.width, top + height))


def grid(panels: list[tuple[str, Path | str]], height: int, label_width: int = 130) -> Image.Image:
    """One image: a row per (label, panel file or ``@GRID.png:ROW``), panels scaled to ``height`` px."""
    rows = []
    for label, path in panels:
        if isinstance(path, str):
            rows.append((label, earlier_row(path.removeprefix("@"), height, label_width)))
            continue
        if not path.is_file():
            raise SystemExit(
                f"panel_grid: no panel {path} (is the run folder an `adx test` run of that image?)"
            )
        panel = Image.open(path).convert("RGB")
        rows.append((label, panel.resize((round(panel.width * height / panel.height), height))))
    width = label_width + max(p.width for _, p in rows)
    out = Image.new("RGB", (width, height * len(rows)), "white")
    draw = ImageDraw.Draw(out)
    for i, (label, panel) in enumerate(rows):
        out.paste(panel, (label_width, i * height))
        draw.text((6, i * height + height // 2 - 6), label, fill="black")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--image", required=True, help="the test image's path below heatmaps/, e.g. broken/000.jpg"
    )
    parser.add_argument(
        "--run",
        action="append",
        required=True,
        help="LABEL=RUN_FOLDER or LABEL=@GRID.png:ROW (a row of an earlier grid); repeatable, in order",
    )
    parser.add_argument("--height", type=int, default=160)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    panels: list[tuple[str, Path | str]] = [
        (label, folder if folder.startswith("@") else Path(folder) / "heatmaps" / args.image)
        for label, folder in (r.split("=", 1) for r in args.run)
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    grid(panels, args.height).save(args.out, optimize=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
