"""DecoupledNet (Hong, Noh & Han, "Decoupled Deep Neural Network for Semi-supervised Semantic
Segmentation", NeurIPS 2015).

Three parts:

* **Classification network**: the run's backbone, then a trunk of ``num_pools`` blocks
  (3x3 conv + ReLU + 2x2 max-pool that keeps its switches); the output of the last pool plays the
  role of VGG's ``pool5``, f(pool5). "fc6/fc7" are convolutions (3x3 then 1x1, ReLU), global
  average pooling and a linear "fc8" give one score S_l per foreground class. Trained with sigmoid
  cross-entropy on image-level labels (stage ``"classify"``).
* **Bridging layers** (Sec. 3.2): for label l, f_spat = f(pool5) and the class-specific saliency
  f_cls^l = dS_l / d f(pool5) (Eq. 3, back-propagated with ``torch.autograd.grad``) are
  concatenated and mapped by fully connected layers to g_l. The paper's bridging layers are fully
  connected over the 7x7 pool5 map of a 224x224 input; here they are applied per location (1x1
  convolutions) so any input size works.
* **Segmentation (deconvolution) network** (Eq. 2): g_l is unpooled with the classification
  net's own max-pooling switches (``max_unpool2d`` with the trunk's indices), each unpooling
  followed by a transposed convolution + ReLU, back to the backbone's resolution; a last
  transposed convolution gives the 2-channel (background, foreground) map M_l, bilinearly resized
  to the input. Generic backbones (EfficientNet, ResNet) keep no switches, so only the trunk's
  pools are unpooled; the remaining output stride is undone by interpolation.

Training (stage ``"segment"``): classifier frozen, bridging + deconvolution trained on strong rows
with a 2-class cross-entropy per (image, present label) pair, plus, when ``subset_union`` and the
row holds more than one label, one pair for the union of its labels (saliency of the summed
scores; the combinatorial-cropping idea of Sec. 5 applied to the whole image; the cropping data
stage is :mod:`raysemiseg.pseudolabel.cropping`). Stage ``"default"`` trains both objectives in
one run with the segmentation branch on detached classifier features (the two networks stay
decoupled: segmentation losses never reach the classifier).

Inference: per identified label (sigmoid(S_l) > ``threshold``, or the given labels), the
foreground map; background from the per-label background maps (min_l log p_bg = log(1 - max_l
p_fg), see :func:`combine_binary_maps`); argmax over labels.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from raysemiseg.labels import LabelSpace
from raysemiseg.methods.base import Batch, Method, MethodParams, register
from raysemiseg.methods.decoupled.losses import (
    binary_targets,
    combine_binary_maps,
    identified_labels,
    masked_cross_entropy,
    present_pairs,
)
from raysemiseg.models.backbones import build_backbone


class DecoupledParams(MethodParams):
    """DecoupledNet knobs (widths are this implementation's; the paper uses VGG16 sizes)."""

    width: int = Field(256, ge=8, description="channels of the trunk convs, f(pool5) and g_l")
    fc_width: int = Field(512, ge=8, description="channels of the conv fc6/fc7 of the classifier")
    num_pools: int = Field(2, ge=1, le=4, description="trunk conv+pool blocks whose switches the decoder unpools")
    bridge_width: int = Field(512, ge=8, description="hidden width of the bridging layers")
    threshold: float = Field(0.5, gt=0.0, lt=1.0, description="sigmoid score above which a label is identified")
    fallback_top1: bool = Field(True, description="no label above threshold -> keep the best one")
    use_gt_labels: bool = Field(False, description="evaluation passes the given image labels to predict")
    subset_union: bool = Field(True, description="also train one pair for the union of a row's labels (Sec. 5)")
    seg_weight: float = Field(1.0, ge=0.0, description="weight of the segmentation loss in stage 'default'")
    max_pairs: int = Field(64, ge=1, description="cap on (image, label) pairs per batch")
    init_from: str | None = Field(None, description="checkpoint (dir or file) of an earlier stage to start from")


def init_from_checkpoint(method: nn.Module, path: str) -> list[str]:
    """Start a stage from an earlier stage's weights (e.g. ``segment`` from ``classify``).

    Loads every tensor of the checkpoint whose name and shape match ``method``'s state (other
    methods' checkpoints work too, e.g. an ``lnet`` L-Net into ``lnet_pnet``). As with the WSSL
    helper's ``init_from``, methods call this only when ``model.pretrained`` is true, so
    rebuilding a trained run from its own checkpoint (``load_method``) does not read it.

    Args:
        path: a raysemiseg/Ray checkpoint directory (``model.pt``) or a state-dict file.

    Returns:
        The names of the loaded tensors.

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        ValueError: no tensor of the checkpoint matches the method (wrong method or label space).
    """
    from raysemiseg.methods.wssl.cross import read_state_dict

    state = read_state_dict(path)
    own = method.state_dict()
    ok = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not ok:
        raise ValueError(f"init_from {path}: none of its {len(state)} tensors matches method "
                         f"{getattr(method, 'name', '?')!r} (different method or label space?)")
    method.load_state_dict(ok, strict=False)
    return sorted(ok)


def class_saliency(head: Callable[[Tensor], Tensor], features: Tensor, pair_img: Tensor, pair_weights: Tensor,
                   create_graph: bool = False) -> Tensor:
    """Class-specific saliency f_cls = d(sum_l w_l S_l) / d f (DecoupledNet Eq. 3).

    Each pair p gets its own copy of its image's features, so one ``autograd.grad`` call gives all
    pairs' gradients (the head must treat rows independently: no batch statistics).

    Args:
        head: maps (P, D, h, w) features to (P, K') class scores S.
        features: (N, D, h, w) float f(pool5); not modified, gradients are not sent back to it.
        pair_img: (P,) int64 row of each pair.
        pair_weights: (P, K') float; one-hot for a single label, multi-hot for a label subset.
        create_graph: keep the graph of the gradient (needed only to train through the saliency).

    Returns:
        (P, D, h, w) float saliency, same dtype as ``features``.
    """
    x = features.detach()[pair_img].requires_grad_(True)
    with torch.enable_grad():
        scores = head(x)
        (grad,) = torch.autograd.grad((scores * pair_weights.to(scores.dtype)).sum(), x, create_graph=create_graph)
    return grad


class _ClassifierHead(nn.Module):
    """f(pool5) -> conv fc6 (3x3) -> conv fc7 (1x1) -> global average pool -> fc8: (P, K') scores."""

    def __init__(self, width: int, fc_width: int, num_fg: int) -> None:
        super().__init__()
        self.fc6 = nn.Conv2d(width, fc_width, 3, padding=1)
        self.fc7 = nn.Conv2d(fc_width, fc_width, 1)
        self.fc8 = nn.Linear(fc_width, num_fg)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.fc7(F.relu(self.fc6(x))))
        return self.fc8(x.mean(dim=(2, 3)))


@register
class DecoupledNet(Method):
    """DecoupledNet; stages ``"classify"``, ``"segment"`` and ``"default"`` (both at once)."""

    name = "decoupled"
    Params = DecoupledParams
    uses = ("pixel", "image")
    label_conditioned = True
    STAGES: tuple[str, ...] = ("default", "classify", "segment")

    def __init__(self, label_space: LabelSpace, model, params: DecoupledParams | None = None) -> None:
        super().__init__(label_space, model, params)
        if label_space.background_id is None:
            raise ValueError(f"method 'decoupled' needs a label space with a background class; {label_space.name!r} has none")
        p: DecoupledParams = self.params
        self.register_buffer("fg_ids", torch.tensor(label_space.foreground_ids, dtype=torch.long), persistent=False)
        self.bg_id = int(label_space.background_id)
        self.backbone = build_backbone(model)
        chans = [self.backbone.out_channels] + [p.width] * p.num_pools
        self.trunk = nn.ModuleList(nn.Conv2d(chans[i], chans[i + 1], 3, padding=1) for i in range(p.num_pools))
        self.cls_head = _ClassifierHead(p.width, p.fc_width, len(label_space.foreground_ids))
        self.bridge = nn.Sequential(
            nn.Conv2d(2 * p.width, p.bridge_width, 1), nn.ReLU(inplace=True),
            nn.Conv2d(p.bridge_width, p.width, 1), nn.ReLU(inplace=True),
        )
        self.deconv = nn.ModuleList(nn.ConvTranspose2d(p.width, p.width, 3, padding=1) for _ in range(p.num_pools))
        self.seg_out = nn.Sequential(
            nn.ConvTranspose2d(p.width, 64, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(64, 2, 1),
        )
        self.stage = "default"
        if p.init_from and getattr(model, "pretrained", True):
            init_from_checkpoint(self, p.init_from)

    # ------------------------------------------------------------------ stages
    def _classifier_modules(self) -> list[nn.Module]:
        return [self.backbone, self.trunk, self.cls_head]

    def _segmenter_modules(self) -> list[nn.Module]:
        return [self.bridge, self.deconv, self.seg_out]

    def set_stage(self, stage: str) -> None:
        """``"classify"``: classification net only; ``"segment"``: classifier frozen (eval mode,
        no gradients), bridging + deconvolution trained; ``"default"``: everything.

        Raises:
            ValueError: unknown stage, listing the valid ones.
        """
        super().set_stage(stage)  # validates against STAGES
        self.stage = stage
        for m in self._classifier_modules():
            m.requires_grad_(stage != "segment")
        for m in self._segmenter_modules():
            m.requires_grad_(stage != "classify")
        self.train(self.training)

    def train(self, mode: bool = True) -> "DecoupledNet":
        """As ``nn.Module.train`` but frozen parts stay in eval mode (fixed batch-norm statistics)."""
        super().train(mode)
        if self.stage == "segment":
            for m in self._classifier_modules():
                m.train(False)
        return self

    # ------------------------------------------------------------------ networks
    def classify_features(self, images: Tensor) -> tuple[Tensor, list[Tensor], list[torch.Size]]:
        """Classification-net features.

        Args:
            images: (N, 3, H, W) normalised float.

        Returns:
            ``(pool5, switches, sizes)``: f(pool5) (N, width, h5, w5); the max-pool indices of
            each trunk pool (first to last) and the pre-pool spatial sizes (for unpooling).
        """
        x = self.backbone(images)
        switches: list[Tensor] = []
        sizes: list[torch.Size] = []
        for conv in self.trunk:
            x = F.relu(conv(x))
            sizes.append(x.shape[-2:])
            if min(x.shape[-2:]) < 2:
                raise ValueError(f"input {tuple(images.shape[-2:])} too small for {len(self.trunk)} trunk pools "
                                 f"after output stride {self.backbone.output_stride}")
            x, idx = F.max_pool2d(x, 2, 2, return_indices=True)
            switches.append(idx)
        return x, switches, sizes

    def segment_pairs(self, pool5: Tensor, switches: list[Tensor], sizes: list[torch.Size], pair_img: Tensor,
                      pair_weights: Tensor, out_size: tuple[int, int]) -> Tensor:
        """Bridging + deconvolution for each (image, label-set) pair (Eq. 2-3).

        Args:
            pool5, switches, sizes: from :meth:`classify_features` (pool5 is detached here).
            pair_img: (P,) int64 rows; pair_weights: (P, K') label (subset) weights.
            out_size: (H, W) of the input images.

        Returns:
            (P, 2, H, W) float logits (background, foreground).
        """
        sal = class_saliency(self.cls_head, pool5, pair_img, pair_weights)
        g = self.bridge(torch.cat([pool5.detach()[pair_img], sal.to(pool5.dtype)], dim=1))
        for i in reversed(range(len(self.deconv))):
            g = F.max_unpool2d(g, switches[i][pair_img], 2, 2, output_size=sizes[i])
            g = F.relu(self.deconv[len(self.deconv) - 1 - i](g))
        out = self.seg_out(g)
        return F.interpolate(out, size=out_size, mode="bilinear", align_corners=False)

    def _pair_weights(self, pair_cls: Tensor) -> Tensor:
        """(P,) label-space ids -> (P, K') one-hot over the classifier's columns."""
        col = torch.searchsorted(self.fg_ids, pair_cls)
        return F.one_hot(col, len(self.fg_ids)).float()

    # ------------------------------------------------------------------ protocol
    def compute_losses(self, batch: Batch) -> dict[str, Tensor]:
        """``cls``: sigmoid CE of S over the foreground image labels (all rows);
        ``seg``: 2-class CE of each strong (image, label) pair's map (and label-union pairs)."""
        losses: dict[str, Tensor] = {}
        if self.stage == "segment":
            with torch.no_grad():
                pool5, switches, sizes = self.classify_features(batch.images)
        else:
            pool5, switches, sizes = self.classify_features(batch.images)
            scores = self.cls_head(pool5)
            losses["cls"] = F.binary_cross_entropy_with_logits(scores.float(), batch.image_labels[:, self.fg_ids].float())
        if self.stage == "classify":
            return losses
        p: DecoupledParams = self.params
        pair_img, pair_cls = present_pairs(batch.image_labels, self.fg_ids, batch.is_strong, p.max_pairs)
        weights = self._pair_weights(pair_cls)
        targets = binary_targets(batch.masks, pair_img, pair_cls, self.ignore_index)
        if p.subset_union:
            rows, counts = torch.unique(pair_img, return_counts=True)
            multi = rows[counts > 1]
            if multi.numel():
                union_w = (pair_img[None, :] == multi[:, None]).float() @ weights
                m = batch.masks[multi]
                # pixels of the row's own labels are foreground; everything else background
                own = torch.zeros(len(multi), self.num_classes, dtype=torch.bool, device=m.device)
                own[:, self.fg_ids] = union_w > 0
                t = own.gather(1, m.clamp(max=self.num_classes - 1).flatten(1)).view_as(m).long()
                t = torch.where(m == self.ignore_index, torch.full_like(t, self.ignore_index), t)
                pair_img = torch.cat([pair_img, multi])
                weights = torch.cat([weights, union_w])
                targets = torch.cat([targets, t])
        if pair_img.numel() == 0:
            # no strong pair in this batch: a zero that still touches the trainable segmenter
            zero = sum(q.sum() * 0.0 for q in self.seg_out.parameters())
            losses["seg"] = zero + sum(q.sum() * 0.0 for q in self.bridge.parameters())
            return losses
        logits = self.segment_pairs(pool5, switches, sizes, pair_img, weights, tuple(batch.images.shape[-2:]))
        seg = masked_cross_entropy(logits.float(), targets, self.ignore_index)
        losses["seg"] = seg * (p.seg_weight if self.stage == "default" else 1.0)
        return losses

    def predict(self, images: Tensor, image_labels: Tensor | None = None) -> Tensor:
        """(N, 3, H, W) normalised images -> (N, C, H, W) logits (see :func:`combine_binary_maps`).

        Args:
            image_labels: optional (N, K) multi-hot given labels, used instead of the classifier's
                labels when passed; evaluators pass them when ``use_gt_labels`` is set or when asked
                (``raysemiseg eval --given-labels``).

        Works under ``torch.no_grad``/``inference_mode``: the saliency's autograd is re-enabled
        locally.
        """
        p: DecoupledParams = self.params
        n, _, h, w = images.shape
        with torch.inference_mode(False), torch.enable_grad():
            x = images.clone() if images.is_inference() else images
            pool5, switches, sizes = self.classify_features(x)
            pool5 = pool5.detach()
            with torch.no_grad():
                scores = self.cls_head(pool5)
            if image_labels is not None:
                labels = image_labels.clone() if image_labels.is_inference() else image_labels
            else:
                labels = identified_labels(scores, self.fg_ids, self.num_classes, p.threshold, p.fallback_top1)
            pair_img, pair_cls = present_pairs(labels, self.fg_ids)
            if pair_img.numel():
                logits = self.segment_pairs(pool5, switches, sizes, pair_img, self._pair_weights(pair_cls), (h, w))
                logits = logits.detach()
            else:
                logits = images.new_zeros(0, 2, h, w)
        return combine_binary_maps(logits, pair_img, pair_cls, n, self.num_classes, self.bg_id)
