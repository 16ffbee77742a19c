"""DecoupledNet (Hong, Noh & Han, "Decoupled Deep Neural Network for Semi-supervised Semantic
Segmentation", NeurIPS 2015).

Three parts:

* **Classification network** (Sec. 4.1): the run's backbone, then a trunk of ``num_pools`` blocks
  (3x3 conv + BatchNorm + ReLU + 2x2 max-pool that keeps its switches); the output of the last
  pool plays the role of VGG's ``pool5``, f(pool5). With the default ``num_pools = 1`` on an
  output-stride-16 backbone f(pool5) has VGG's pool5 stride 32 (7x7 at 224 px). "fc6/fc7" are
  convolutions (3x3 then 1x1, ReLU), global average pooling and a linear "fc8" give one score S_l
  per foreground class. Trained with sigmoid cross-entropy on image-level labels (Eq. 1, stage
  ``"classify"``).
* **Bridging layers** (Sec. 4.3): for label l, f_spat = f(pool5) and the class-specific saliency
  f_cls^l = dS_l / d f(pool5) (Eq. 3, back-propagated with ``torch.autograd.grad``) are
  concatenated and mapped to g_l. The raw saliency is about 1e-3 of pool5's magnitude, so it is
  divided by its per-pair root mean square first (``saliency_norm: rms``; the paper leaves the
  scale open): without it the bridge output moved 0.2 % between labels and the segmenter could
  not tell labels apart. The paper's bridging layers are fully connected over the 7x7 pool5 map
  of a 224x224 input; here they are per-location 1x1 convolutions (+ BatchNorm + ReLU), so any
  input size works.
* **Segmentation (deconvolution) network** (Sec. 4.2, DeconvNet, Noh et al. 2015): g_l is unpooled
  with the classification net's own max-pooling switches (``max_unpool2d`` with the trunk's
  indices), each unpooling followed by a 3x3 transposed convolution + BatchNorm + ReLU (the mirror
  of the trunk conv). The backbone (EfficientNet, ResNet) has strided convolutions, not
  max-pools, so it has no switches to unpool: its stride is undone by learned 2x transposed
  convolutions (4x4, stride 2) + BatchNorm + ReLU down to ``decoder_stride``, then a 1x1
  convolution gives the 2-channel (background, foreground) map M_l (Eq. 2), bilinearly resized
  to the input. As in DeconvNet every (de)convolution of the bridge and the decoder is followed by
  BatchNorm; convolutions are Kaiming-normal initialised, BatchNorm weight 1 / bias 0, the last
  layer N(0, 1/fan_in) with bias 0 (see :func:`init_decoder_`).

Training (stage ``"segment"``, Sec. 5): classifier frozen, bridging + deconvolution trained on
strong rows with a 2-class cross-entropy over all pixels of

* each (image, present label) pair, the labels being the batch's ``image_labels`` (recomputed
  from the cropped mask by the data loader; a listed label without a pixel gives an all-background
  target, which is correct);
* with ``subset_union``, one pair per multi-label row for the union of its labels (target: every
  own label = foreground), the pair whose background map is used at inference;
* with ``combinatorial_crops > 0`` (on by default), combinatorial cropping (Sec. 4.4): per strong
  row and step that many crops, each for a subset P drawn uniformly from the non-empty subsets of
  the row's labels, a random box enclosing the union's foreground (uniform boxes stand in for the
  paper's EdgeBoxes), resized to the batch size, with the saliency of sum_{l in P} S_l and the
  target z^P (:func:`raysemiseg.pseudolabel.cropping.online_combinatorial_crops`).

Stage ``"default"`` trains both objectives in one run with the segmentation branch on detached
classifier features (the two networks stay decoupled: segmentation losses never reach the
classifier).

Optimisation (``optimizer_groups``): one optimizer of kind ``optimizer`` (default Adam) with the
backbone at ``optim.lr * backbone_lr_mult``, the trunk + classifier head at ``cls_lr_mult``
(DeepLab's 10x for new classifier layers) and the BatchNorm'd bridge + decoder at
``seg_lr_mult``; not the default 10x on every new layer (plain conv+ReLU stacks diverged there).

Inference (Sec. 4.3): per identified label l (sigmoid(S_l) > ``threshold``, or the given labels)
the foreground map M_f(g^l); the background map M_b(g*) of the bridge output g* for *all*
identified labels (``background: union``, the paper's rule; ``background: min`` keeps
min_l log p_bg(l) = log(1 - max_l p_fg)); argmax over them (:func:`combine_binary_maps`).
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import numpy as np
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
from raysemiseg.models.backbones import build_backbone


class DecoupledParams(MethodParams):
    """DecoupledNet knobs (widths are this implementation's; the paper uses VGG16 sizes)."""

    width: int = Field(256, ge=8, description="channels of the trunk convs, f(pool5) and g_l")
    fc_width: int = Field(512, ge=8, description="channels of the conv fc6/fc7 of the classifier")
    num_pools: int = Field(1, ge=1, le=4, description="trunk conv+BN+pool blocks whose switches the decoder unpools")
    bridge_width: int = Field(512, ge=8, description="hidden width of the bridging layers")
    decoder_stride: int = Field(4, ge=1, description="stride of the decoder's output before the bilinear resize "
                                                     "(learned 2x deconvs undo the backbone's stride down to it)")
    saliency_norm: Literal["rms", "none"] = Field(
        "rms", description="divide each pair's saliency f_cls by its root mean square before the bridge")
    background: Literal["union", "min"] = Field(
        "union", description="inference background: M_b(g*) of all identified labels (Sec. 4.3) | log(1 - max p_fg)")
    threshold: float = Field(0.5, gt=0.0, lt=1.0, description="sigmoid score above which a label is identified")
    fallback_top1: bool = Field(True, description="no label above threshold -> keep the best one")
    use_gt_labels: bool = Field(False, description="evaluation passes the given image labels to predict")
    subset_union: bool = Field(True, description="also train one pair for the union of a row's labels")
    combinatorial_crops: int = Field(1, ge=0, description="combinatorial crops (Sec. 4.4) per strong row per step; 0 = off")
    crop_min_size: float = Field(0.25, gt=0.0, le=1.0, description="minimum crop side / image side")
    crop_max_labels: int = Field(8, ge=1, description="rows with more labels draw from singletons + the full set")
    seg_weight: float = Field(1.0, ge=0.0, description="weight of the segmentation loss in stage 'default'")
    max_pairs: int = Field(64, ge=1, description="cap on (image, label) pairs per batch")
    optimizer: Literal["adam", "adamw", "sgd"] | None = Field(
        "adam", description="optimizer kind of the method's group; None = the run's optim.optimizer")
    backbone_lr_mult: float = Field(1.0, gt=0.0, description="backbone lr = optim.lr * this (stage classify/default)")
    cls_lr_mult: float = Field(10.0, gt=0.0, description="trunk + classifier head lr = optim.lr * this")
    seg_lr_mult: float = Field(10.0, gt=0.0, description="bridge + decoder (BatchNorm'd) lr = optim.lr * this")
    init_from: str | None = Field(None, description="checkpoint (dir or file) of an earlier stage to start from")

    @model_validator(mode="after")
    def _check_stride(self) -> "DecoupledParams":
        if self.decoder_stride & (self.decoder_stride - 1):
            raise ValueError(f"decoder_stride must be a power of two, got {self.decoder_stride}")
        return self


def init_decoder_(modules: list[nn.Module], last: nn.Module | None = None) -> None:
    """DeconvNet-style initialisation, in place: every Conv2d / ConvTranspose2d Kaiming-normal
    (ReLU gain, ``mode="fan_out"``: out*k*k for a conv, in*k*k for a transposed conv), bias 0;
    BatchNorm weight 1, bias 0; ``last`` (the output layer) N(0, 1/fan_in), bias 0."""
    for mod in modules:
        for m in mod.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
    if last is not None:
        # zero-mean Gaussian with std 1/sqrt(fan_in): on BatchNorm'd (unit-variance) inputs the
        # initial logits have about unit variance. DeconvNet's N(0, 0.01^2) left them ~1e-2, and
        # with Adam's bounded steps the output layer then needed ~100 steps before the logits could
        # express a mask (measured: fg IoU 0.0 vs 0.57-0.76 after 40 steps on a toy batch).
        fan_in = last.weight.shape[1] * last.weight[0, 0].numel()
        nn.init.normal_(last.weight, 0.0, 1.0 / math.sqrt(fan_in))
        if last.bias is not None:
            nn.init.zeros_(last.bias)


def conv_bn_relu(conv: nn.Module, channels: int) -> nn.Sequential:
    """``conv`` -> BatchNorm2d(channels) -> ReLU (DeconvNet's layer unit)."""
    return nn.Sequential(conv, nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


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
    pairs' gradients (the head must treat rows independently: no batch statistics). Half-precision
    features are promoted to float32 and autocast is off inside: the gradients are ~1e-4..1e-6,
    in fp16's subnormal range.

    Args:
        head: maps (P, D, h, w) features to (P, K') class scores S.
        features: (N, D, h, w) float f(pool5); not modified, gradients are not sent back to it.
        pair_img: (P,) int64 row of each pair.
        pair_weights: (P, K') float; one-hot for a single label, multi-hot for a label subset.
        create_graph: keep the graph of the gradient (needed only to train through the saliency).

    Returns:
        (P, D, h, w) float saliency (float32 for half-precision ``features``, else their dtype).
    """
    x = features.detach()[pair_img]
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    x = x.requires_grad_(True)
    with torch.enable_grad(), torch.autocast(device_type=x.device.type, enabled=False):
        scores = head(x)
        (grad,) = torch.autograd.grad((scores * pair_weights.to(scores.dtype)).sum(), x, create_graph=create_graph)
    return grad


def normalise_saliency(sal: Tensor, eps: float = 1e-12) -> Tensor:
    """f_cls / RMS(f_cls) per pair: (P, D, h, w) -> (P, D, h, w) with mean square 1 per pair (an
    all-zero map stays zero). Scale-free, so the bridge sees the saliency's pattern at the scale
    of f(pool5) whatever the classifier's score scale."""
    rms = sal.float().pow(2).mean(dim=tuple(range(1, sal.dim())), keepdim=True).sqrt()
    return (sal / rms.clamp_min(eps)).to(sal.dtype)


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
    #: the classify stage's val mIoU scores an untrained segmenter: hand on its latest checkpoint
    AUX_STAGES: tuple[str, ...] = ("classify",)

    def __init__(self, label_space: LabelSpace, model, params: DecoupledParams | None = None) -> None:
        super().__init__(label_space, model, params)
        if label_space.background_id is None:
            raise ValueError(f"method 'decoupled' needs a label space with a background class; {label_space.name!r} has none")
        p: DecoupledParams = self.params
        self.register_buffer("fg_ids", torch.tensor(label_space.foreground_ids, dtype=torch.long), persistent=False)
        self.bg_id = int(label_space.background_id)
        self.backbone = build_backbone(model)
        os_ = int(self.backbone.output_stride)
        if p.decoder_stride > os_:
            raise ValueError(f"decoupled: decoder_stride {p.decoder_stride} > the backbone's output stride {os_}")
        chans = [self.backbone.out_channels] + [p.width] * p.num_pools
        self.trunk = nn.ModuleList(conv_bn_relu(nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False), chans[i + 1])
                                   for i in range(p.num_pools))
        self.cls_head = _ClassifierHead(p.width, p.fc_width, len(label_space.foreground_ids))
        self.bridge = nn.Sequential(
            conv_bn_relu(nn.Conv2d(2 * p.width, p.bridge_width, 1, bias=False), p.bridge_width),
            conv_bn_relu(nn.Conv2d(p.bridge_width, p.width, 1, bias=False), p.width),
        )
        # deconv[j] follows the j-th unpooling (the mirror of trunk conv num_pools-1-j)
        self.deconv = nn.ModuleList(conv_bn_relu(nn.ConvTranspose2d(p.width, p.width, 3, padding=1, bias=False), p.width)
                                    for _ in range(p.num_pools))
        n_up = int(round(math.log2(os_ // p.decoder_stride)))
        up_ch = [p.width] + [max(p.width // 2 ** (i + 1), 16) for i in range(n_up)]
        self.upsample = nn.ModuleList(
            conv_bn_relu(nn.ConvTranspose2d(up_ch[i], up_ch[i + 1], 4, stride=2, padding=1, bias=False), up_ch[i + 1])
            for i in range(n_up))
        self.seg_out = nn.Conv2d(up_ch[-1], 2, 1)
        init_decoder_([self.trunk, self.bridge, self.deconv, self.upsample], last=self.seg_out)
        self.stage = "default"
        if p.init_from and getattr(model, "pretrained", True):
            init_from_checkpoint(self, p.init_from)

    # ------------------------------------------------------------------ stages
    def _classifier_modules(self) -> list[nn.Module]:
        return [self.backbone, self.trunk, self.cls_head]

    def _segmenter_modules(self) -> list[nn.Module]:
        return [self.bridge, self.deconv, self.upsample, self.seg_out]

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

    def optimizer_groups(self, lr: float) -> list[OptimizerGroup]:
        """One "main" group of kind ``params.optimizer`` (default Adam): backbone at
        ``lr * backbone_lr_mult``, trunk + classifier head at ``lr * cls_lr_mult``, bridge +
        decoder at ``lr * seg_lr_mult``; only parameters the stage trains."""
        p: DecoupledParams = self.params

        def trainable(mods: list[nn.Module]) -> list[Tensor]:
            return [q for m in mods for q in m.parameters() if q.requires_grad]

        groups = [{"params": trainable([self.backbone]), "lr": lr * p.backbone_lr_mult},
                  {"params": trainable([self.trunk, self.cls_head]), "lr": lr * p.cls_lr_mult},
                  {"params": trainable(self._segmenter_modules()), "lr": lr * p.seg_lr_mult}]
        return [OptimizerGroup("main", [g for g in groups if g["params"]], optimizer=p.optimizer)]

    # ------------------------------------------------------------------ networks
    def classify_features(self, images: Tensor) -> tuple[Tensor, list[Tensor], list[torch.Size]]:
        """Classification-net features.

        Args:
            images: (N, 3, H, W) normalised float.

        Returns:
            ``(pool5, switches, sizes)``: f(pool5) (N, width, h5, w5); the max-pool indices of
            each trunk pool (first to last) and the pre-pool spatial sizes (for unpooling).

        Raises:
            ValueError: the input is too small for the trunk's pools.
        """
        x = self.backbone(images)
        switches: list[Tensor] = []
        sizes: list[torch.Size] = []
        for block in self.trunk:
            x = block(x)
            sizes.append(x.shape[-2:])
            if min(x.shape[-2:]) < 2:
                raise ValueError(f"input {tuple(images.shape[-2:])} too small for {len(self.trunk)} trunk pools "
                                 f"after output stride {self.backbone.output_stride}")
            x, idx = F.max_pool2d(x, 2, 2, return_indices=True)
            switches.append(idx)
        return x, switches, sizes

    def bridge_features(self, pool5: Tensor, pair_img: Tensor, pair_weights: Tensor) -> Tensor:
        """g for each (image, label-set) pair: bridge([f(pool5), f_cls / RMS(f_cls)]) (Sec. 4.3, Eq. 3).

        Args:
            pool5: (N, width, h5, w5) from :meth:`classify_features` (detached here).
            pair_img: (P,) int64 rows; pair_weights: (P, K') label (subset) weights.

        Returns:
            (P, width, h5, w5) float bridge output.
        """
        sal = class_saliency(self.cls_head, pool5, pair_img, pair_weights)
        if self.params.saliency_norm == "rms":
            sal = normalise_saliency(sal)
        return self.bridge(torch.cat([pool5.detach()[pair_img], sal.to(pool5.dtype)], dim=1))

    def unpool(self, g: Tensor, switches: list[Tensor], sizes: list[torch.Size], pair_img: Tensor, j: int) -> Tensor:
        """The j-th unpooling of the deconvolution net (j = 0 first): ``max_unpool2d`` of ``g``
        with the switches of trunk pool ``num_pools - 1 - j`` of each pair's image (Sec. 4.2).

        Args:
            g: (P, width, h, w); switches, sizes: from :meth:`classify_features`.

        Returns:
            (P, width, *sizes[num_pools - 1 - j]): every value of ``g`` at the position its pool
            took the max from, zeros elsewhere.
        """
        i = len(switches) - 1 - j
        return F.max_unpool2d(g, switches[i][pair_img], 2, 2, output_size=sizes[i])

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
        g = self.bridge_features(pool5, pair_img, pair_weights)
        for j, deconv in enumerate(self.deconv):
            g = deconv(self.unpool(g, switches, sizes, pair_img, j))
        for up in self.upsample:
            g = up(g)
        out = self.seg_out(g)
        return F.interpolate(out, size=out_size, mode="bilinear", align_corners=False)

    def _pair_weights(self, pair_cls: Tensor) -> Tensor:
        """(P,) label-space ids -> (P, K') one-hot over the classifier's columns."""
        col = torch.searchsorted(self.fg_ids, pair_cls)
        return F.one_hot(col, len(self.fg_ids)).float()

    def _union_weights(self, pair_img: Tensor, weights: Tensor, rows: Tensor) -> Tensor:
        """(R,) rows -> (R, K') multi-hot of the union of each row's pair labels."""
        return ((pair_img[None, :] == rows[:, None]).float() @ weights).clamp(max=1.0)

    # ------------------------------------------------------------------ protocol
    def compute_losses(self, batch: Batch) -> dict[str, Tensor]:
        """``cls``: sigmoid CE of S over the foreground image labels (all rows, Eq. 1);
        ``seg``: 2-class CE (Eq. 2) over all pixels of every strong (image, label) pair, the
        label-union pairs and the combinatorial crops (Sec. 4.4)."""
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
                union_w = self._union_weights(pair_img, weights, multi)
                m = batch.masks[multi]
                # pixels of the row's own labels are foreground; everything else background
                own = torch.zeros(len(multi), self.num_classes, dtype=torch.bool, device=m.device)
                own[:, self.fg_ids] = union_w > 0
                t = own.gather(1, m.clamp(max=self.num_classes - 1).flatten(1)).view_as(m).long()
                t = torch.where(m == self.ignore_index, torch.full_like(t, self.ignore_index), t)
                pair_img = torch.cat([pair_img, multi])
                weights = torch.cat([weights, union_w])
                targets = torch.cat([targets, t])
        if p.combinatorial_crops and pair_img.numel():
            from raysemiseg.pseudolabel.cropping import online_combinatorial_crops

            rng = np.random.default_rng(int(torch.randint(0, 2 ** 31 - 1, (1,)).item()))
            crops = online_combinatorial_crops(batch.images, batch.masks, batch.image_labels, batch.is_strong,
                                               self.fg_ids, p.combinatorial_crops, rng, self.ignore_index,
                                               p.crop_max_labels, p.crop_min_size)
            if crops.rows.numel():
                with torch.no_grad():
                    c_pool5, c_switches, _ = self.classify_features(crops.images)
                n = pool5.shape[0]
                pool5 = torch.cat([pool5.detach(), c_pool5])
                switches = [torch.cat([a, b]) for a, b in zip(switches, c_switches)]
                pair_img = torch.cat([pair_img, n + torch.arange(len(crops.rows), device=pair_img.device)])
                weights = torch.cat([weights, crops.subsets[:, self.fg_ids].float()])
                targets = torch.cat([targets, crops.targets])
        if pair_img.numel() == 0:
            # no strong pair in this batch: a zero that still touches the trainable segmenter
            losses["seg"] = sum(q.sum() * 0.0 for mod in self._segmenter_modules() for q in mod.parameters())
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

        With ``background: union`` the background logit is log M_b(g*) of each image's union pair
        (all its identified labels; the singleton pair itself for a single-label image).
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
            background = None
            if pair_img.numel():
                weights = self._pair_weights(pair_cls)
                k = pair_img.numel()
                all_img, all_w = pair_img, weights
                rows = multi = None
                if p.background == "union":
                    rows, counts = torch.unique(pair_img, return_counts=True)
                    multi = rows[counts > 1]
                    if multi.numel():
                        all_img = torch.cat([pair_img, multi])
                        all_w = torch.cat([weights, self._union_weights(pair_img, weights, multi)])
                out = self.segment_pairs(pool5, switches, sizes, all_img, all_w, (h, w)).detach()
                logits = out[:k]
                if p.background == "union":
                    background = logits.new_zeros(n, 2, h, w)
                    background[pair_img] = logits          # single-label images: g* = g^l
                    if multi.numel():
                        background[multi] = out[k:]
            else:
                logits = images.new_zeros(0, 2, h, w)
        return combine_binary_maps(logits, pair_img, pair_cls, n, self.num_classes, self.bg_id, background)
