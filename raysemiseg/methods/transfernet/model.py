"""TransferNet (Hong, Oh, Lee & Han, "Learning Transferrable Knowledge for Semantic Segmentation
with Deep Convolutional Neural Network", CVPR 2016).

* **Encoder**: the run's backbone (frozen by default, as in the paper); its (N, D, h, w) features
  are flattened to A (M x D, M = h*w) per image.
* **Label-specific attention** (Eq. 2-4): v_l = W_att (W_feat A ⊙ W_label y_l) + b,
  alpha_l = softmax(v_l) (Eq. 3). y_l is the one-hot of label l, so W_label y_l is column l of
  W_label (a learned label embedding, d wide).

  - ``attention: global`` (default, the paper's Eq. 4): W_feat in R^{d x MD} projects the whole
    flattened map vec(A) to d values, W_att in R^{M x d} maps the label-gated code back to one
    score per location, b in R^M is a per-location prior (the softmax cancels only a constant
    shift, not a per-location one). M is fixed: the attention works on the grid
    ``attention_grid`` x ``attention_grid`` (default 14 = a 224 px crop at output stride 16).
    Features of another size (other crops, whole validation images) are resized bilinearly
    (antialiased when shrinking) to that grid for the attention only: alpha and
    z_l = A_grid^T alpha_l are computed on the grid, the densified attention s_l = A z_l (Eq. 7)
    on the image's own feature map, so the decoder sees the image at its own resolution.
  - ``attention: local`` (an option, not the paper's): a per-location bilinear score
    v_m = w_att^T (W_feat A_m ⊙ W_label y_l) + b_m with W_feat in R^{d x D}, w_att in R^d, and the
    same per-location bias b on the grid.
* **Attention classification** (Eq. 5-6): z_l = A^T alpha_l (D,) -> f_cls (two fully connected
  layers) -> softmax over the foreground classes; e_cls is the mean cross-entropy over the pairs.
* **Densified attention + decoder** (Eq. 7-8): s_l = A z_l (M,) = A A^T alpha_l = G alpha_l
  (Appendix A, exact on the attention grid), reshaped to h x w, standardised per map (zero mean,
  unit variance: a numerical choice of this implementation, the paper feeds s_l unscaled), then a
  deconvolution decoder shared by all classes (DeconvNet style, Sec. 4.3): 3x3 conv + BatchNorm +
  ReLU twice, then learned 2x transposed convolutions (4x4, stride 2) + BatchNorm + ReLU down to
  ``decoder_stride``, a 1x1 convolution to the 2-channel (background, foreground) map, bilinear
  resize to the input. The paper's decoder unpools with the encoder's pooling switches; the
  EfficientNet/ResNet encoders here downsample with strided convolutions and have no max-pools,
  so there are no switches to unpool and learned deconvolutions take their place. Convolutions are
  Kaiming-normal initialised, BatchNorm weight 1 / bias 0, the output layer N(0, 1/fan_in)
  (:func:`raysemiseg.methods.decoupled.model.init_decoder_`).
  e_seg is the decoder's 2-class cross-entropy on source (strong) rows.
* **Joint objective** (Eq. 9): e = e_cls + lambda * e_seg (``lambda_seg``; lambda weights the
  segmentation term). e_seg also trains the attention (W_feat, W_label, W_att, b) through
  s_l = A A^T alpha_l.

Stages: ``"attention"`` (attention + f_cls pre-training on e_cls, every row with image labels),
``"joint"`` (Eq. 9: decoder on strong rows, attention on all rows) and ``"default"`` = joint.
Source rows = rows with pixel labels (``is_strong``); target rows = image-level rows. Rows
without a foreground label give no pair; a batch without any gives zero losses that still reach
every trainable parameter.

Optimisation (Sec. 6.1: Adam, lr 5e-4): ``optimizer_groups`` gives one optimizer of kind
``optimizer`` (default Adam) with the attention, f_cls, the separate classifier and the decoder
at ``optim.lr * head_lr_mult`` (default 5: the paper's 5e-4 at the configs' ``optim.lr`` 1e-4)
and an unfrozen encoder at ``optim.lr * backbone_lr_mult``.

Inference (Sec. 4.3): with the given labels (TransferNet-GT: ``use_gt_labels`` and
``predict(images, image_labels)``) or with the labels of a separate multi-label classifier
(global average pooling of A + linear, sigmoid BCE ``img_cls`` on every row, trained in both
stages); the per-label maps are merged by :func:`combine_binary_maps` (shared with DecoupledNet).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from raysemiseg.labels import LabelSpace
from raysemiseg.methods.base import Batch, Method, MethodParams, OptimizerGroup, register
from raysemiseg.methods.decoupled.losses import (
    binary_targets,
    combine_binary_maps,
    identified_labels,
    masked_cross_entropy,
    present_pairs,
)
from raysemiseg.methods.decoupled.model import conv_bn_relu, init_decoder_, init_from_checkpoint
from raysemiseg.models.backbones import build_backbone


class TransferNetParams(MethodParams):
    """TransferNet knobs."""

    attention: Literal["global", "local"] = Field(
        "global", description="Eq. 4 global projection (W_feat d x MD, W_att M x d) | per-location option")
    attention_grid: int = Field(14, ge=1, description="side of the fixed attention grid (M = grid^2)")
    attention_dim: int = Field(128, ge=4, description="d, width of W_feat A and W_label y_l")
    cls_hidden: int = Field(512, ge=4, description="hidden width of f_cls (Eq. 6)")
    decoder_width: int = Field(64, ge=4, description="channels of the decoder's first layers")
    decoder_stride: int = Field(4, ge=1, description="stride of the decoder output before the bilinear resize")
    lambda_seg: float = Field(1.0, ge=0.0, description="lambda of Eq. 9, e = e_cls + lambda e_seg")
    freeze_encoder: bool = Field(True, description="keep the backbone fixed (the paper's encoder is frozen)")
    use_gt_labels: bool = Field(False, description="TransferNet-GT: evaluation passes the given image labels to predict")
    threshold: float = Field(0.5, gt=0.0, lt=1.0, description="separate classifier's sigmoid threshold")
    fallback_top1: bool = True
    max_pairs: int = Field(64, ge=1, description="cap on (image, label) pairs per batch")
    optimizer: Literal["adam", "adamw", "sgd"] | None = Field(
        "adam", description="optimizer kind of the method's group (paper: Adam); None = the run's optim.optimizer")
    head_lr_mult: float = Field(5.0, gt=0.0, description="attention + classifiers + decoder lr = optim.lr * this")
    backbone_lr_mult: float = Field(1.0, gt=0.0, description="encoder lr = optim.lr * this (when not frozen)")
    init_from: str | None = Field(None, description="checkpoint of an earlier stage (e.g. 'attention') to start from")

    @model_validator(mode="after")
    def _check_stride(self) -> "TransferNetParams":
        if self.decoder_stride & (self.decoder_stride - 1):
            raise ValueError(f"decoder_stride must be a power of two, got {self.decoder_stride}")
        return self


def attention_logits(A: Tensor, label_emb: Tensor, w_feat: Tensor, w_att: Tensor, b: Tensor,
                     mode: str = "global") -> Tensor:
    """v_l = W_att (W_feat A ⊙ W_label y_l) + b (TransferNet Eq. 4), before the softmax.

    Args:
        A: (P, M, D) encoder features of each pair's image on the attention grid.
        label_emb: (P, d) W_label y_l of each pair's label.
        w_feat: ``global``: (d, M*D), applied to vec(A) (row-major: location-major, then channel);
            ``local``: (d, D), applied at each location.
        w_att: ``global``: (M, d); ``local``: (d,).
        b: (M,) per-location bias.
        mode: "global" (the paper's form) or "local".

    Returns:
        (P, M) float scores.

    Raises:
        ValueError: unknown mode or shapes that do not fit.
    """
    p, m, d_in = A.shape
    if b.shape != (m,):
        raise ValueError(f"bias b has shape {tuple(b.shape)}, expected ({m},)")
    if mode == "global":
        if w_feat.shape[1] != m * d_in or w_att.shape[0] != m:
            raise ValueError(f"global attention expects W_feat (d, {m * d_in}) and W_att ({m}, d); "
                             f"got {tuple(w_feat.shape)}, {tuple(w_att.shape)}")
        u = A.reshape(p, m * d_in) @ w_feat.t()                       # (P, d) = W_feat vec(A)
        return (u * label_emb) @ w_att.t() + b                        # (P, M)
    if mode == "local":
        return ((A @ w_feat.t()) * label_emb[:, None, :]) @ w_att + b
    raise ValueError(f"unknown attention mode {mode!r}; valid: ['global', 'local']")


def attention_weights(A: Tensor, label_emb: Tensor, w_feat: Tensor, w_att: Tensor, b: Tensor,
                      mode: str = "global") -> Tensor:
    """alpha_l = softmax(v_l) (TransferNet Eq. 3) of :func:`attention_logits`: (P, M), rows sum to 1."""
    return torch.softmax(attention_logits(A, label_emb, w_feat, w_att, b, mode).float(), dim=1)


def attended_feature(A: Tensor, alpha: Tensor) -> Tensor:
    """z_l = A^T alpha_l (Eq. 5): (P, M, D), (P, M) -> (P, D)."""
    return torch.einsum("pmd,pm->pd", A, alpha.to(A.dtype))


def densified_attention(A: Tensor, z: Tensor) -> Tensor:
    """s_l = A z_l (Eq. 7) = A A^T alpha_l = G alpha_l (Appendix A): (P, M, D), (P, D) -> (P, M)."""
    return torch.einsum("pmd,pd->pm", A, z)


def to_grid(f: Tensor, grid: int) -> Tensor:
    """(N, D, h, w) features -> (N, D, grid, grid): unchanged when already that size, else
    bilinear (align_corners False, antialiased when shrinking)."""
    if tuple(f.shape[-2:]) == (grid, grid):
        return f
    return F.interpolate(f, size=(grid, grid), mode="bilinear", align_corners=False,
                         antialias=min(f.shape[-2:]) > grid)


@register
class TransferNet(Method):
    """TransferNet; stages ``"attention"``, ``"joint"`` and ``"default"`` (= joint)."""

    name = "transfernet"
    Params = TransferNetParams
    uses = ("pixel", "image")
    label_conditioned = True
    STAGES: tuple[str, ...] = ("default", "attention", "joint")
    #: the attention stage's val mIoU scores an untrained decoder: hand on its latest checkpoint
    AUX_STAGES: tuple[str, ...] = ("attention",)

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
        m0, d = p.attention_grid ** 2, p.attention_dim
        fan = m0 * d_in if p.attention == "global" else d_in
        # zero-mean Gaussians scaled so that W_feat vec(A) has about A's mean square and v about 1x
        self.w_feat = nn.Parameter(torch.randn(d, fan) / math.sqrt(fan))
        self.w_label = nn.Embedding(k_fg, d)  # column l of W_label = W_label y_l, N(0, 1)
        self.w_att = nn.Parameter(torch.randn(m0, d) / math.sqrt(d) if p.attention == "global"
                                  else torch.randn(d) / math.sqrt(d))
        self.att_bias = nn.Parameter(torch.zeros(m0))  # b in R^M
        self.f_cls = nn.Sequential(nn.Linear(d_in, p.cls_hidden), nn.ReLU(inplace=True), nn.Linear(p.cls_hidden, k_fg))
        self.img_cls = nn.Linear(d_in, k_fg)
        os_ = int(self.backbone.output_stride)
        if p.decoder_stride > os_:
            raise ValueError(f"transfernet: decoder_stride {p.decoder_stride} > the backbone's output stride {os_}")
        n_up = int(round(math.log2(os_ // p.decoder_stride)))
        c = p.decoder_width
        ch = [c] + [max(c // 2 ** (i + 1), 8) for i in range(n_up)]
        layers: list[nn.Module] = [conv_bn_relu(nn.Conv2d(1, c, 3, padding=1, bias=False), c),
                                   conv_bn_relu(nn.Conv2d(c, c, 3, padding=1, bias=False), c)]
        layers += [conv_bn_relu(nn.ConvTranspose2d(ch[i], ch[i + 1], 4, stride=2, padding=1, bias=False), ch[i + 1])
                   for i in range(n_up)]
        last = nn.Conv2d(ch[-1], 2, 1)
        self.decoder = nn.Sequential(*layers, last)
        init_decoder_([self.decoder], last=last)
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

    def _attention_params(self) -> list[nn.Parameter]:
        return [self.w_feat, self.w_label.weight, self.w_att, self.att_bias]

    def optimizer_groups(self, lr: float) -> list[OptimizerGroup]:
        """One "main" optimizer of kind ``params.optimizer`` (default Adam, the paper's): the
        encoder (when trainable) at ``lr * backbone_lr_mult``; the attention (W_feat, W_label,
        W_att, b) and, in a second parameter group at the same ``lr * head_lr_mult``, the
        classifiers and the decoder. The attention's own group: its parameters sit behind a
        softmax over M locations, so their raw gradients are ~1/M of the heads' (Adam's
        per-parameter normalisation makes the scale irrelevant to the update)."""
        p: TransferNetParams = self.params
        backbone = [q for q in self.backbone.parameters() if q.requires_grad]
        attention = [q for q in self._attention_params() if q.requires_grad]
        ids = {id(q) for q in self.backbone.parameters()} | {id(q) for q in attention}
        rest = [q for q in self.parameters() if q.requires_grad and id(q) not in ids]
        groups = [{"params": backbone, "lr": lr * p.backbone_lr_mult}] if backbone else []
        groups += [{"params": attention, "lr": lr * p.head_lr_mult}, {"params": rest, "lr": lr * p.head_lr_mult}]
        return [OptimizerGroup("main", [g for g in groups if g["params"]], optimizer=p.optimizer)]

    # ------------------------------------------------------------------ networks
    def encode(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """(N, 3, H, W) -> A (N, M, D) on the image's own feature grid and its size (h, w)."""
        if self.params.freeze_encoder:
            with torch.no_grad():
                f = self.backbone(images)
        else:
            f = self.backbone(images)
        h, w = f.shape[-2:]
        return f.flatten(2).transpose(1, 2), (h, w)

    def attend(self, A: Tensor, hw: tuple[int, int], pair_img: Tensor, pair_cls: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Attention of each (image, label) pair.

        Args:
            A: (N, M, D) from :meth:`encode`, ``hw`` its grid (h, w).
            pair_img, pair_cls: (P,) rows and label-space class ids.

        Returns:
            ``(alpha, z, s)``: (P, grid^2) attention on the attention grid, (P, D) attended feature
            z = A_grid^T alpha, (P, h*w) densified attention s = A z on the image's own grid.
        """
        p: TransferNetParams = self.params
        col = torch.searchsorted(self.fg_ids, pair_cls)
        Ap = A[pair_img]
        g = p.attention_grid
        Ag = to_grid(Ap.transpose(1, 2).reshape(Ap.shape[0], Ap.shape[2], *hw), g).flatten(2).transpose(1, 2)
        alpha = attention_weights(Ag, self.w_label(col), self.w_feat, self.w_att, self.att_bias, p.attention)
        z = attended_feature(Ag, alpha)
        return alpha, z, densified_attention(Ap, z)

    def decode(self, s: Tensor, hw: tuple[int, int], out_size: tuple[int, int]) -> Tensor:
        """(P, M) densified attention -> (P, 2, H, W) figure-ground logits (Eq. 8)."""
        x = s.view(-1, 1, *hw).float()
        x = (x - x.mean(dim=(2, 3), keepdim=True)) / (x.std(dim=(2, 3), keepdim=True, unbiased=False) + 1e-5)
        out = self.decoder(x)
        return F.interpolate(out, size=out_size, mode="bilinear", align_corners=False)

    def _zero(self) -> Tensor:
        """An exact 0 connected to every trainable parameter (batches without pairs)."""
        return sum(q.sum() * 0.0 for q in self.parameters() if q.requires_grad)

    # ------------------------------------------------------------------ protocol
    def compute_losses(self, batch: Batch) -> dict[str, Tensor]:
        """``cls``: e_cls (Eq. 6, every row's labels); ``img_cls``: the separate classifier's
        sigmoid CE; ``seg``: lambda * e_seg (Eq. 8-9) on source (strong) rows (not in
        ``"attention"``). Rows without a foreground label give no pair; without any pair
        ``cls``/``seg`` are zeros that keep a gradient path."""
        p: TransferNetParams = self.params
        A, hw = self.encode(batch.images)
        losses: dict[str, Tensor] = {}
        losses["img_cls"] = F.binary_cross_entropy_with_logits(
            self.img_cls(A.mean(dim=1)).float(), batch.image_labels[:, self.fg_ids].float())
        pair_img, pair_cls = present_pairs(batch.image_labels, self.fg_ids, max_pairs=p.max_pairs)
        if pair_img.numel() == 0:
            losses["cls"] = self._zero()
            if self.stage != "attention":
                losses["seg"] = self._zero()
            return losses
        alpha, z, s = self.attend(A, hw, pair_img, pair_cls)
        target = torch.searchsorted(self.fg_ids, pair_cls)
        losses["cls"] = F.cross_entropy(self.f_cls(z).float(), target)
        if self.stage == "attention":
            return losses
        strong = batch.is_strong[pair_img]
        if strong.any():
            logits = self.decode(s[strong], hw, tuple(batch.images.shape[-2:]))
            targets = binary_targets(batch.masks, pair_img[strong], pair_cls[strong], self.ignore_index)
            losses["seg"] = p.lambda_seg * masked_cross_entropy(logits, targets, self.ignore_index)
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
            _, _, s = self.attend(A, hw, pair_img, pair_cls)
            logits = self.decode(s, hw, (h, w))
        else:
            logits = images.new_zeros(0, 2, h, w)
        return combine_binary_maps(logits, pair_img, pair_cls, n, self.num_classes, self.bg_id)
