"""Quality of pseudo-label stores against ground truth (``raysemiseg pseudolabel report``).

For every label store given, the rows whose image has a pixel mask in the image store are scored
with the shared metric (:class:`raysemiseg.eval.metrics.ConfusionMatrix`, mIoU over the classes
present in ground truth or prediction, ``ignore_index`` pixels skipped). Outputs: one per-class IoU
table per recipe, a side-by-side summary (recipe | mIoU | pixel acc | rows scored | quarantined),
overlay grids (image | ground truth | pseudo label) for a fixed sample of images, optionally logged
to MLflow through :mod:`raysemiseg.tune.tracking` (one run per report, metrics prefixed by recipe).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from raysemiseg.data.schema import decode_image, decode_mask

__all__ = ["RecipeQuality", "format_comparison", "log_to_mlflow", "quality_report", "score_labels"]


def score_labels(labels: dict[str, bytes], ground_truth: dict[str, bytes], num_classes: int, ignore_index: int,
                 where: str = "labels") -> tuple[object, list[str]]:
    """Score pseudo labels against ground-truth masks with the shared metric.

    Args:
        labels: ``{image_id: encoded label mask}`` (PNG bytes, as the label store holds them).
        ground_truth: ``{image_id: encoded pixel mask}`` of the images that have one.
        num_classes, ignore_index: of the label space (``ignore_index`` pixels of the ground truth
            are skipped).
        where: names the labels in error messages (a label-store folder, a sweep trial).

    Returns:
        (:class:`raysemiseg.eval.metrics.SegMetrics`, the scored image ids in ``labels`` order).

    Raises:
        ValueError: no labelled image has ground truth, or a label's size differs from its mask's
            (naming the image).
    """
    from raysemiseg.eval.metrics import ConfusionMatrix

    cm = ConfusionMatrix(num_classes, ignore_index=ignore_index)
    scored = [i for i in labels if i in ground_truth]
    if not scored:
        raise ValueError(f"{where}: none of its {len(labels)} images has a ground-truth mask")
    for iid in scored:
        pred, target = decode_mask(labels[iid]), decode_mask(ground_truth[iid])
        if pred.shape != target.shape:
            raise ValueError(f"{where}: {iid} label is {pred.shape}, ground truth {target.shape}")
        cm.update(torch.from_numpy(pred), torch.from_numpy(target))
    return cm.compute(), scored


@dataclass
class RecipeQuality:
    """Quality of one label store.

    Attributes:
        recipe: recipe name; ``path``: the label store.
        rows: label rows; ``quarantined``: quarantined rows; ``scored``: rows with ground truth.
        metrics: :class:`raysemiseg.eval.metrics.SegMetrics`; ``table``: the IoU table text.
        files: files written (table, overlays).
    """

    recipe: str
    path: Path
    rows: int
    quarantined: int
    scored: int
    metrics: object
    table: str
    files: list[Path] = field(default_factory=list)


def quality_report(label_dirs: Sequence[str | Path], store_path: str | Path, out_dir: str | Path | None = None,
                   num_overlays: int = 4) -> list[RecipeQuality]:
    """Score each label store against the image store's pixel masks.

    Args:
        label_dirs: label store folders.
        store_path: the image store they were made from.
        out_dir: where to write ``<recipe>_iou.txt``, ``<recipe>_overlays.png`` and ``summary.txt``
            (None = write nothing).
        num_overlays: images in each overlay grid (the first scored rows in store order, the same
            images for every recipe).

    Returns:
        one :class:`RecipeQuality` per label store, in the given order.

    Raises:
        FileNotFoundError: a store is missing.
        ValueError: no image of a label store has ground truth.
    """
    from raysemiseg.data.store import open_store
    from raysemiseg.eval.metrics import format_iou_table
    from raysemiseg.eval.predict import Sample
    from raysemiseg.eval.report import overlay_grid
    from raysemiseg.pseudolabel.store import open_label_store

    store = open_store(store_path)
    space = store.label_space
    gt_t = store.read_table(["image_id", "mask"])
    gt = {i: m for i, m in zip(gt_t.column("image_id").to_pylist(), gt_t.column("mask").to_pylist()) if m is not None}
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    results = []
    overlay_ids: list[str] | None = None
    imgs: dict[str, bytes] | None = None
    for d in label_dirs:
        ls = open_label_store(d)
        masks = ls.masks()
        metrics, scored = score_labels(masks, gt, space.num_classes, space.ignore_index,
                                       where=f"label store {d} (image store {store_path})")
        title = f"{ls.recipe}: {len(scored)} images with ground truth ({d})"
        table = format_iou_table(metrics, space, title=title)
        rq = RecipeQuality(ls.recipe, Path(d), len(masks), ls.read_quarantine().num_rows, len(scored), metrics, table)
        if out is not None:
            p = out / f"{ls.recipe}_iou.txt"
            p.write_text(table + "\n")
            rq.files.append(p)
            if num_overlays > 0:
                if overlay_ids is None:
                    overlay_ids = scored[:num_overlays]
                ids = [i for i in overlay_ids if i in masks] or scored[:num_overlays]
                if imgs is None:
                    img_t = store.read_table(["image_id", "image"])
                    imgs = dict(zip(img_t.column("image_id").to_pylist(), img_t.column("image").to_pylist()))
                samples = [Sample(i, decode_image(imgs[i]), decode_mask(gt[i]), decode_mask(masks[i])) for i in ids]
                p = out / f"{ls.recipe}_overlays.png"
                overlay_grid(samples, space).save(p)
                rq.files.append(p)
        results.append(rq)
    if out is not None:
        (out / "summary.txt").write_text(format_comparison(results) + "\n")
        (out / "summary.json").write_text(json.dumps(
            [{"recipe": r.recipe, "path": str(r.path), "miou": _f(r.metrics.miou), "pixel_acc": _f(r.metrics.pixel_acc),
              "rows": r.rows, "scored": r.scored, "quarantined": r.quarantined} for r in results], indent=1))
    return results


def _f(v: float) -> float | None:
    return None if v is None or not np.isfinite(v) else float(v)


def format_comparison(results: Sequence[RecipeQuality]) -> str:
    """Side-by-side summary: recipe | mIoU % | pixel acc % | rows | scored | quarantined."""
    w = max([len("recipe")] + [len(r.recipe) for r in results])
    head = f"{'recipe':<{w}}  {'mIoU %':>7}  {'pix acc %':>9}  {'rows':>5}  {'scored':>6}  {'quarantined':>11}"
    lines = [head, "-" * len(head)]
    for r in results:
        m = r.metrics
        lines.append(f"{r.recipe:<{w}}  {100 * m.miou:7.2f}  {100 * m.pixel_acc:9.2f}  {r.rows:>5}  {r.scored:>6}  "
                     f"{r.quarantined:>11}")
    return "\n".join(lines)


def log_to_mlflow(results: Sequence[RecipeQuality], storage_path: str = "runs", tracking_uri: str | None = None,
                  experiment: str = "raysemiseg-pseudolabel", run_name: str = "pseudolabel-report") -> str:
    """Log a report as one MLflow run (via the project's MLflow adapter). Returns the run id."""
    from raysemiseg.tune.tracking import Tracker, resolve_tracking_uri

    uri, art = resolve_tracking_uri(tracking_uri, storage_path)
    key = str(Path(storage_path).resolve() / run_name)
    tr = Tracker(uri, experiment, run_name, key, art)
    run_id = tr.start()
    metrics: dict[str, float] = {}
    for r in results:
        metrics[f"{r.recipe}/miou"] = float(r.metrics.miou)
        metrics[f"{r.recipe}/pixel_acc"] = float(r.metrics.pixel_acc)
        metrics[f"{r.recipe}/quarantined"] = float(r.quarantined)
        tr.log_text(r.table, f"{r.recipe}_iou.txt")
        for f in r.files:
            tr.log_artifact(f, "pseudolabel")
    tr.log_metrics(metrics)
    tr.log_text(format_comparison(results), "summary.txt")
    tr.end()
    return run_id
