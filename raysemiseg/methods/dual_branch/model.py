"""Strong-weak dual-branch network (Luo & Yang, "Semi-supervised semantic segmentation via
strong-weak dual-branch network", ECCV 2020) and the paper's baselines, on the shared protocol.

Architecture (``dual_branch``)::

    backbone -> neck layer 1 .. n (shared) -+-> neck layers n+1..3 -> 1x1 classifier  (strong branch)
                                            +-> neck layers n+1..3 -> 1x1 classifier  (weak branch)

The neck has three 3x3 conv + ReLU layers (``neck_channels`` wide, dilation ``neck_dilation``);
the first ``neck_depth`` = n (0..3) are shared, the rest are duplicated per branch with separate
parameters, so both branches have identical structure. Strong rows go through the strong branch
only, weak rows through the weak branch only (so neither kind of row sends a gradient into the
other branch); loss = CE(strong branch, strong masks) + CE(weak branch, weak pseudo labels from
``batch.pseudo``), equal weights (Eq. 3, each CE normalised by its own mask, Eq. 2). With
``weak_branch_rows: all`` strong rows also train the weak branch (Table 1's "strong + weak"
weak-branch data), with their mask (default) or their pseudo label
(``weak_branch_strong_target``). Inference uses the strong branch only. Batches of 2k rows with
k strong + k weak (strong rows oversampled) are the run config's ``data.strong_fraction: 0.5``.

Optimisation (paper): Adam, 1e-4 for neck and branches, 5e-6 for the backbone, expressed as
learning-rate multipliers of ``optim.lr`` (``backbone_lr_mult = 0.05`` with ``optim.lr: 1e-4``).

Baselines in the same code:

* single-branch strong-only: the ``strong_only`` method, or ``single_branch_mixed`` with
  ``use_weak: false`` (same neck as here);
* single-branch mixed (``single_branch_mixed``): one branch, one CE over strong masks and weak
  pseudo labels bundled together (the setting the paper shows can fall below strong-only);
* two separate networks averaged with weight lambda (Eq. 4): train ``single_branch_mixed`` once
  with ``use_weak: false`` and once with ``use_strong: false``, then evaluate
  :class:`LambdaEnsemble` (``predict`` = log of ``lam * p_weak + (1 - lam) * p_strong``: Eq. 4,
  lambda on the weak network, paper's best 0.4).

``neck_depth`` has no paper default here (the paper ablates n); 2 is this project's choice —
sweep it (``configs/sweeps/dual_branch_neck.yaml``).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from raysemiseg.labels import LabelSpace
from raysemiseg.methods.base import Batch, Method, MethodParams, OptimizerGroup, register
from raysemiseg.methods.dual_branch.losses import dual_branch_loss, lambda_average
from raysemiseg.methods.wssl.losses import masked_cross_entropy, upsample_to

NECK_LAYERS = 3


def neck_layer(in_channels: int, out_channels: int, dilation: int = 1) -> nn.Sequential:
    """One neck layer: 3x3 conv (padding = dilation, keeps H, W) + ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=dilation, dilation=dilation),
        nn.ReLU(inplace=True),
    )


class Branch(nn.Module):
    """The non-shared part of a branch: neck layers ``n+1..3`` then a 1x1 classifier.

    Args:
        in_channels: channels entering the branch (backbone's when n = 0, else neck width).
        channels: neck width.
        num_layers: 3 - n.
        num_classes: K.
        dilation: neck dilation.
    """

    def __init__(self, in_channels: int, channels: int, num_layers: int, num_classes: int, dilation: int = 1) -> None:
        super().__init__()
        layers = []
        c = in_channels
        for _ in range(num_layers):
            layers.append(neck_layer(c, channels, dilation))
            c = channels
        self.neck = nn.Sequential(*layers)
        self.classifier = nn.Conv2d(c, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        """(N, C_in, h, w) -> (N, K, h, w) logits."""
        return self.classifier(self.neck(x))


class NeckParams(MethodParams):
    """Neck and optimiser knobs shared by ``dual_branch`` and ``single_branch_mixed``.

    Attributes:
        neck_channels: width of the three neck conv layers.
        neck_dilation: dilation of the neck's 3x3 convs.
        backbone_lr_mult: backbone lr = ``optim.lr * backbone_lr_mult`` (paper 5e-6 / 1e-4).
        head_lr_mult: neck + branches lr = ``optim.lr * head_lr_mult`` (paper 1e-4 / 1e-4).
        optimizer: optimizer kind for this method's group ("adam" in the paper).
    """

    neck_channels: int = Field(512, ge=1)
    neck_dilation: int = Field(1, ge=1)
    backbone_lr_mult: float = Field(0.05, gt=0.0)
    head_lr_mult: float = Field(1.0, gt=0.0)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"


class DualBranchParams(NeckParams):
    """``dual_branch`` knobs.

    Attributes:
        neck_depth: n, the number of shared neck layers (0..3).
        weak_weight: weight of the weak branch's CE (1 = the paper's equal weights).
        weak_branch_rows: which rows train the weak branch: ``"weak"`` (weak rows only) or
            ``"all"`` (strong rows too: Luo & Yang Table 1's main setups, weak branch on
            "strong + weak" images). Strong rows always train the strong branch.
        weak_branch_strong_target: the target a strong row gives the weak branch with
            ``weak_branch_rows="all"``: ``"mask"`` (default: its pixel mask; Table 1 names the
            weak branch's data by annotation kind, "1.4k strong + 9k weak", "10k strong", so strong
            images bring their masks) or ``"pseudo"`` (its label-store pseudo label, the generator
            G's proxy label, as for weak rows; the label store must then cover strong rows).
    """

    neck_depth: int = Field(2, ge=0, le=NECK_LAYERS)
    weak_weight: float = Field(1.0, ge=0.0)
    weak_branch_rows: Literal["weak", "all"] = "weak"
    weak_branch_strong_target: Literal["mask", "pseudo"] = "mask"

    def pseudo_label_roles(self) -> tuple[str, ...]:
        """Row roles whose training target is a label-store pseudo label (``batch.pseudo``): the
        data plan refuses a run whose rows of these roles are not covered by ``data.label_store``."""
        if self.weak_branch_rows == "all" and self.weak_branch_strong_target == "pseudo":
            return ("weak", "strong")
        return ("weak",)


class _NeckMethod(Method):
    """Common parts: backbone, optimizer groups with the paper's lr multipliers."""

    def optimizer_groups(self, lr: float) -> list[OptimizerGroup]:
        """One "main" group: backbone at ``lr * backbone_lr_mult``, the rest at ``lr * head_lr_mult``,
        optimizer ``params.optimizer`` (Adam in the paper)."""
        p = self.params
        backbone = [q for n, q in self.named_parameters() if n.startswith("backbone.") and q.requires_grad]
        rest = [q for n, q in self.named_parameters() if not n.startswith("backbone.") and q.requires_grad]
        groups = [{"params": backbone, "lr": lr * p.backbone_lr_mult}] if backbone else []
        groups.append({"params": rest, "lr": lr * p.head_lr_mult})
        return [OptimizerGroup("main", groups, optimizer=p.optimizer)]


@register
class DualBranch(_NeckMethod):
    """``dual_branch``: strong and weak branches on a partially shared neck (Luo & Yang 2020).

    Args:
        label_space: K classes.
        model: :class:`raysemiseg.config.ModelConfig`.
        params: :class:`DualBranchParams`.
    """

    name: ClassVar[str] = "dual_branch"
    Params: ClassVar[type[MethodParams]] = DualBranchParams
    uses: ClassVar[tuple[str, ...]] = ("pixel", "image")  # weak targets come from batch.pseudo

    def __init__(self, label_space: LabelSpace, model: Any, params: DualBranchParams | None = None) -> None:
        super().__init__(label_space, model, params)
        from raysemiseg.models.backbones import build_backbone

        p = self.params
        self.backbone = build_backbone(model)
        n = p.neck_depth
        c_in = self.backbone.out_channels
        shared = []
        for i in range(n):
            shared.append(neck_layer(c_in if i == 0 else p.neck_channels, p.neck_channels, p.neck_dilation))
        self.shared_neck = nn.Sequential(*shared)
        c_branch = c_in if n == 0 else p.neck_channels
        self.strong_branch = Branch(c_branch, p.neck_channels, NECK_LAYERS - n, self.num_classes, p.neck_dilation)
        self.weak_branch = Branch(c_branch, p.neck_channels, NECK_LAYERS - n, self.num_classes, p.neck_dilation)

    def neck_path(self, branch: Literal["strong", "weak"]) -> list[nn.Module]:
        """The three neck layers (modules, in order) that ``branch``'s input passes through;
        the first ``neck_depth`` are the same objects for both branches."""
        b = self.strong_branch if branch == "strong" else self.weak_branch
        return list(self.shared_neck) + list(b.neck)

    def features(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) -> (N, C, H/os, W/os) output of the shared part (backbone + shared neck)."""
        return self.shared_neck(self.backbone(images))

    def predict(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) -> (N, K, H, W) strong-branch logits (inference uses the strong branch only)."""
        return upsample_to(self.strong_branch(self.features(images)), tuple(images.shape[-2:]))

    def predict_weak(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) -> (N, K, H, W) weak-branch logits (for inspection, not used in eval)."""
        return upsample_to(self.weak_branch(self.features(images)), tuple(images.shape[-2:]))

    def compute_losses(self, batch: Batch) -> dict[str, Tensor]:
        """``{"strong_ce", "weak_ce"}`` (Eq. 3): strong rows through the strong branch against their
        masks; weak rows (and, with ``weak_branch_rows="all"``, strong rows with the target
        ``weak_branch_strong_target``) through the weak branch against ``batch.pseudo``. Each CE is
        normalised by its own labelled pixels (Eq. 2)."""
        p = self.params
        strong = batch.is_strong.to(torch.bool)
        feats = self.features(batch.images)
        ig = self.ignore_index
        weak_t = batch.pseudo
        if p.weak_branch_rows == "all" and p.weak_branch_strong_target == "mask":
            weak_t = torch.where(strong.view(-1, 1, 1), batch.masks, batch.pseudo)
        weak_rows = ~strong if p.weak_branch_rows == "weak" else torch.ones_like(strong)
        return dual_branch_loss(
            self.strong_branch(feats[strong]), batch.masks[strong],
            self.weak_branch(feats[weak_rows]), weak_t[weak_rows],
            ignore_index=ig, weak_weight=p.weak_weight,
        )


class SingleBranchParams(NeckParams):
    """``single_branch_mixed`` knobs.

    Attributes:
        use_strong: train on strong rows' masks.
        use_weak: train on weak rows' pseudo labels (``batch.pseudo``).
    """

    use_strong: bool = True
    use_weak: bool = True

    def pseudo_label_roles(self) -> tuple[str, ...]:
        """Row roles trained on label-store pseudo labels (see :meth:`DualBranchParams.pseudo_label_roles`)."""
        return ("weak",) if self.use_weak else ()


@register
class SingleBranchMixed(_NeckMethod):
    """``single_branch_mixed``: the dual-branch network's baseline with one branch (backbone +
    the same three-layer neck + classifier) and ONE cross-entropy over strong masks and weak
    pseudo labels bundled together (mean over all labelled pixels of the batch).

    ``use_weak: false`` gives single-branch strong-only; ``use_strong: false`` the weak-only
    network of the Eq. 4 two-network baseline.
    """

    name: ClassVar[str] = "single_branch_mixed"
    Params: ClassVar[type[MethodParams]] = SingleBranchParams
    uses: ClassVar[tuple[str, ...]] = ("pixel", "image")  # weak targets come from batch.pseudo

    def __init__(self, label_space: LabelSpace, model: Any, params: SingleBranchParams | None = None) -> None:
        super().__init__(label_space, model, params)
        from raysemiseg.models.backbones import build_backbone

        p = self.params
        if not (p.use_strong or p.use_weak):
            raise ValueError("single_branch_mixed: at least one of use_strong / use_weak must be true")
        self.backbone = build_backbone(model)
        self.branch = Branch(self.backbone.out_channels, p.neck_channels, NECK_LAYERS, self.num_classes,
                             p.neck_dilation)

    def predict(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) -> (N, K, H, W) logits."""
        return upsample_to(self.branch(self.backbone(images)), tuple(images.shape[-2:]))

    def compute_losses(self, batch: Batch) -> dict[str, Tensor]:
        """``{"mixed_ce"}``: one CE over strong rows' masks and weak rows' pseudo labels."""
        strong = batch.is_strong.to(torch.bool)
        ig = self.ignore_index
        target = torch.full_like(batch.masks, ig)
        if self.params.use_strong:
            target[strong] = batch.masks[strong]
        if self.params.use_weak:
            target[~strong] = batch.pseudo[~strong]
        return {"mixed_ce": masked_cross_entropy(self.branch(self.backbone(batch.images)), target, ig)}


class LambdaEnsemble(nn.Module):
    """Two separately trained networks averaged with weight lambda (Luo & Yang Eq. 4).

    Args:
        strong: a method trained on strong rows (its ``predict`` gives logits).
        weak: a method trained on weak rows' pseudo labels.
        lam: lambda of Eq. 4, the weight of the WEAK network's probabilities, in [0, 1]
            (``F = lam * F_w + (1 - lam) * F_s``; default 0.4, the paper's best value).

    ``predict`` returns log-probabilities (a valid logit input to argmax / softmax), so the
    ensemble can be evaluated wherever a method's ``predict`` is.
    """

    def __init__(self, strong: nn.Module, weak: nn.Module, lam: float = 0.4) -> None:
        super().__init__()
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lambda must be in [0, 1], got {lam}")
        self.strong, self.weak, self.lam = strong, weak, float(lam)
        self.label_space = getattr(strong, "label_space", None)
        self.num_classes = getattr(strong, "num_classes", None)

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) -> (N, K, H, W) ``log(lam * softmax(weak) + (1 - lam) * softmax(strong))`` (Eq. 4)."""
        ps = self.strong.predict(images).float().softmax(dim=1)
        pw = self.weak.predict(images).float().softmax(dim=1)
        return lambda_average(ps, pw, self.lam).clamp_min(1e-12).log()

    def forward(self, images: Tensor) -> Tensor:
        return self.predict(images)


__all__ = ["Branch", "DualBranch", "DualBranchParams", "LambdaEnsemble", "SingleBranchMixed",
           "SingleBranchParams", "neck_layer"]
