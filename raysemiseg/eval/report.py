"""Evaluation reports: the per-class IoU table, colour overlays and a per-class IoU bar chart.

Files written by :func:`write_report` into ``out_dir``::

    iou_table.txt    format_iou_table (percent per class, mIoU footer)
    metrics.json     {"miou", "pixel_acc", "mean_acc", "iou": {class: value or null}, ...}
    overlays.png     one row per sample: image | ground truth | prediction (label-space palette)
    iou_bar.png      per-class IoU bars (classes absent from ground truth and prediction left out)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from raysemiseg.eval.metrics import format_iou_table
from raysemiseg.eval.predict import EvalResult, Sample
from raysemiseg.labels import LabelSpace


@dataclass
class EvalReport:
    """An :class:`EvalResult` with its rendered table and the files written."""

    result: EvalResult
    table: str
    files: list[Path] = field(default_factory=list)


def colorize(mask: np.ndarray, space: LabelSpace) -> np.ndarray:
    """(H, W) ids -> (H, W, 3) uint8 colours; ``ignore_index`` is white."""
    out = np.full(mask.shape + (3,), 255, np.uint8)
    valid = (mask >= 0) & (mask < space.num_classes)
    out[valid] = space.palette[mask[valid]]
    return out


def blend(image: np.ndarray, mask: np.ndarray, space: LabelSpace, alpha: float = 0.6) -> np.ndarray:
    """Colour ``mask`` over ``image``: (H, W, 3) uint8; ignore and background pixels keep the image."""
    col = colorize(mask, space).astype(np.float32)
    img = image.astype(np.float32)
    clear = mask == space.ignore_index
    if space.background_id is not None:
        clear |= mask == space.background_id
    a = np.where(clear[..., None], 0.0, alpha)
    return (img * (1 - a) + col * a).clip(0, 255).astype(np.uint8)


def overlay_grid(samples: Sequence[Sample], space: LabelSpace, tile: int = 200) -> Image.Image:
    """One row per sample: image | ground truth overlay | prediction overlay, ``tile`` px high.

    Raises:
        ValueError: no samples.
    """
    if not samples:
        raise ValueError("no samples to draw")
    rows = []
    for s in samples:
        h, w = s.image.shape[:2]
        tw = max(int(round(w * tile / h)), 1)
        cells = [s.image, blend(s.image, s.target, space), blend(s.image, s.pred, space)]
        rows.append([Image.fromarray(c).resize((tw, tile), Image.NEAREST) for c in cells])
    width = max(sum(c.width for c in r) + 4 * 2 for r in rows)
    header = 18
    grid = Image.new("RGB", (width, header + len(rows) * (tile + 4)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    x = 0
    for title, cell in zip(("image", "ground truth", "prediction"), rows[0]):
        draw.text((x + 4, 3), title, fill=(0, 0, 0))
        x += cell.width + 4
    for i, (r, s) in enumerate(zip(rows, samples)):
        x, y = 0, header + i * (tile + 4)
        for cell in r:
            grid.paste(cell, (x, y))
            x += cell.width + 4
        draw.text((4, y + 2), s.image_id[-24:], fill=(255, 255, 0))
    return grid


def iou_bar_chart(result: EvalResult, path: str | Path, title: str | None = None,
                  compare: dict[str, EvalResult] | None = None, name: str = "model") -> Path:
    """Per-class IoU bars (percent) for ``result`` (called ``name``) and optional named comparisons
    side by side.

    Classes excluded (NaN) in every result are left out.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = {name: result, **(compare or {})}
    space = result.label_space
    ious = np.stack([r.metrics.iou for r in results.values()])
    keep = [k for k in range(space.num_classes) if np.isfinite(ious[:, k]).any()]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(keep) * len(results) + 2), 4))
    width = 0.8 / len(results)
    xs = np.arange(len(keep))
    for j, (name, r) in enumerate(results.items()):
        vals = np.nan_to_num(r.metrics.iou[keep] * 100.0)
        ax.bar(xs + j * width - 0.4 + width / 2, vals, width, label=f"{name} (mIoU {r.metrics.miou * 100:.1f})")
    ax.set_xticks(xs)
    ax.set_xticklabels([space.names[k] for k in keep], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title or f"per-class IoU (mIoU {result.metrics.miou * 100:.1f}%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    p = Path(path)
    fig.savefig(p, dpi=100)
    plt.close(fig)
    return p


def metrics_dict(result: EvalResult) -> dict:
    """JSON-ready metrics of ``result`` (NaN -> null)."""
    m = result.metrics
    return {"miou": m.miou, "pixel_acc": m.pixel_acc, "mean_acc": m.mean_acc, "num_images": result.num_images,
            "crf": result.crf, "flip": result.flip, "seconds": result.seconds,
            "iou": {result.label_space.names[k]: (float(v) if np.isfinite(v) else None) for k, v in enumerate(m.iou)}}


def write_report(result: EvalResult, out_dir: str | Path, title: str | None = None,
                 compare: dict[str, EvalResult] | None = None) -> EvalReport:
    """Write the table, metrics, overlays and bar chart of ``result`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = format_iou_table(result.metrics, result.label_space, title=title)
    files = [out / "iou_table.txt", out / "metrics.json"]
    files[0].write_text(table + "\n")
    files[1].write_text(json.dumps(metrics_dict(result), indent=2))
    if result.samples:
        p = out / "overlays.png"
        overlay_grid(result.samples, result.label_space).save(p)
        files.append(p)
    files.append(iou_bar_chart(result, out / "iou_bar.png", title=title, compare=compare))
    return EvalReport(result, table, files)
