"""WSSL: weakly- and semi-supervised DeepLab training with online EM (Papandreou et al., ICCV 2015).

Network: any registered backbone + :class:`~raysemiseg.models.heads.LargeFOVHead` (the same
DeepLab-LargeFOV shape as ``strong_only``). Training is Alg. 1 run online, one mini-batch at a
time:

* **E-step** (weak rows): the current network's scores, detached and bilinearly upsampled to the
  crop, go through :func:`raysemiseg.pseudolabel.em.e_step` (the one E-step of the project) with
  the row's image-level labels: EM-Fixed (``b_fg``, ``b_bg``; absent classes unbiased, Eq. 10) or
  EM-Adapt (``rho_fg`` per present foreground class, ``rho_bg``; absent classes suppressed).
  With ``use_boxes`` each foreground class is biased and allowed only inside its own boxes
  (Bbox-EM-Fixed, Sec. 3.3; per-class regions from ``batch.box_bits``, else from the Bbox-Rect
  ``batch.box_masks``); a crop of a boxed image without any box pixel is background, and only
  rows without boxes fall back to the image-level E-step.
* **M-step**: cross-entropy of the (non-detached) scores against those labels and of the strong
  rows against their pixel masks, pooled over all labelled pixels of the mixed batch (Eq. 1;
  semi-supervised, Sec. 3.4: the fixed strong/weak proportion per mini-batch is
  ``data.strong_fraction`` of the run config; ``loss_pooling: per_group`` averages each group
  separately instead).

Target precedence per row (:func:`raysemiseg.methods.wssl.losses.select_targets`):
strong mask > stored pseudo label (``batch.pseudo``, e.g. a Bbox-Rect or Bbox-Seg label store;
Sec. 3.3's "Bbox-Rect"/"Bbox-Seg" are trained this way, without any E-step) > online E-step.
``use_label_store: false`` ignores ``batch.pseudo`` and always runs the E-step on weak rows.

Cross-dataset (Sec. 4.5): ``init_from`` loads a checkpoint trained on another label space and
replaces its classifier (Cross-Pretrain, see :mod:`raysemiseg.methods.wssl.cross`); Cross-Joint
is this same method trained on a store whose label space is the union of the two datasets'
spaces (:func:`raysemiseg.methods.wssl.cross.union_label_space`).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from raysemiseg.labels import LabelSpace
from raysemiseg.methods.base import Batch, MethodParams, register
from raysemiseg.methods.strong_only.model import StrongOnly, StrongOnlyParams
from raysemiseg.methods.wssl.losses import (
    box_regions,
    has_labels,
    masked_cross_entropy,
    select_targets,
    upsample_to,
)


class WsslParams(StrongOnlyParams):
    """Knobs of ``wssl`` (paper defaults, Sec. 3.2 and 4).

    Attributes:
        estep: ``"fixed"`` (EM-Fixed) or ``"adapt"`` (EM-Adapt).
        b_fg, b_bg: EM-Fixed biases (score units) for present foreground classes / background.
        rho_fg, rho_bg: EM-Adapt minimum pixel fractions per present foreground class /
            background.
        fg_share: EM-Adapt foreground targets: ``"per_class"`` (default, Sec. 3.2 and DeepLab's
            adaptive-bias layer: each present foreground class gets at least ``rho_fg``) or
            ``"total"`` (``rho_fg / n_fg`` each).
        suppress_absent: take absent classes (z_l = 0) out of the E-step's argmax; ``None`` = the
            paper's rule: unbiased for EM-Fixed (Eq. 10), suppressed for EM-Adapt.
        use_boxes: Bbox-EM-Fixed: foreground biases only inside the row's boxes.
        weak_weight: weight of the weak rows' cross-entropy relative to the strong rows'.
        loss_pooling: ``"pooled"`` (default, Eq. 1 / Sec. 3.4): one CE over all labelled pixels of
            the mixed batch (sum over strong and weak pixels / their total count), so the per-pixel
            strong:weak weight is 1 : ``weak_weight`` and ``data.strong_fraction`` sets the mix;
            ``"per_group"``: strong and weak CE each averaged over their own pixels, then added.
        use_label_store: train weak rows that have a stored pseudo label on it (skip the E-step).
        init_from: Cross-Pretrain checkpoint (file or Ray checkpoint directory); its classifier
            is replaced, everything else is loaded. Like ImageNet weights it is applied only
            when ``model.pretrained`` is true, so rebuilding a trained run from its own
            checkpoint (``load_method`` builds with ``pretrained: false``) does not read it.
        head_hidden, head_dropout, head_dilation: the LargeFOV head (as ``strong_only``).
    """

    estep: Literal["fixed", "adapt"] = "fixed"
    b_fg: float = 5.0
    b_bg: float = 3.0
    rho_fg: float = Field(0.20, ge=0.0, le=1.0)
    rho_bg: float = Field(0.40, ge=0.0, le=1.0)
    fg_share: Literal["total", "per_class"] = "per_class"
    suppress_absent: bool | None = None
    use_boxes: bool = False
    weak_weight: float = Field(1.0, ge=0.0)
    loss_pooling: Literal["pooled", "per_group"] = "pooled"
    use_label_store: bool = True
    init_from: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "WsslParams":
        self.estep_params()  # the E-step's own checks (EM-Adapt: rho_fg + rho_bg <= 1)
        if self.use_boxes and self.estep != "fixed":
            raise ValueError("use_boxes (Bbox-EM-Fixed) requires estep='fixed'")
        return self

    def estep_params(self):
        """The matching :class:`raysemiseg.pseudolabel.em.EStepParams`."""
        from raysemiseg.pseudolabel.em import EStepParams

        return EStepParams(mode=self.estep, b_fg=self.b_fg, b_bg=self.b_bg,
                           rho_fg=self.rho_fg, rho_bg=self.rho_bg, fg_share=self.fg_share,
                           suppress_absent=self.suppress_absent)


@register
class WsslEM(StrongOnly):
    """``wssl``: DeepLab-LargeFOV trained with online EM on weak rows + CE on strong rows.

    Args:
        label_space: the run's label space (K classes).
        model: :class:`raysemiseg.config.ModelConfig`.
        params: :class:`WsslParams`.

    Raises:
        FileNotFoundError / ValueError: from Cross-Pretrain loading (``init_from``).
    """

    name: ClassVar[str] = "wssl"
    Params: ClassVar[type[MethodParams]] = WsslParams
    uses: ClassVar[tuple[str, ...]] = ("pixel", "box", "image")
    renders_boxes: ClassVar[bool] = True   # Bbox-Rect / Bbox-EM-Fixed regions (Sec. 3.2-3.3)

    def __init__(self, label_space: LabelSpace, model: Any, params: WsslParams | None = None) -> None:
        super().__init__(label_space, model, params)  # backbone + LargeFOVHead (strong_only's network)
        self._estep = self.params.estep_params()
        if self.params.init_from and getattr(model, "pretrained", True):
            from raysemiseg.methods.wssl.cross import load_cross_pretrain

            load_cross_pretrain(self, self.params.init_from)

    def e_step(self, logits: Tensor, batch: Batch, rows: Tensor) -> Tensor:
        """Online E-step (Alg. 1) for ``rows`` of the batch.

        Args:
            logits: (N, K, H, W) scores at label resolution (detached here).
            batch: the mini-batch (image labels, box masks, valid pixels).
            rows: (N,) bool rows to label.

        Returns:
            (N, H, W) int64 labels; ``ignore_index`` outside ``rows`` and on crop padding
            (``batch.valid`` False), which EM-Adapt's pixel fractions do not count either.
        """
        from raysemiseg.pseudolabel.em import e_step

        n, _, h, w = logits.shape
        out = torch.full((n, h, w), self.ignore_index, dtype=torch.long, device=logits.device)
        if not bool(rows.any()):
            return out
        region = None
        if self.params.use_boxes and batch.box_masks is not None:
            bits = None if batch.box_bits is None else batch.box_bits[rows]
            region = box_regions(batch.box_masks[rows], self.num_classes, self.ignore_index,
                                 self.label_space.background_id, box_bits=bits)
        out[rows] = e_step(logits[rows].detach(), batch.image_labels[rows] > 0.5, self._estep,
                           background_index=self.label_space.background_id, region=region,
                           ignore_index=self.ignore_index,
                           valid=None if batch.valid is None else batch.valid[rows])
        return out

    def compute_losses(self, batch: Batch) -> dict[str, Tensor]:
        """``{"strong_ce", "weak_ce"}``: CE on strong rows' masks and (times ``weak_weight``) CE on
        weak rows' stored pseudo labels or online E-step labels (precedence in the module doc).

        With ``loss_pooling="pooled"`` both terms are sums divided by the number of labelled pixels
        of the whole batch, so ``strong_ce + weak_ce`` is the pooled mean of Eq. 1 (for
        ``weak_weight = 1``); with ``"per_group"`` each is its own group's mean."""
        size = tuple(batch.masks.shape[-2:])
        logits = upsample_to(self.logits(batch.images), size)
        strong = batch.is_strong.to(torch.bool)
        needs_estep = ~strong
        if self.params.use_label_store:
            needs_estep = needs_estep & ~has_labels(batch.pseudo, self.ignore_index)
        est = self.e_step(logits, batch, needs_estep)
        targets, _ = select_targets(batch.masks, batch.pseudo, strong, est, self.ignore_index,
                                    self.params.use_label_store)
        targets = targets.masked_fill(~batch.valid_mask(), self.ignore_index)   # crop padding: no loss
        weak_t = targets.clone()
        weak_t[strong] = self.ignore_index
        strong_t = targets.clone()
        strong_t[~strong] = self.ignore_index
        norm = (targets != self.ignore_index).sum() if self.params.loss_pooling == "pooled" else None
        return {
            "strong_ce": masked_cross_entropy(logits, strong_t, self.ignore_index, norm),
            "weak_ce": self.params.weak_weight * masked_cross_entropy(logits, weak_t, self.ignore_index, norm),
        }


__all__ = ["WsslEM", "WsslParams"]
