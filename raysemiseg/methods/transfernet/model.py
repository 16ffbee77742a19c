"""TransferNet (Hong, Oh, Lee & Han, "Learning Transferrable Knowledge for Semantic Segmentation
with Deep Convolutional Neural Network", CVPR 2016).

* **Encoder**: the run's backbone (frozen by default, as in the paper); its (N, D, h, w) features
  are flattened to A (M x D, M = h*w) per image.
* **Label-specific attention** (Eq. 2-4): v_l = W_att (W_feat A^T ⊙ W_label y_l) + b, a score per
  location (M,), alpha_l = softmax(v_l). y_l is the one-hot of label l, so W_label y_l is column l
  of W_label (a learned label embedding).
* **Attention classification** (Eq. 5-6): z_l = A^T alpha_l (D,) -> f_cls (two fully connected
  layers) -> softmax over the foreground classes; the attention is trained so that z_l is
  recognised as l. e_cls is the cross-entropy summed over the image's labels.
* **Densified attention + decoder** (Eq. 7-8): s_l = A z_l (M,) = A A^T alpha_l = G alpha_l
  (Appendix A), reshaped to h x w, standardised per map (zero mean, unit variance: a numerical
  choice of this implementation, the paper feeds s_l unscaled), then a deconvolution decoder
  (transposed convolutions, shared by all classes) gives the 2-channel (background, foreground)
  map; e_seg is its 2-class cross-entropy on source (strong) rows.
* **Joint objective** (Eq. 9): e = e_seg + lambda * e_cls.

Stages: ``"attention"`` (attention + f_cls pre-training on e_cls, every row with image labels),
``"joint"`` (Eq. 9: decoder on strong rows, attention on all rows) and ``"default"`` = joint.
Source rows = rows with pixel labels (``is_strong``); target rows = image-level rows.

Inference (Sec. 4.3): with the given labels (TransferNet-GT: ``use_gt_labels`` and
``predict(images, image_labels)``) or with the labels of a separate multi-label classifier
(global average pooling of A + linear, sigmoid BCE ``img_cls`` on every row, trained in both
stages); the per-label maps are merged by :func:`combine_binary_maps` (shared with DecoupledNet).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from raysemiseg.labels import LabelSpace
from raysemiseg.methods.base import Batch, Method, MethodParams, register
from raysemiseg.methods.decoupled.model import init_from_checkpoint
from raysemiseg.methods.decoupled.losses import (
    binary_targets,
    combine_binary_maps,
    identified_labels,
    masked_cross_entropy,
    present_pairs,
)
from raysemiseg.models.backbones import build_backbone


class TransferNetParams(MethodParams):
    """TransferNet knobs."""

    attention_dim: int = Field(256, ge=4, description="d, width of W_feat A and W_label y_l")
    cls_hidden: int = Field(512, ge=4, description="hidden width of f_cls (Eq. 6)")
    decoder_width: int = Field(64, ge=4, description="channels of the deconvolution decoder")
    lambda_cls: float = Field(1.0, ge=0.0, description="lambda of Eq. 9 (weight of e_cls)")
    freeze_encoder: bool = Field(True, description="keep the backbone fixed (the paper's encoder is frozen)")
    use_gt_labels: bool = Field(False, description="TransferNet-GT: evaluation passes the given image labels to predict")
    threshold: float = Field(0.5, gt=0.0, lt=1.0, description="separate classifier's sigmoid threshold")
    fallback_top1: bool = True
    max_pairs: int = Field(64, ge=1, description="cap on (image, label) pairs per batch")
    init_from: str | None = Field(None, description="checkpoint of an earlier stage (e.g. 'attention') to start from")


def attention_weights(A: Tensor, label_emb: Tensor, w_feat: nn.Linear, w_att: nn.Linear) -> Tensor:
    """alpha_l = softmax(W_att (W_feat A ⊙ W_label y_l) + b) (TransferNet Eq. 2-4).

    Args:
        A: (P, M, D) encoder features of each pair's image.
        label_emb: (P, d) W_label y_l of each pair's label.
        w_feat: D -> d; w_att: d -> 1 (its bias is b).

    Returns:
        (P, M) attention, each row sums to 1.
    """
    v = w_att(w_feat(A) * label_emb[:, None, :]).squeeze(-1)
    return torch.softmax(v.float(), dim=1)


def attended_feature(A: Tensor, alpha: Tensor) -> Tensor:
    """z_l = A^T alpha_l (Eq. 5): (P, M, D), (P, M) -> (P, D)."""
    return torch.einsum("pmd,pm->pd", A, alpha.to(A.dtype))


def densified_attention(A: Tensor, z: Tensor) -> Tensor:
    """s_l = A z_l (Eq. 7) = A A^T alpha_l = G alpha_l (Appendix A): (P, M, D), (P, D) -> (P, M)."""
    return torch.einsum("pmd,pd->pm", A, z)


@register
class TransferNet(Method):
    """TransferNet; stages ``"attention"``, ``"joint"`` and ``"default"`` (= joint)."""

    name = "transfernet"
    Params = TransferNetParams
    uses = ("pixel", "image")
    label_conditioned = True
    STAGES: tuple[str, ...] = ("default", "attention", "joint")

    def __init__(self, label_space: LabelSpace, model, params: TransferNetParams | None = None) -> None:
        super().__init__(label_space, model, params)
        if label_space.background_id is None:
            raise ValueError(f"method 'transfernet' needs a label space with a background class; {label_space.name!r} has none")
        p: TransferNetParams = self.params
        self.register_buffer("fg_ids", torch.tensor(label_space.foreground_ids, dtype=torch.long), persistent=False)
        self.bg_id = int(label_space.background_id)
        k_fg = len(label_space.foreground_ids)
        self.backbone = build_backbone(model)
        d_in = self.backbone.out_channels
        self.w_feat = nn.Linear(d_in, p.attention_dim, bias=False)
        self.w_label = nn.Embedding(k_fg, p.attention_dim)  # column l of W_label = W_label y_l
        self.w_att = nn.Linear(p.attention_dim, 1)
        self.f_cls = nn.Sequential(nn.Linear(d_in, p.cls_hidden), nn.ReLU(inplace=True), nn.Linear(p.cls_hidden, k_fg))
        self.img_cls = nn.Linear(d_in, k_fg)
        n_up = int(round(math.log2(self.backbone.output_stride)))
        c = p.decoder_width
        layers: list[nn.Module] = [nn.Conv2d(1, c, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(n_up):
            layers += [nn.ConvTranspose2d(c, c, 4, stride=2, padding=1), nn.ReLU(inplace=True)]
        layers += [nn.Conv2d(c, 2, 1)]
        self.decoder = nn.Sequential(*layers)
        self.stage = "default"
        self.set_stage("default")
        if p.init_from and getattr(model, "pretrained", True):
            init_from_checkpoint(self, p.init_from)

    # ------------------------------------------------------------------ stages
    def set_stage(self, stage: str) -> None:
        """``"attention"``: decoder frozen; ``"joint"``/``"default"``: everything but a frozen encoder.

        Raises:
            ValueError: unknown stage, listing the valid ones.
        """
        super().set_stage(stage)  # validates against STAGES
        self.stage = stage
        self.backbone.requires_grad_(not self.params.freeze_encoder)
        self.decoder.requires_grad_(stage != "attention")
        self.train(self.training)

    def train(self, mode: bool = True) -> "TransferNet":
        """As ``nn.Module.train``; a frozen encoder stays in eval mode."""
        super().train(mode)
        if self.params.freeze_encoder:
            self.backbone.train(False)
        return self

    # ------------------------------------------------------------------ networks
    def encode(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """(N, 3, H, W) -> A (N, M, D) and the feature size (h, w)."""
        if self.params.freeze_encoder:
            with torch.no_grad():
                f = self.backbone(images)
        else:
            f = self.backbone(images)
        h, w = f.shape[-2:]
        return f.flatten(2).transpose(1, 2), (h, w)

    def attend(self, A: Tensor, pair_img: Tensor, pair_cls: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Attention of each (image, label) pair.

        Returns:
            ``(alpha, z, s)``: (P, M) attention, (P, D) attended feature, (P, M) densified attention.
        """
        col = torch.searchsorted(self.fg_ids, pair_cls)
        Ap = A[pair_img]
        alpha = attention_weights(Ap, self.w_label(col), self.w_feat, self.w_att)
        z = attended_feature(Ap, alpha)
        return alpha, z, densified_attention(Ap, z)

    def decode(self, s: Tensor, hw: tuple[int, int], out_size: tuple[int, int]) -> Tensor:
        """(P, M) densified attention -> (P, 2, H, W) figure-ground logits (Eq. 8)."""
        x = s.view(-1, 1, *hw).float()
        x = (x - x.mean(dim=(2, 3), keepdim=True)) / (x.std(dim=(2, 3), keepdim=True, unbiased=False) + 1e-5)
        out = self.decoder(x)
        return F.interpolate(out, size=out_size, mode="bilinear", align_corners=False)

    # ------------------------------------------------------------------ protocol
    def compute_losses(self, batch: Batch) -> dict[str, Tensor]:
        """``cls``: lambda * e_cls (Eq. 6, every row's labels); ``img_cls``: the separate
        classifier's sigmoid CE; ``seg``: e_seg on source (strong) rows (not in ``"attention"``)."""
        p: TransferNetParams = self.params
        A, hw = self.encode(batch.images)
        losses: dict[str, Tensor] = {}
        losses["img_cls"] = F.binary_cross_entropy_with_logits(
            self.img_cls(A.mean(dim=1)).float(), batch.image_labels[:, self.fg_ids].float())
        pair_img, pair_cls = present_pairs(batch.image_labels, self.fg_ids, max_pairs=p.max_pairs)
        if pair_img.numel() == 0:
            raise ValueError(f"transfernet: batch {batch.image_ids[:4]}... has no foreground image labels")
        alpha, z, s = self.attend(A, pair_img, pair_cls)
        target = torch.searchsorted(self.fg_ids, pair_cls)
        e_cls = F.cross_entropy(self.f_cls(z).float(), target)
        if self.stage == "attention":
            losses["cls"] = e_cls
            return losses
        losses["cls"] = p.lambda_cls * e_cls
        strong = batch.is_strong[pair_img]
        if strong.any():
            logits = self.decode(s[strong], hw, tuple(batch.images.shape[-2:]))
            targets = binary_targets(batch.masks, pair_img[strong], pair_cls[strong], self.ignore_index)
            losses["seg"] = masked_cross_entropy(logits, targets, self.ignore_index)
        else:
            losses["seg"] = sum(q.sum() * 0.0 for q in self.decoder.parameters())
        return losses

    def predict(self, images: Tensor, image_labels: Tensor | None = None) -> Tensor:
        """(N, 3, H, W) normalised images -> (N, C, H, W) logits.

        Args:
            image_labels: optional (N, K) multi-hot given labels (TransferNet-GT), used instead of the
                separate classifier's labels when passed; evaluators pass them when
                ``use_gt_labels`` is set or when asked (``raysemiseg eval --given-labels``).
        """
        p: TransferNetParams = self.params
        n, _, h, w = images.shape
        A, hw = self.encode(images)
        if image_labels is not None:
            labels = image_labels
        else:
            labels = identified_labels(self.img_cls(A.mean(dim=1)), self.fg_ids, self.num_classes,
                                       p.threshold, p.fallback_top1)
        pair_img, pair_cls = present_pairs(labels, self.fg_ids)
        if pair_img.numel():
            _, _, s = self.attend(A, pair_img, pair_cls)
            logits = self.decode(s, hw, (h, w))
        else:
            logits = images.new_zeros(0, 2, h, w)
        return combine_binary_maps(logits, pair_img, pair_cls, n, self.num_classes, self.bg_id)

