"""CAM classifier (Zhou et al., CVPR 2016): backbone -> global average pooling -> 1x1 classifier.

Trained with the shared loop on image-level labels: multi-label sigmoid binary cross-entropy over
the foreground classes (``batch.image_labels`` without the background column), every row counts
(pixel, box and image supervision all carry image-level labels). Its classifier weights turn the
backbone's features into class activation maps (:func:`raysemiseg.pseudolabel.cam.class_activation_maps`).

``predict`` returns dense logits so the shared evaluation can score the classifier as a segmenter:
foreground channels are the 1x1 classifier applied at every position (the un-normalised CAM plus
bias), the background channel is the constant ``params.bg_logit`` (a pixel is background where no
class score exceeds it).
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from raysemiseg.labels import LabelSpace
from raysemiseg.methods.base import Batch, Method, MethodParams, register
from raysemiseg.models.backbones import build_backbone


class CamClassifierParams(MethodParams):
    """Knobs of ``cam_classifier``.

    Attributes:
        dropout: dropout on the pooled features before the classifier.
        bg_logit: constant background logit used by ``predict``.
    """

    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    bg_logit: float = 0.0


@register
class CamClassifier(Method):
    """Backbone + GAP + 1x1 classifier over the foreground classes; loss = sigmoid BCE.

    Args:
        label_space: K classes; the classifier has one output per foreground class
            (``label_space.foreground_ids``), row r <-> label id ``fg_ids[r]``.
        model: :class:`raysemiseg.config.ModelConfig`.
        params: :class:`CamClassifierParams`.
    """

    name: ClassVar[str] = "cam_classifier"
    Params: ClassVar[type[MethodParams]] = CamClassifierParams
    uses: ClassVar[tuple[str, ...]] = ("pixel", "box", "image")

    def __init__(self, label_space: LabelSpace, model: Any, params: CamClassifierParams | None = None) -> None:
        super().__init__(label_space, model, params)
        p: CamClassifierParams = self.params  # type: ignore[assignment]
        self.backbone = build_backbone(model)
        fg = torch.tensor(label_space.foreground_ids, dtype=torch.long)
        self.register_buffer("fg_ids", fg, persistent=False)
        self.background_id = label_space.background_id
        self.dropout = nn.Dropout(p.dropout)
        self.classifier = nn.Conv2d(self.backbone.out_channels, len(fg), kernel_size=1)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def class_logits(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(N, 3, H, W) normalised -> ((N, K_fg) image logits, (N, C, h, w) features)."""
        feats = self.backbone(images)
        pooled = self.dropout(feats.mean(dim=(2, 3), keepdim=True))
        return self.classifier(pooled).flatten(1), feats

    def compute_losses(self, batch: Batch) -> dict[str, Tensor]:
        """``{"bce": mean sigmoid BCE over (rows x foreground classes)}``."""
        logits, _ = self.class_logits(batch.images)
        target = batch.image_labels[:, self.fg_ids].to(logits.dtype)
        return {"bce": F.binary_cross_entropy_with_logits(logits.float(), target.float())}

    def predict(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) -> (N, K, H, W) dense logits (foreground: classifier at each position;
        background: ``bg_logit``), bilinearly upsampled to the input size."""
        dense = self.classifier(self.backbone(images))
        n, _, h, w = dense.shape
        out = dense.new_full((n, self.num_classes, h, w), float(self.params.bg_logit))  # type: ignore[attr-defined]
        out[:, self.fg_ids] = dense
        return F.interpolate(out, size=images.shape[-2:], mode="bilinear", align_corners=False)

    def rows_of(self, label_ids: Sequence[int] | Tensor) -> Tensor:
        """Classifier rows of foreground label ids (O(P) via binary search on the sorted ids).

        Raises:
            ValueError: an id is not a foreground class of the label space.
        """
        ids = torch.as_tensor(label_ids, dtype=torch.long, device=self.fg_ids.device).reshape(-1)
        pos = torch.searchsorted(self.fg_ids, ids).clamp(max=len(self.fg_ids) - 1)
        if ids.numel() and not bool((self.fg_ids[pos] == ids).all()):
            raise ValueError(f"label ids {ids.tolist()} include a non-foreground class of {self.label_space.name!r}")
        return pos

    @torch.no_grad()
    def cams(self, images: Tensor, present: Sequence[Sequence[int]], out_size: tuple[int, int] | None = None) -> list[Tensor]:
        """CAMs in [0, 1] of each image's present foreground labels (Zhou et al. 2016).

        Args:
            images: (N, 3, H, W) normalised.
            present: per image, its foreground label ids (P_i).
            out_size: (H, W) output size (default: the input size).

        Returns:
            list of (P_i, H, W) float tensors in [0, 1].
        """
        from raysemiseg.pseudolabel.cam import class_activation_maps

        feats = self.backbone(images)
        rows = [self.rows_of(p) for p in present]
        return class_activation_maps(feats, self.classifier.weight, rows, out_size or tuple(images.shape[-2:]))
