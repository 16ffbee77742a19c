"""The strong-only baseline: DeepLab-LargeFOV (Chen et al. 2015) trained with per-pixel
cross-entropy on the strong (pixel-labelled) rows of each batch; weak rows are ignored.

This is the lower bound every semi/weakly-supervised method is compared against (WSSL Table 1,
"strong" rows with the same number of pixel-labelled images).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from raysemiseg.labels import LabelSpace
from raysemiseg.methods.base import Batch, Method, MethodParams, register
from raysemiseg.methods.losses import masked_cross_entropy
from raysemiseg.models.backbones import build_backbone
from raysemiseg.models.heads import LargeFOVHead


class StrongOnlyParams(MethodParams):
    """Knobs of ``strong_only`` (``method.params`` in the run config)."""

    head_hidden: int = Field(1024, ge=1, description="fc6/fc7 width (1024 in DeepLab-LargeFOV; 256 for CPU)")
    head_dropout: float = Field(0.5, ge=0.0, lt=1.0, description="dropout after fc6 and fc7")
    head_dilation: int = Field(12, ge=1, description="fc6 dilation (12 = LargeFOV at output stride 8)")


@register
class StrongOnly(Method):
    """Backbone + :class:`LargeFOVHead`; loss = CE(ignore_index) over strong rows' masks.

    Args:
        label_space: the run's label space (K = ``num_classes``, ``ignore_index``).
        model: :class:`raysemiseg.config.ModelConfig` (backbone, pretrained, output stride).
        params: :class:`StrongOnlyParams`.
    """

    name: ClassVar[str] = "strong_only"
    Params: ClassVar[type[MethodParams]] = StrongOnlyParams
    uses: ClassVar[tuple[str, ...]] = ("pixel",)

    def __init__(self, label_space: LabelSpace, model: Any, params: StrongOnlyParams | None = None) -> None:
        super().__init__(label_space, model, params)
        p: StrongOnlyParams = self.params  # type: ignore[assignment]
        self.backbone = build_backbone(model)
        self.head = LargeFOVHead(self.backbone.out_channels, self.num_classes, hidden=p.head_hidden,
                                 dilation=p.head_dilation, dropout=p.head_dropout)

    def logits(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) normalised images -> (N, K, ceil(H/os), ceil(W/os)) logits."""
        return self.head(self.backbone(images))

    def predict(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) -> (N, K, H, W) logits, bilinearly upsampled (align_corners=False)."""
        return F.interpolate(self.logits(images), size=images.shape[-2:], mode="bilinear", align_corners=False)

    def compute_losses(self, batch: Batch) -> dict[str, Tensor]:
        """``{"ce": mean CE over the valid pixels of the strong rows}``.

        Logits are upsampled to the mask size before the loss (torchvision references style,
        rather than DeepLab's label subsampling). Only strong rows are forwarded; a batch with no
        strong row (or no valid pixel) forwards all rows and returns an exact 0 that still has a
        ``grad_fn``, so every parameter gets a (zero) gradient and DDP workers stay in step.
        """
        strong = batch.is_strong.bool()
        if bool(strong.any()):
            images, target = batch.images[strong], batch.masks[strong]
        else:
            images = batch.images
            target = torch.full_like(batch.masks, self.ignore_index)
        return {"ce": masked_cross_entropy(self.logits(images), target, self.ignore_index)}
