"""L-Net and P-Net (Xiao, Wei, Liu, Zhang & Feng, "Transferable Semi-supervised Semantic
Segmentation", AAAI 2018).

* **L-Net** (Sec. 3.1, Eq. 1): a class-agnostic binary segmentation network (its own backbone +
  a LargeFOV head with one output channel) trained with per-pixel sigmoid cross-entropy on strong
  rows; foreground = any non-background class, void pixels ignored. Its map M on weak images is one
  of the features F of the pseudo-label engine's superpixel self-diffusion (Eq. 2) that produces
  the weak labels L_w; :func:`lnet_map` and :class:`LNetMapStage` make M from a checkpoint.
* **Segmentation network**: backbone + LargeFOV head over the label space, cross-entropy on the
  strong masks L_s and on the weak rows' pseudo labels L_w (``batch.pseudo``, from a label store).
* **P-Net** (Sec. 3.3, Table 1): six 3x3 convolutions 16-32-64-64-128-128 (ReLU) with a 2x2 max
  pool after every second one, then fully connected layers fc4 256 (tanh), fc5 512 (tanh) and fc6 1
  (sigmoid; ``PNet.forward`` returns fc6's logit and the sigmoid is applied inside the binary
  cross-entropy, which is the numerically stable form of the same J_b). Input: the image
  multiplied by one class's mask (a (3, S, S) "masked image", S = ``pnet_input_size``), fc4 acting
  on the flattened 128 x S/8 x S/8 map.
* **Adversarial training** (Eq. 3-5): P-Net learns to tell the image times the class's label map
  (real) from the image times the predicted class probability (fake), for the same (image, class)
  pairs: L_P = -[log P(x ⊙ y_c) + log(1 - P(x ⊙ S(x)_c))] (Eq. 3, summed over every training image).
  y is the image's label: the ground-truth mask L_s on strong rows and the weak label L_w
  (``batch.pseudo``, from the label store) on weak rows, so every category is seen as real and as
  fake and P-Net cannot separate them by category. A pair whose label map holds no pixel of its
  class (a weak row without L_w, a crop that lost the object) gives no sample. The segmentation
  network minimises L_S = L_ce + lambda * L_adv with the non-saturating L_adv = -log P(x ⊙ S(x)_c)
  (Eq. 4-5: the fake labelled 1 for the generator).

Methods and stages (the shared loop switches with ``set_stage``):

``"lnet"`` (:class:`LNet`): ``"lnet"`` (L-Net only), ``"segment"`` (segmentation network only),
``"default"`` (both at once).

``"lnet_pnet"`` (:class:`LNetPNet`), two optimizer groups ``"main"`` (L-Net + segmentation net)
and ``"disc"`` (P-Net): ``"lnet"``, ``"pretrain_pnet"`` (P-Net on the strong categories with the
segmentation net frozen: real = x ⊙ ground-truth mask, fake = x ⊙ the segmentation net's
prediction S(x)_c, as in the paper, so start it from a *trained* segmenter, e.g. ``lnet``'s
``segment`` stage; ``pretrain_fake: corrupted`` instead uses corrupted ground-truth masks: the
mask's bounding box or the mask shifted by 1/4 of its size), ``"joint"`` (the segmentation net
fine-tuned with P-Net, Eq. 3-5) and ``"default"`` (everything). Protocol of the paper (Sec. 4):
train the segmentation net on L_s + L_w first, then fine-tune it adversarially at a small lr
(seg 1e-5, P-Net 1e-3 against DeepLab's 1e-3 training lr): ``disc_lr_mult`` = 100 by default and
the joint stage's ``optim.lr`` = 1/100 of the segmentation stage's (configs/experiments/c3s_split1.yaml).
``lnet`` and ``pretrain_pnet`` are auxiliary stages (:attr:`Method.AUX_STAGES`): the segmenter they
are scored by is frozen, so their latest checkpoint is handed on.
Losses are keyed ``"main/..."`` and ``"disc/..."``. The fake inputs of ``disc`` losses are
detached, so the discriminator's losses never reach the segmentation network; the generator's
``main/adv`` back-propagates through P-Net (the loop steps each group's own parameters only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from raysemiseg.labels import LabelSpace
from raysemiseg.methods.base import Batch, Method, MethodParams, OptimizerGroup, register
from raysemiseg.methods.decoupled.losses import masked_cross_entropy, present_pairs
from raysemiseg.methods.decoupled.model import init_from_checkpoint
from raysemiseg.models.backbones import build_backbone
from raysemiseg.models.heads import LargeFOVHead


class LNetParams(MethodParams):
    """Knobs of ``lnet`` (and the base of ``lnet_pnet``)."""

    head_hidden: int = Field(1024, ge=1, description="fc6/fc7 width of both LargeFOV heads (1024 in the paper's DeepLab)")
    head_dropout: float = Field(0.5, ge=0.0, lt=1.0)
    head_dilation: int = Field(12, ge=1)
    pseudo_weight: float = Field(1.0, ge=0.0, description="weight of the CE on weak rows' pseudo labels L_w")
    init_from: str | None = Field(None, description="checkpoint of an earlier stage/method to start from")


class LNetPNetParams(LNetParams):
    """Knobs of ``lnet_pnet``."""

    lambda_adv: float = Field(0.1, ge=0.0, description="lambda of Eq. 4: weight of the adversarial term L_adv")
    pnet_input_size: int = Field(64, ge=8, multiple_of=8, description="S: masked images are resized to S x S")
    max_pairs: int = Field(32, ge=1, description="cap on (image, class) pairs per batch for P-Net")
    disc_lr_mult: float = Field(100.0, gt=0.0, description=(
        "P-Net learning rate / base learning rate (the segmentation backbone's); Xiao et al. fine-tune "
        "the segmentation net at 1e-5 with P-Net at 1e-3, a ratio of 100"))
    pretrain_fake: Literal["predicted", "corrupted"] = Field("predicted", description=(
        "fake samples of stage pretrain_pnet: 'predicted' = x * S(x)_c of the frozen segmentation net "
        "(the paper; start from a trained segmenter), 'corrupted' = x * a corrupted ground-truth mask "
        "(bounding box / shifted mask)"))


def class_agnostic_target(masks: Tensor, background_id: int, ignore_index: int = 255) -> Tensor:
    """Binary L-Net target (Eq. 1): 1 where the mask holds any non-background class, 0 on
    background, ``ignore_index`` on void. (N, H, W) int64 -> (N, H, W) int64."""
    t = (masks != background_id).long()
    return torch.where(masks == ignore_index, torch.full_like(t, ignore_index), t)


def binary_loss(logit: Tensor, target: Tensor, ignore_index: int = 255) -> Tensor:
    """Pixel-mean sigmoid cross-entropy over non-void pixels (0 when there are none).

    Args:
        logit: (N, 1, H, W) float; target: (N, H, W) int64 in {0, 1, ignore_index}.
    """
    valid = target != ignore_index
    loss = F.binary_cross_entropy_with_logits(logit[:, 0].float(), target.clamp(max=1).float(), reduction="none")
    return (loss * valid).sum() / valid.sum().clamp_min(1)


class PNet(nn.Module):
    """P-Net of Xiao et al. 2018, Table 1: (P, 3, S, S) masked images -> (P,) real/fake logits.

    conv3x3-16, conv3x3-32, pool2, conv3x3-64, conv3x3-64, pool2, conv3x3-128, conv3x3-128, pool2,
    fc4-256 tanh, fc5-512 tanh, fc6-1 (ReLU after every conv). ``forward`` returns fc6's logit; its
    sigmoid is O_P, the probability that the masked image is real (applied inside the BCE).
    """

    CONV_WIDTHS: tuple[int, ...] = (16, 32, 64, 64, 128, 128)
    FC_WIDTHS: tuple[int, ...] = (256, 512, 1)

    def __init__(self, input_size: int = 64) -> None:
        super().__init__()
        if input_size % 8:
            raise ValueError(f"PNet: input_size {input_size} must be a multiple of 8 (three 2x2 pools)")
        self.input_size = input_size
        layers: list[nn.Module] = []
        c_in = 3
        for i, c in enumerate(self.CONV_WIDTHS):
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU(inplace=True)]
            if i % 2 == 1:
                layers.append(nn.MaxPool2d(2))
            c_in = c
        self.features = nn.Sequential(*layers)
        flat = self.CONV_WIDTHS[-1] * (input_size // 8) ** 2
        fcs: list[nn.Module] = []
        for j, f in enumerate(self.FC_WIDTHS):
            fcs.append(nn.Linear(flat if j == 0 else self.FC_WIDTHS[j - 1], f))
            if j < len(self.FC_WIDTHS) - 1:
                fcs.append(nn.Tanh())  # Table 1: fc4, fc5 tanh
        self.classifier = nn.Sequential(*fcs)

    def forward(self, x: Tensor) -> Tensor:
        """(P, 3, H, W) masked images (resized to S x S when needed) -> (P,) float logits."""
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return self.classifier(self.features(x).flatten(1)).squeeze(1)


def masked_images(images: Tensor, maps: Tensor) -> Tensor:
    """x ⊙ m: (P, 3, H, W) images times (P, H, W) masks/probabilities in [0, 1]."""
    return images * maps[:, None].to(images.dtype)


@register
class LNet(Method):
    """L-Net + segmentation network trained on L_s and L_w; stages "lnet", "segment", "default"."""

    name = "lnet"
    Params = LNetParams
    uses = ("pixel", "image")
    STAGES: tuple[str, ...] = ("default", "lnet", "segment")
    #: stage lnet trains L-Net only: the (frozen) segmentation net's val mIoU does not move
    AUX_STAGES: ClassVar[tuple[str, ...]] = ("lnet",)

    def __init__(self, label_space: LabelSpace, model: Any, params: LNetParams | None = None) -> None:
        super().__init__(label_space, model, params)
        if label_space.background_id is None:
            raise ValueError(f"method {self.name!r} needs a label space with a background class; {label_space.name!r} has none")
        p: LNetParams = self.params
        self.bg_id = int(label_space.background_id)
        self.register_buffer("fg_ids", torch.tensor(label_space.foreground_ids, dtype=torch.long), persistent=False)
        self.backbone = build_backbone(model)
        self.head = LargeFOVHead(self.backbone.out_channels, self.num_classes, hidden=p.head_hidden,
                                 dilation=p.head_dilation, dropout=p.head_dropout)
        self.lnet_backbone = build_backbone(model)
        self.lnet_head = LargeFOVHead(self.lnet_backbone.out_channels, 1, hidden=p.head_hidden,
                                      dilation=p.head_dilation, dropout=p.head_dropout)
        self.stage = "default"
        if p.init_from and getattr(model, "pretrained", True) and type(self) is LNet:
            init_from_checkpoint(self, p.init_from)

    # ------------------------------------------------------------------ stages
    def _stage_modules(self) -> dict[str, list[nn.Module]]:
        """Trainable modules of each stage."""
        seg, lnet = [self.backbone, self.head], [self.lnet_backbone, self.lnet_head]
        return {"default": seg + lnet, "lnet": lnet, "segment": seg}

    def set_stage(self, stage: str) -> None:
        """Freeze everything the stage does not train (frozen parts stay in eval mode).

        Raises:
            ValueError: unknown stage, listing the valid ones.
        """
        super().set_stage(stage)  # validates against STAGES
        self.stage = stage
        self.requires_grad_(False)
        for m in self._stage_modules()[stage]:
            m.requires_grad_(True)
        self.train(self.training)

    def train(self, mode: bool = True) -> "LNet":
        super().train(mode)
        active = {id(m) for m in self._stage_modules()[self.stage]}
        for m in self.children():
            if id(m) not in active:
                m.train(False)
        return self

    # ------------------------------------------------------------------ networks
    def seg_logits(self, images: Tensor) -> Tensor:
        """Segmentation network: (N, 3, H, W) -> (N, K, H, W) logits."""
        return F.interpolate(self.head(self.backbone(images)), size=images.shape[-2:], mode="bilinear", align_corners=False)

    def lnet_logits(self, images: Tensor) -> Tensor:
        """L-Net: (N, 3, H, W) -> (N, 1, H, W) class-agnostic foreground logits."""
        return F.interpolate(self.lnet_head(self.lnet_backbone(images)), size=images.shape[-2:], mode="bilinear",
                             align_corners=False)

    def _seg_losses(self, batch: Batch, logits: Tensor) -> dict[str, Tensor]:
        strong = batch.is_strong.bool()
        target_s = torch.where(strong[:, None, None], batch.masks, torch.full_like(batch.masks, self.ignore_index))
        target_w = torch.where(strong[:, None, None], torch.full_like(batch.pseudo, self.ignore_index), batch.pseudo)
        return {"seg_strong": masked_cross_entropy(logits.float(), target_s, self.ignore_index),
                "seg_weak": self.params.pseudo_weight * masked_cross_entropy(logits.float(), target_w, self.ignore_index)}

    def _lnet_loss(self, batch: Batch) -> Tensor:
        strong = batch.is_strong.bool()
        target = class_agnostic_target(batch.masks, self.bg_id, self.ignore_index)
        target = torch.where(strong[:, None, None], target, torch.full_like(target, self.ignore_index))
        return binary_loss(self.lnet_logits(batch.images), target, self.ignore_index)

    # ------------------------------------------------------------------ protocol
    def compute_losses(self, batch: Batch) -> dict[str, Tensor]:
        """``lnet``: Eq. 1 on strong rows; ``seg_strong``/``seg_weak``: CE on L_s and L_w."""
        losses: dict[str, Tensor] = {}
        if self.stage in ("default", "lnet"):
            losses["lnet"] = self._lnet_loss(batch)
        if self.stage in ("default", "segment"):
            losses.update(self._seg_losses(batch, self.seg_logits(batch.images)))
        return losses

    def predict(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) -> (N, K, H, W) logits of the segmentation network."""
        return self.seg_logits(images)

    def optimizer_groups(self, lr: float) -> list[OptimizerGroup]:
        """"main": trainable backbones at ``lr``, heads at 10x."""
        return [OptimizerGroup("main", self._main_param_groups(lr))]

    def _main_param_groups(self, lr: float) -> list[dict[str, Any]]:
        bb = [p for m in (self.backbone, self.lnet_backbone) for p in m.parameters() if p.requires_grad]
        heads = [p for m in (self.head, self.lnet_head) for p in m.parameters() if p.requires_grad]
        groups = [{"params": bb, "lr": lr}] if bb else []
        if heads:
            groups.append({"params": heads, "lr": lr * 10.0})
        return groups


@register
class LNetPNet(LNet):
    """L-Net + segmentation net + P-Net adversary (Eq. 3-5); groups "main" and "disc"."""

    name = "lnet_pnet"
    Params = LNetPNetParams
    STAGES = ("default", "lnet", "pretrain_pnet", "joint")
    #: the segmentation net is frozen in both: their val mIoU says nothing about the stage
    AUX_STAGES: ClassVar[tuple[str, ...]] = ("lnet", "pretrain_pnet")

    def __init__(self, label_space: LabelSpace, model: Any, params: LNetPNetParams | None = None) -> None:
        super().__init__(label_space, model, params)
        self.pnet = PNet(self.params.pnet_input_size)
        if self.params.init_from and getattr(model, "pretrained", True):
            init_from_checkpoint(self, self.params.init_from)

    def _stage_modules(self) -> dict[str, list[nn.Module]]:
        seg, lnet = [self.backbone, self.head], [self.lnet_backbone, self.lnet_head]
        return {"default": seg + lnet + [self.pnet], "lnet": lnet, "pretrain_pnet": [self.pnet],
                "joint": seg + [self.pnet]}

    def _pairs(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """The (image, class) pairs of P-Net's real and fake samples (Eq. 3) and their label maps.

        Stage ``pretrain_pnet`` (the strong categories only): strong rows, label = the ground-truth
        mask L_s. Other stages: every row, label = L_s on strong rows and the weak label L_w
        (``batch.pseudo``) on weak rows. A pair is kept only when its label map holds at least one
        pixel of its class (no all-black "real" sample); at most ``max_pairs``, row-major.

        Returns:
            ``(img, cls, maps)``: (P,) int64 row indices, (P,) int64 label-space class ids and
            (P, H, W) float32 binary label maps (1 = the pair's class; void and other classes 0).
        """
        p: LNetPNetParams = self.params
        strong = batch.is_strong.bool()
        rows = strong if self.stage == "pretrain_pnet" else None
        img, cls = present_pairs(batch.image_labels, self.fg_ids, rows)
        label = torch.where(strong[:, None, None], batch.masks, batch.pseudo)
        maps = (label[img] == cls[:, None, None]).float()
        keep = maps.flatten(1).sum(1) > 0
        img, cls, maps = img[keep][:p.max_pairs], cls[keep][:p.max_pairs], maps[keep][:p.max_pairs]
        return img, cls, maps

    def _real_pairs(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """Rows (P,) int64 and binary label maps (P, H, W) float of P-Net's real samples (:meth:`_pairs`)."""
        img, _, maps = self._pairs(batch)
        return img, maps

    def _corrupted(self, gt: Tensor) -> Tensor:
        """Fake masks for P-Net pre-training: the even pairs get their mask's bounding box, the odd
        ones the mask rolled by a quarter of its size (deterministic, no RNG state)."""
        out = gt.clone()
        h, w = gt.shape[-2:]
        for i in range(gt.shape[0]):
            ys, xs = torch.nonzero(gt[i] > 0.5, as_tuple=True)
            if ys.numel() == 0:
                continue
            if i % 2 == 0:
                out[i, ys.min():ys.max() + 1, xs.min():xs.max() + 1] = 1.0
            else:
                dy = max(1, int(ys.max() - ys.min() + 1) // 4)
                dx = max(1, int(xs.max() - xs.min() + 1) // 4)
                out[i] = torch.roll(gt[i], shifts=(dy, dx), dims=(0, 1))
        return out

    def compute_losses(self, batch: Batch) -> dict[str, Tensor]:
        """``main/lnet``, ``main/seg_strong``, ``main/seg_weak``, ``main/adv`` (lambda * L_adv,
        Eq. 4-5) and ``disc/real``, ``disc/fake`` (Eq. 3), depending on the stage."""
        p: LNetPNetParams = self.params
        losses: dict[str, Tensor] = {}
        if self.stage in ("default", "lnet"):
            losses["main/lnet"] = self._lnet_loss(batch)
        if self.stage == "lnet":
            return losses
        img, cls, real_maps = self._pairs(batch)  # real and fake samples share the pairs (Eq. 3)
        x = batch.images[img]
        real_logit = self.pnet(masked_images(x, real_maps)) if img.numel() else None
        if self.stage == "pretrain_pnet":
            fake_logit = None
            if img.numel():
                if p.pretrain_fake == "corrupted":
                    fake_maps = self._corrupted(real_maps)
                else:  # the frozen segmentation net's S(x)_c
                    with torch.no_grad():
                        fake_maps = torch.softmax(self.seg_logits(x).float(), dim=1)[torch.arange(img.numel()), cls]
                fake_logit = self.pnet(masked_images(x, fake_maps))
            losses.update(self._disc_losses(real_logit, fake_logit))
            return losses
        logits = self.seg_logits(batch.images)
        for k, v in self._seg_losses(batch, logits).items():
            losses[f"main/{k}"] = v
        fake_logit = None
        losses["main/adv"] = logits.sum() * 0.0  # no pair: a graph-attached 0 (same keys every step)
        if img.numel():
            prob = torch.softmax(logits.float(), dim=1)[img, cls]  # (P, H, W) = S(x)_c
            adv_logit = self.pnet(masked_images(x, prob))  # Eq. 4: -log O_P(x * S(x)_c), fake labelled 1
            losses["main/adv"] = p.lambda_adv * F.binary_cross_entropy_with_logits(adv_logit.float(), torch.ones_like(adv_logit.float()))
            fake_logit = self.pnet(masked_images(x, prob.detach()))
        losses.update(self._disc_losses(real_logit, fake_logit))
        return losses

    def _disc_losses(self, real_logit: Tensor | None, fake_logit: Tensor | None) -> dict[str, Tensor]:
        """Eq. 3 as two terms; a missing side gives a graph-attached 0 over P-Net's parameters."""
        zero = sum(q.sum() * 0.0 for q in self.pnet.parameters())
        out = {"disc/real": zero, "disc/fake": zero}
        if real_logit is not None:
            out["disc/real"] = F.binary_cross_entropy_with_logits(real_logit.float(), torch.ones_like(real_logit.float()))
        if fake_logit is not None:
            out["disc/fake"] = F.binary_cross_entropy_with_logits(fake_logit.float(), torch.zeros_like(fake_logit.float()))
        return out

    def optimizer_groups(self, lr: float) -> list[OptimizerGroup]:
        """"main" (backbones at ``lr``, heads at 10x) and "disc" (P-Net at ``lr * disc_lr_mult``);
        a group with no trainable parameter in the current stage is left out."""
        groups: list[OptimizerGroup] = []
        main = self._main_param_groups(lr)
        if main:
            groups.append(OptimizerGroup("main", main))
        disc = [q for q in self.pnet.parameters() if q.requires_grad]
        if disc:
            groups.append(OptimizerGroup("disc", [{"params": disc, "lr": lr * self.params.disc_lr_mult}]))
        return groups


# ---------------------------------------------------------------------- L-Net map M for the engine
@torch.no_grad()
def lnet_map(method: LNet, images: Tensor) -> Tensor:
    """Class-agnostic foreground probability M = sigmoid(L-Net(x)) (Xiao et al. Sec. 3.1).

    Args:
        method: a trained :class:`LNet` / :class:`LNetPNet` (any stage; put in eval mode here).
        images: (N, 3, H, W) float images normalised with the L-Net backbone's mean/std.

    Returns:
        (N, H, W) float32 in [0, 1].
    """
    method.eval()
    return torch.sigmoid(method.lnet_logits(images).float())[:, 0]


def _normalise(rgb: np.ndarray, mean: Any, std: Any, device: torch.device | str) -> Tensor:
    x = torch.from_numpy(np.ascontiguousarray(rgb)).to(device).permute(2, 0, 1).float() / 255.0
    m = torch.tensor(mean, device=device)[:, None, None]
    s = torch.tensor(std, device=device)[:, None, None]
    return ((x - m) / s)[None]


class LNetMapStage:
    """Ray Data stage: adds an L-Net map column to image-store batches.

    ``ds.map_batches(LNetMapStage, fn_constructor_kwargs={"checkpoint": DIR}, batch_format="pyarrow"
    or "numpy", compute=ActorPoolStrategy(size=n))``. The model is loaded once per actor from a
    raysemiseg checkpoint directory of method ``lnet`` or ``lnet_pnet``.

    Input batch: ``image`` (encoded bytes). Output: the batch plus ``lnet_map``: encoded 8-bit PNG
    of round(M * 255) at the image's size (decode with
    :func:`raysemiseg.data.schema.decode_mask` and divide by 255).

    Raises:
        ValueError: the checkpoint's method has no L-Net.
    """

    def __init__(self, checkpoint: str | Path, device: str | None = None) -> None:
        from raysemiseg.train.checkpoint import load_method

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        method, _, meta = load_method(checkpoint, self.device)
        if not isinstance(method, LNet):
            raise ValueError(f"checkpoint {checkpoint} holds method {meta.get('method')!r}, which has no L-Net; "
                             "train 'lnet' or 'lnet_pnet' (stage lnet) first")
        self.method = method.eval()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from raysemiseg.data.schema import decode_image, encode_mask

        bb = self.method.lnet_backbone
        out = []
        for data in batch["image"]:
            rgb = decode_image(bytes(data))
            m = lnet_map(self.method, _normalise(rgb, bb.mean, bb.std, self.device))[0]
            out.append(encode_mask(np.round(m.cpu().numpy() * 255.0).astype(np.uint8)))
        batch = dict(batch)
        batch["lnet_map"] = np.array(out, dtype=object)
        return batch


# ---------------------------------------------------------------------- C3S reporting
def c3s_miou(iou: Any, space: LabelSpace, split_set: int) -> dict[str, float]:
    """Strong-class and weak-class mIoU of a C3S split-set (Xiao et al. 2018, Table 2's grey and
    white columns), from per-class IoU.

    Args:
        iou: (K,) per-class IoU (NaN = excluded), a :class:`raysemiseg.eval.metrics.SegMetrics`, or a
            dict of flat metrics with ``val_iou/<class name>`` / ``iou/<class name>`` keys (what the
            training loop reports; classes absent from the dict count as excluded).
        space: the run's label space; split_set: 1..4 (classes from
            :func:`raysemiseg.data.splits.c3s_classes`).

    Returns:
        ``{"strong_miou", "weak_miou", "fg_miou"}`` in [0, 1] (NaN where every class is excluded);
        ``fg_miou`` = over strong + weak classes (background excluded).
    """
    from raysemiseg.data.splits import c3s_classes
    from raysemiseg.eval.metrics import miou_over

    if isinstance(iou, dict):
        arr = np.full(space.num_classes, np.nan)
        for k, v in iou.items():
            name = k.split("/", 1)[1] if "/" in k and k.split("/", 1)[0] in ("val_iou", "iou") else None
            if name is not None and name in space:
                arr[space.index(name)] = float(v)
        iou = arr
    strong, weak = c3s_classes(split_set, space)
    return {"strong_miou": miou_over(iou, sorted(strong)), "weak_miou": miou_over(iou, sorted(weak)),
            "fg_miou": miou_over(iou, sorted(strong | weak))}
