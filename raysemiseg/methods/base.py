"""The method protocol: one training loop serves every method (DESIGN.md section 3).

A method is an ``nn.Module`` with a ``name``, a pydantic ``Params`` model for its own knobs, and
two calls: ``compute_losses(batch)`` returns named loss terms that the loop sums (per optimizer
group), and ``predict(images)`` returns (N, C, H, W) logits at input resolution.

Methods that need more than one optimizer (P-Net's discriminator, DecoupledNet's stages) return
several :class:`OptimizerGroup` from ``optimizer_groups`` and prefix each loss key with the group
name (``"disc/adv"``); the loop steps each group on the sum of its own losses. Everything else uses
one group named ``"main"`` and plain loss names.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from raysemiseg.labels import LabelSpace

SUPERVISION_CODES = {"pixel": 0, "box": 1, "image": 2}


@dataclass
class Batch:
    """A training/eval mini-batch, already decoded, augmented and normalised.

    Attributes:
        images: (N, 3, H, W) float32, normalised with the backbone's mean/std.
        masks: (N, H, W) int64 strong labels; ``ignore_index`` where a row has no pixel labels
            (weak rows) or the pixel is void.
        pseudo: (N, H, W) int64 pseudo labels from a label store (weak rows), ``ignore_index``
            where none.
        image_labels: (N, K) float32 multi-hot image-level labels over the label space
            (K = num_classes; background column is 1 for every row when the space has one).
        is_strong: (N,) bool, True where the row's pixel labels are used as strong supervision.
        box_masks: optional (N, H, W) int64 Bbox-Rect rendering of the row's boxes (class id inside
            boxes, background outside), ``ignore_index`` for rows without boxes.
        box_bits: optional (N, ceil(K/8), H, W) uint8 per-class box regions: bit ``c % 8`` of
            byte ``c // 8`` is set inside every box of class ``c`` (overlapping boxes keep all
            their classes; :func:`raysemiseg.train.data.render_box_bits`), zero elsewhere.
        image_ids: the rows' ids (for logging and overlays).
        valid: optional (N, H, W) bool, True on the image's own pixels and False on padding added
            by the crop (:func:`raysemiseg.train.data.augment_example`); ``None`` = every pixel
            valid (see :meth:`valid_mask`). Invalid pixels get no E-step label and no loss.
    """

    images: Tensor
    masks: Tensor
    pseudo: Tensor
    image_labels: Tensor
    is_strong: Tensor
    box_masks: Tensor | None = None
    image_ids: list[str] = field(default_factory=list)
    valid: Tensor | None = None
    box_bits: Tensor | None = None

    def valid_mask(self) -> Tensor:
        """(N, H, W) bool valid-pixel mask: ``valid``, or all True (shape of ``masks``) when absent."""
        if self.valid is not None:
            return self.valid.to(torch.bool)
        return torch.ones(self.masks.shape, dtype=torch.bool, device=self.masks.device)

    def to(self, device: torch.device | str) -> "Batch":
        """Move every tensor to ``device`` (non-blocking)."""
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                kw[f.name] = v.to(device, non_blocking=True)
        return replace(self, **kw)

    def select(self, rows: Tensor) -> "Batch":
        """Sub-batch of the rows where the (N,) bool ``rows`` is True (or given int indices)."""
        kw: dict[str, Any] = {}
        idx = rows.nonzero(as_tuple=True)[0] if rows.dtype == torch.bool else rows
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                kw[f.name] = v[rows]
            elif f.name == "image_ids" and v:
                kw[f.name] = [v[i] for i in idx.tolist()]
        return replace(self, **kw)


class MethodParams(BaseModel):
    """Base of every method's own parameters: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class OptimizerGroup:
    """A set of parameters stepped together on the sum of the losses prefixed ``name/``.

    ``lr_mult`` scales the configured base learning rate; ``optimizer`` overrides the configured
    optimizer kind ("sgd" | "adam") for this group when set.
    """

    name: str
    params: list[dict[str, Any]]
    optimizer: str | None = None


class Method(nn.Module):
    """Base class of all methods.

    Subclasses set ``name`` and ``Params`` and implement ``compute_losses`` and ``predict``.
    Constructor signature: ``(label_space, model, params)`` where ``model`` is the run's
    :class:`raysemiseg.config.ModelConfig` (backbone name, pretrained, output stride); a method
    builds its networks with :func:`raysemiseg.models.backbones.build_backbone` and registers the
    shared feature extractor as ``self.backbone`` (so the default optimizer groups find it).
    """

    name: ClassVar[str] = "base"
    Params: ClassVar[type[MethodParams]] = MethodParams
    #: supervision the method trains from: rows of other kinds are still fed but unused
    uses: ClassVar[tuple[str, ...]] = ("pixel",)
    #: whether ``compute_losses`` reads the rendered boxes (``Batch.box_masks`` / ``box_bits``):
    #: only then does the data plan render them. A method may train on box rows (``"box"`` in
    #: ``uses``, e.g. their image-level labels) without reading the boxes; at 21,841 classes the
    #: per-class box bits alone are ceil(K/8) = 2,731 bytes per pixel (137 MB per 224 px crop)
    renders_boxes: ClassVar[bool] = False
    #: training stages accepted by ``set_stage`` (the registry test exercises each one)
    STAGES: ClassVar[tuple[str, ...]] = ("default",)
    #: per stage, glob patterns of trainable parameter names that legitimately get no gradient
    #: in that stage (checked by tests/methods/test_registry.py); empty for most methods
    GRAD_FREE: ClassVar[dict[str, tuple[str, ...]]] = {}
    #: auxiliary stages: their val mIoU does not measure what they train (the segmenter it scores
    #: is frozen or untrained), so the driver hands on their *latest* checkpoint, not the best
    #: by val mIoU (:func:`raysemiseg.train.driver.checkpoint_rule`)
    AUX_STAGES: ClassVar[tuple[str, ...]] = ()
    #: ``predict(images, image_labels)`` conditions on given (N, K) multi-hot image labels when they
    #: are passed (TransferNet-GT, DecoupledNet); evaluators pass them only to such methods
    label_conditioned: ClassVar[bool] = False

    def __init__(self, label_space: LabelSpace, model: Any, params: MethodParams | None = None) -> None:
        super().__init__()
        self.label_space = label_space
        self.model_cfg = model
        self.params = params if params is not None else self.Params()
        self.num_classes = label_space.num_classes
        self.ignore_index = label_space.ignore_index

    def compute_losses(self, batch: Batch) -> dict[str, Tensor]:
        """Named scalar loss terms for ``batch``; the loop sums them (per optimizer group)."""
        raise NotImplementedError

    def predict(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) float images -> (N, C, H, W) class logits at input resolution."""
        raise NotImplementedError

    @property
    def eval_with_given_labels(self) -> bool:
        """Whether evaluation passes each row's given image labels to ``predict`` by default: the
        method's ``use_gt_labels`` parameter for label-conditioned methods (TransferNet-GT), else False."""
        return self.label_conditioned and bool(getattr(self.params, "use_gt_labels", False))

    def optimizer_groups(self, lr: float) -> list[OptimizerGroup]:
        """Parameter groups; default: one "main" group with backbone at ``lr`` and heads at 10x
        (DeepLab's classifier learning-rate multiplier)."""
        backbone = [p for n, p in self.named_parameters() if n.startswith("backbone.") and p.requires_grad]
        rest = [p for n, p in self.named_parameters() if not n.startswith("backbone.") and p.requires_grad]
        groups = [{"params": backbone, "lr": lr}] if backbone else []
        groups.append({"params": rest, "lr": lr * 10.0})
        return [OptimizerGroup("main", groups)]

    def set_stage(self, stage: str) -> None:
        """Switch training stage (e.g. "pretrain" / "joint"); methods with stages override."""
        if stage not in self.STAGES:
            raise ValueError(f"method {self.name!r} has no stage {stage!r}; valid: {list(self.STAGES)}")


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method to :data:`METHODS` under ``cls.name``."""
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} registered twice")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    """Look a method class up by name.

    Raises:
        KeyError: listing the valid names.
    """
    import raysemiseg.methods  # noqa: F401  (populates the registry)

    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; valid: {sorted(METHODS)}") from None
