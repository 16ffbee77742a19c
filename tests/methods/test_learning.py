"""The learning check (issue "Learning that shows", DESIGN.md section 6): every registered method,
trained through its own ``compute_losses`` with the shared loop's ``train_step`` on 8 real VOC 2012
images from the bundled sample, must

(a) fit them: train-set mIoU >= 50 % over the classes present in the 8 masks (background included),
    scored with the one metric (:class:`raysemiseg.eval.metrics.ConfusionMatrix`) on ``predict``;
(b) give outputs that change with the input (two different images -> different logits);
(c) label-conditioned methods (TransferNet, DecoupledNet): outputs that change with the
    conditioning label (the same image with two different given labels).

Shape and gradient tests cannot catch a decoder that sits at the background prior; this can.
One test parametrized over the registry: a method without a :data:`SPECS` entry fails, so a new
method cannot join the registry without a learning check. ``cam_classifier`` is a classifier (its
task is image labels, its dense output is a CAM): its check (a) is that it fits the 8 images'
image-level labels (every present label scored above every absent one), not a segmentation mIoU.

Each method's stages have fixed step budgets, sized to at most ``SECONDS`` of CPU (2 cores) in all; the
last stage stops as soon as every check passes (asked every 5 steps), so a method costs what fitting
the 8 images takes. The time and the steps used are printed.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from raysemiseg.config import ModelConfig, OptimConfig
from raysemiseg.eval.metrics import ConfusionMatrix
from raysemiseg.labels import builtin
from raysemiseg.methods import METHODS, Batch, get_method
from stage_training import train_stages  # tests/methods/stage_training.py

pytestmark = pytest.mark.learning

SECONDS = 60.0     # the budget per method (all stages), 2 CPU cores
SIZE = 128         # images resized (short side) and centre-cropped to SIZE x SIZE (CI time)
N_IMAGES = 8
SPACE = builtin("voc21")
IGN = SPACE.ignore_index


@dataclass(frozen=True)
class Spec:
    """How one method is trained in the check.

    Attributes:
        stages: (stage, steps) run in order; optimizers are rebuilt per stage (as the pipeline's
            stage chain does with ``init_from``).
        params: the method's params (small widths: CPU budget).
        weak: indices of the 8 rows fed as weak rows (masks void); their weak label is ``weak_label``.
        weak_label: "pseudo" (``batch.pseudo`` = Bbox-Rect of the mask-derived boxes, the quickstart's
            weak labels) or "image" (image-level labels only: ``pseudo`` void).
        given_labels: predict with the rows' ground-truth image labels (label-conditioned methods).
        weak_copies: feed the 8 images twice, as strong rows and again as weak rows (16 rows): the
            dual-branch network predicts with its strong branch only (Luo & Yang Sec. 3.2), so its fit
            is measured on images that branch saw, while the weak branch trains on the same images'
            weak labels (the paper's Table 1 "strong + weak" setting).
    """

    stages: tuple[tuple[str, int], ...]
    params: dict[str, Any] = field(default_factory=dict)
    weak: tuple[int, ...] = ()
    weak_label: str = "pseudo"
    given_labels: bool = False
    weak_copies: bool = False


HEAD = {"head_hidden": 128, "head_dropout": 0.0, "head_dilation": 2}
NECK = {"neck_channels": 128, "neck_dilation": 2}
SPECS: dict[str, Spec] = {
    "strong_only": Spec((("default", 40),), HEAD),
    # semi-supervised Bbox-EM-Fixed: half the rows with boxes + image labels only (Sec. 3.3)
    "wssl": Spec((("default", 50),), {**HEAD, "estep": "fixed", "use_boxes": True, "use_label_store": False},
                 weak=(4, 5, 6, 7), weak_label="image"),
    "dual_branch": Spec((("default", 40),), {**NECK, "neck_depth": 2}, weak_copies=True),
    "single_branch_mixed": Spec((("default", 50),), NECK, weak=(4, 5, 6, 7)),
    "lnet": Spec((("lnet", 15), ("segment", 45)), {**HEAD, "pseudo_weight": 1.0}, weak=(4, 5, 6, 7)),
    "lnet_pnet": Spec((("lnet", 10), ("pretrain_pnet", 10), ("joint", 40)),
                      {**HEAD, "pseudo_weight": 1.0, "pnet_input_size": 32}, weak=(4, 5, 6, 7)),
    "decoupled": Spec((("classify", 20), ("segment", 40)), {}, given_labels=True),
    # frozen encoder: a step costs ~1/3 of decoupled's (10.6 vs 28.5 s CPU for 60), so 100 joint steps fit the budget
    # (measured: 40 joint steps 43-53 % train mIoU, 100 steps 91 %, 21 s CPU on one core)
    "transfernet": Spec((("attention", 20), ("joint", 100)), {}, given_labels=True),
    "cam_classifier": Spec((("default", 30),), {}),
}


def _sample_dir() -> Path:
    """The bundled VOC sample (``$RAYSEMISEG_LEARNING_VOC`` points the check at another VOC folder)."""
    root = Path(__file__).resolve().parents[2]
    bundled = Path(os.environ.get("RAYSEMISEG_LEARNING_VOC", root / "raysemiseg" / "sample_data" / "voc2012-sample"))
    if not bundled.is_dir():
        raise FileNotFoundError(f"bundled VOC sample missing at {bundled} (make sample)")
    return bundled


def _load(path: Path, size: int, resample: int) -> np.ndarray:
    im = Image.open(path)
    w, h = im.size
    s = size / min(w, h)
    im = im.resize((max(size, round(w * s)), max(size, round(h * s))), resample)
    w, h = im.size
    x0, y0 = (w - size) // 2, (h - size) // 2
    return np.asarray(im.crop((x0, y0, x0 + size, y0 + size)))


def _boxes(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The row's boxes as the VOC reader derives them from the mask (no XML in the sample), as
    (Bbox-Rect rendering (H, W) int64, per-class box bits (ceil(K/8), H, W) uint8)."""
    from raysemiseg.data.voc import boxes_from_mask
    from raysemiseg.train.data import render_box_bits, render_boxes

    boxes = boxes_from_mask(mask, SPACE)
    h, w = mask.shape
    return (render_boxes(boxes, h, w, IGN, SPACE.background_id).astype(np.int64),
            render_box_bits(boxes, h, w, SPACE.num_classes))


@pytest.fixture(scope="module")
def voc8() -> dict[str, Any]:
    """8 real training images of the bundled sample (the first of train.txt), their masks, image
    labels and Bbox-Rect renderings; images normalised with ImageNet's mean/std."""
    d = _sample_dir()
    ids = (d / "ImageSets" / "Segmentation" / "train.txt").read_text().split()[:N_IMAGES]
    imgs = np.stack([_load(d / "JPEGImages" / f"{i}.jpg", SIZE, Image.BILINEAR) for i in ids])
    masks = np.stack([_load(d / "SegmentationClass" / f"{i}.png", SIZE, Image.NEAREST) for i in ids]).astype(np.int64)
    labels = torch.zeros(N_IMAGES, SPACE.num_classes)
    for r, m in enumerate(masks):
        present = [c for c in np.unique(m) if c != IGN]
        labels[r, present] = 1.0
        labels[r, SPACE.background_id] = 1.0
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    x = (torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
    rect, bits = zip(*(_boxes(m) for m in masks))
    return {"ids": ids, "images": x, "masks": torch.from_numpy(masks), "labels": labels,
            "boxes": torch.from_numpy(np.stack(rect)), "box_bits": torch.from_numpy(np.stack(bits))}


def _batch(voc8: dict[str, Any], spec: Spec) -> Batch:
    if spec.weak_copies:
        strong_b = _batch(voc8, Spec(spec.stages))
        weak_b = _batch(voc8, Spec(spec.stages, weak=tuple(range(N_IMAGES)), weak_label=spec.weak_label))
        return Batch(**{f: (torch.cat([getattr(strong_b, f), getattr(weak_b, f)]) if f != "image_ids"
                            else strong_b.image_ids + weak_b.image_ids)
                        for f in ("images", "masks", "pseudo", "image_labels", "is_strong", "box_masks", "box_bits",
                                  "image_ids")})
    n = N_IMAGES
    strong = torch.tensor([i not in spec.weak for i in range(n)])
    truth = voc8["masks"]
    void = torch.full_like(truth, IGN)
    masks = torch.where(strong.view(-1, 1, 1), truth, void)
    weak_target = voc8["boxes"] if spec.weak_label == "pseudo" else void
    pseudo = torch.where(strong.view(-1, 1, 1), void, weak_target)
    return Batch(images=voc8["images"], masks=masks, pseudo=pseudo, image_labels=voc8["labels"],
                 is_strong=strong, box_masks=voc8["boxes"], box_bits=voc8["box_bits"], image_ids=list(voc8["ids"]))


def _predict(method: Any, images: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    method.eval()
    with torch.no_grad():
        return method.predict(images) if labels is None else method.predict(images, image_labels=labels)


def _build(name: str, spec: Spec) -> Any:
    torch.manual_seed(0)
    cls = get_method(name)
    model = ModelConfig(backbone="efficientnet_lite0", pretrained=True, output_stride=16, freeze_bn=True,
                        freeze_at=5)  # the quickstart's recipe
    return cls(SPACE, model, cls.Params(**spec.params))


def _failures(name: str, method: Any, voc8: dict[str, Any], spec: Spec, say: bool = False) -> list[str]:
    """Checks (a), (b) and (c) of the module docstring on ``method`` as it is now; returns what fails
    (empty: it passes). ``say`` prints the figures."""
    failed: list[str] = []
    given = voc8["labels"] if spec.given_labels else None
    logits = _predict(method, voc8["images"], given)

    # (b) outputs change with the input: images 0 and 1 (different scenes) under the SAME conditioning
    # (image 0's labels for both, so the absent-class logits cannot differ), compared as probabilities
    same = None if given is None else voc8["labels"][[0, 0]]
    pair = torch.softmax(_predict(method, voc8["images"][[0, 1]], same), dim=1)
    if float((pair[0] - pair[1]).abs().mean()) <= 1e-2:
        failed.append("outputs do not depend on the input")

    if name == "cam_classifier":
        scores = logits.mean(dim=(2, 3))[:, SPACE.foreground_ids]     # GAP of the dense classifier map
        target = voc8["labels"][:, SPACE.foreground_ids].bool()
        failed += [f"image {voc8['ids'][r]}: a present label scores below an absent one" for r in range(N_IMAGES)
                   if not scores[r][target[r]].min() > scores[r][~target[r]].max()]
    else:
        cm = ConfusionMatrix(SPACE.num_classes, IGN)
        cm.update(logits.argmax(1), voc8["masks"])
        m = cm.compute()
        present = sorted(int(c) for c in torch.unique(voc8["masks"]) if int(c) != IGN)
        miou = m.miou_over(present)
        if say:
            print(f"[learning] {name}: train mIoU over {len(present)} present classes {miou * 100:.1f} %")
        if miou < 0.5:
            failed.append(f"{name}: train-set mIoU {miou * 100:.1f} % < 50 % over the present classes {present}")

    # (c) label-conditioned methods: the same image conditioned on another foreground label. The
    # foreground-probability map 1 - p(background) is compared, not the logits (an absent class sits at
    # a large negative constant, so any change of label set would move the logits): a segmenter that
    # ignores its conditioning label draws the same foreground map for every label.
    if getattr(method, "label_conditioned", False):
        other = torch.zeros_like(voc8["labels"])
        other[:, SPACE.background_id] = 1.0
        for r in range(N_IMAGES):                    # "person", or "dog" where the image holds a person
            other[r, 12 if voc8["labels"][r, 15] > 0 else 15] = 1.0
        assert not bool((other[:, 1:] * voc8["labels"][:, 1:]).any()), "the other label must be absent"
        bg = SPACE.background_id
        fg_true = 1.0 - torch.softmax(logits, dim=1)[:, bg]
        fg_other = 1.0 - torch.softmax(_predict(method, voc8["images"], other), dim=1)[:, bg]
        moved = float((fg_true - fg_other).abs().mean())
        if say:
            print(f"[learning] {name}: foreground map moves by {moved:.3f} with the conditioning label")
        if moved <= 2e-2:
            failed.append(f"{name}: the foreground map does not depend on the conditioning label ({moved:.4f})")
    return failed


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_learns_8_real_images(name: str, voc8: dict[str, Any]) -> None:
    assert name in SPECS, f"registered method {name!r} has no learning-check spec in {__file__}"
    spec = SPECS[name]
    torch.set_num_threads(2)
    method = _build(name, spec)
    batch = _batch(voc8, spec)
    optim = OptimConfig(optimizer="adamw", lr=1e-4, weight_decay=1e-4, amp=False)
    t0 = time.perf_counter()
    # the last stage's steps are the budget: it stops as soon as every check passes (asked every 5 steps)
    first, last, ran = train_stages(method, batch, spec.stages, optim,
                                    until=lambda m: not _failures(name, m, voc8, spec))
    seconds = time.perf_counter() - t0
    budget = spec.stages[-1][1]
    print(f"\n[learning] {name}: {seconds:.1f}s, last stage {ran} of {budget} steps, first losses {first}, last {last}")
    failed = _failures(name, method, voc8, spec, say=True)
    assert not failed, "; ".join(failed)
