"""CAM classifier (Zhou et al., CVPR 2016): backbone -> global average pooling -> 1x1 classifier.

Trained with the shared loop on image-level labels: multi-label sigmoid binary cross-entropy over
the foreground classes (``batch.image_labels`` without the background column), every row counts
(pixel, box and image supervision all carry image-level labels). Its classifier weights turn the
backbone's features into class activation maps (:func:`raysemiseg.pseudolabel.cam.class_activation_maps`).

``predict`` returns dense logits so the shared evaluation can score the classifier as a segmenter:
foreground channels are the 1x1 classifier applied at every position (the un-normalised CAM plus
bias), the background channel is the constant ``params.bg_logit`` (a pixel is background where no
class score exceeds it). That map is (N, K, H, W): 16 GB fp32 for one 500x375 image at K = 21,841.
The shared evaluation therefore calls :meth:`CamClassifier.predict_classes` instead, which builds
dense maps only for a few candidate classes per batch (the given labels, or the ``predict_top_k``
best by image score) and never a (N, K, h, w) tensor at any resolution; the pseudo-label pipeline's
``scores`` stage reads the low-resolution :meth:`CamClassifier.logits`.
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple, Sequence

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
        predict_top_k: candidate foreground classes per image in :meth:`CamClassifier.predict_classes`
            (the best by image score) when no labels are given. With ``predict_top_k >= K - 1`` the
            label map equals ``predict(images).argmax(1)``; smaller values drop classes whose
            image score is outside the image's top k (their pixels go to the best candidate).
    """

    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    bg_logit: float = 0.0
    predict_top_k: int = Field(20, ge=1)


class CandidateLogits(NamedTuple):
    """Dense logits over a batch's candidate classes (:meth:`CamClassifier.predict_classes`).

    Attributes:
        ids: (P,) int64 label-space ids of the candidate classes, ascending (background first
            when the space has one); shared by the batch.
        logits: (N, P, H, W) float logits at input resolution; ``logits[:, j]`` scores class
            ``ids[j]`` (foreground: classifier at each position; background: ``bg_logit``).
        image_logits: (N, K_fg) sigmoid logits of the image-level classifier, column r = label
            id ``fg_ids[r]`` (an image is predicted to hold class ``fg_ids[r]`` where > 0).
        fg_ids: (K_fg,) int64 label ids of the ``image_logits`` columns (the model's buffer).
    """

    ids: Tensor
    logits: Tensor
    image_logits: Tensor
    fg_ids: Tensor

    def labels(self) -> Tensor:
        """(N, H, W) int64 label-space ids: ``ids[logits.argmax(1)]``."""
        return self.ids[self.logits.argmax(1)]

    def present(self, i: int = 0) -> Tensor:
        """(L,) int64 foreground ids image ``i`` is predicted to hold (image logit > 0, sigmoid > 0.5)."""
        return self.fg_ids[self.image_logits[i].float() > 0]


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

    def logits(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) -> (N, K, h, w) dense logits at feature resolution (``predict`` before the
        upsampling; the pseudo-label ``scores`` stage picks the present rows of it, then upsamples).
        Still O(K h w): prefer :meth:`predict_classes` or :meth:`cams` at large K."""
        dense = self.classifier(self.backbone(images))
        n, _, h, w = dense.shape
        out = dense.new_full((n, self.num_classes, h, w), float(self.params.bg_logit))  # type: ignore[attr-defined]
        out[:, self.fg_ids] = dense
        return out

    def predict_classes(self, images: Tensor, image_labels: Tensor | None = None,
                        top_k: int | None = None) -> CandidateLogits:
        """Dense logits over a few candidate classes, without ever building all K maps.

        Candidates (one set for the batch, ascending label ids): background (when the label space
        has one) plus, for every image, its given foreground labels (``image_labels``) or else its
        ``top_k`` foreground classes by image score. P <= 1 + N * top_k (or 1 + the given labels).
        Cost: the backbone, one (N, K_fg) image-score product, then (N, P, h, w) maps upsampled to
        (N, P, H, W): O(K + P H W) memory per image instead of O(K H W).

        Args:
            images: (N, 3, H, W) normalised.
            image_labels: optional (N, K) multi-hot of given image labels (background column
                ignored); an image without any foreground label keeps only background.
            top_k: candidates per image without given labels (default ``params.predict_top_k``),
                clamped to K_fg.

        Returns:
            :class:`CandidateLogits` (ids (P,), logits (N, P, H, W), image_logits (N, K_fg));
            ``.labels()`` is the (N, H, W) label map, ``.present(i)`` image i's predicted labels.

        Raises:
            ValueError: ``image_labels`` is not (N, K), or ``top_k < 1``.
        """
        feats = self.backbone(images)                                        # (N, C, h, w)
        n = feats.shape[0]
        w = self.classifier.weight.flatten(1)                                # (K_fg, C)
        b = self.classifier.bias
        image_logits = feats.mean(dim=(2, 3)) @ w.t() + b                    # (N, K_fg): GAP then 1x1
        if image_labels is not None:
            if tuple(image_labels.shape) != (n, self.num_classes):
                raise ValueError(f"image_labels must be (N, K) = ({n}, {self.num_classes}), "
                                 f"got {tuple(image_labels.shape)}")
            rows = torch.nonzero(image_labels[:, self.fg_ids] > 0)[:, 1]
        else:
            k = int(top_k if top_k is not None else self.params.predict_top_k)  # type: ignore[attr-defined]
            if k < 1:
                raise ValueError(f"top_k must be >= 1, got {k}")
            rows = image_logits.topk(min(k, w.shape[0]), dim=1).indices.reshape(-1)
        rows = torch.unique(rows)                                            # (P_fg,) ascending
        dense = torch.einsum("nchw,pc->nphw", feats, w[rows]) + b[rows].view(1, -1, 1, 1)
        fg = self.fg_ids[rows]
        if self.background_id is not None:
            bg = dense.new_full((n, 1, *dense.shape[-2:]), float(self.params.bg_logit))  # type: ignore[attr-defined]
            ids = torch.cat([fg.new_tensor([self.background_id]), fg])
            dense = torch.cat([bg, dense], dim=1)
            order = torch.argsort(ids)
            ids, dense = ids[order], dense[:, order]
        else:
            ids = fg
        logits = F.interpolate(dense, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return CandidateLogits(ids, logits, image_logits, self.fg_ids)

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
