"""Backbones: output shapes/strides/channels, packaged EfficientNet-Lite0 weights, the offline
weights error, and the LargeFOV head."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from raysemiseg.config import ConfigError, ModelConfig, load_config
from raysemiseg.models import BACKBONES, LargeFOVHead, MissingWeightsError, build_backbone, normalize
from raysemiseg.models.backbones import EfficientNetLite0, VGG16LargeFOV, efficientnet_lite0_weights_file

CHANNELS = {"tiny": 32, "efficientnet_lite0": 320, "vgg16_largefov": 512, "resnet101": 2048}


def test_registry_names() -> None:
    assert set(BACKBONES) == set(CHANNELS)
    with pytest.raises(KeyError, match="valid: \\['efficientnet_lite0', 'resnet101', 'tiny', 'vgg16_largefov'\\]"):
        build_backbone(ModelConfig.model_construct(backbone="nope", pretrained=False, output_stride=8, weights_path=None))
    with pytest.raises(ConfigError, match="unknown backbone 'nope'"):
        load_config({"data": {"store": "s"}, "model": {"backbone": "nope"}})


@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("name", sorted(CHANNELS))
def test_output_shape_and_stride(name: str, output_stride: int) -> None:
    bb = build_backbone(ModelConfig(backbone=name, pretrained=False, output_stride=output_stride)).eval()
    assert bb.out_channels == CHANNELS[name] and bb.output_stride == output_stride
    assert len(bb.mean) == 3 and len(bb.std) == 3
    h, w = 65, 49
    with torch.no_grad():
        y = bb(torch.randn(1, 3, h, w))
    assert y.shape == (1, CHANNELS[name], math.ceil(h / output_stride), math.ceil(w / output_stride))
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", ["tiny", "efficientnet_lite0"])
def test_output_stride_32(name: str) -> None:
    bb = build_backbone(ModelConfig(backbone=name, pretrained=False, output_stride=32)).eval()
    with torch.no_grad():
        assert bb(torch.randn(1, 3, 64, 64)).shape[-2:] == (2, 2)


def test_bad_output_stride() -> None:
    with pytest.raises(ValueError, match="output_stride 4 not supported; valid: \\[8, 16, 32\\]"):
        VGG16LargeFOV(output_stride=4, pretrained=False)


def test_efficientnet_lite0_loads_packaged_imagenet_weights() -> None:
    path = efficientnet_lite0_weights_file()
    assert path.name == "efficientnet-lite0-57934424.pth" and path.is_file()
    sd = torch.load(path, map_location="cpu", weights_only=True)
    bb = build_backbone(ModelConfig(backbone="efficientnet_lite0", pretrained=True, output_stride=8))
    torch.testing.assert_close(bb._conv_stem.weight, sd["_conv_stem.weight"], rtol=0, atol=0)
    torch.testing.assert_close(bb._blocks[11]._depthwise_conv.weight, sd["_blocks.11._depthwise_conv.weight"], rtol=0, atol=0)
    torch.testing.assert_close(bb._blocks[15]._bn2.running_var, sd["_blocks.15._bn2.running_var"], rtol=0, atol=0)
    # os 8: blocks 5 and 11 keep stride 1; dilation 2 from block 6, 4 from block 12
    assert list(bb._blocks[5]._depthwise_conv.stride) == [1, 1] and list(bb._blocks[11]._depthwise_conv.stride) == [1, 1]
    assert [tuple(b._depthwise_conv.dilation)[0] for b in bb._blocks] == [1] * 6 + [2] * 6 + [4] * 4
    assert list(bb._blocks[3]._depthwise_conv.stride) == [2, 2]


def test_efficientnet_dilated_matches_native_network_at_os32() -> None:
    """At output stride 32 the backbone is exactly the package's network up to its last block."""
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    net.load_state_dict(torch.load(efficientnet_lite0_weights_file(), map_location="cpu", weights_only=True))
    net.eval()
    bb = EfficientNetLite0(output_stride=32, pretrained=True).eval()
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        ref = net._swish(net._bn0(net._conv_stem(x)))
        for block in net._blocks:
            ref = block(ref)
        torch.testing.assert_close(bb(x), ref)


@pytest.mark.parametrize("name,filename", [("vgg16_largefov", "vgg16-397923af.pth"), ("resnet101", "resnet101-63fe2227.pth")])
def test_missing_torchvision_weights_error(name: str, filename: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty hub cache
    with pytest.raises(MissingWeightsError) as e:
        build_backbone(ModelConfig(backbone=name, pretrained=True))
    msg = str(e.value)
    assert filename in msg and str(tmp_path / "torch" / "hub" / "checkpoints") in msg
    assert "pretrained: false" in msg and "weights_path" in msg and "https://download.pytorch.org/models/" in msg
    with pytest.raises(MissingWeightsError, match="does not exist"):
        build_backbone(ModelConfig(backbone=name, pretrained=True, weights_path=str(tmp_path / "no.pth")))


def test_vgg16_largefov_structure_and_weights_path(tmp_path: Path) -> None:
    bb = VGG16LargeFOV(output_stride=8, pretrained=False)
    pools = [m for m in bb.features if isinstance(m, nn.MaxPool2d)]
    assert [p.stride for p in pools] == [2, 2, 2, 1, 1] and all(p.kernel_size == 3 and p.padding == 1 for p in pools)
    convs = [m for m in bb.features if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13 and [c.dilation[0] for c in convs] == [1] * 10 + [2] * 3
    # a torchvision-format checkpoint (features.* keys) given by path loads into the trunk
    src = VGG16LargeFOV(output_stride=8, pretrained=False)
    path = tmp_path / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in src.features.state_dict().items()}, path)
    loaded = build_backbone(ModelConfig(backbone="vgg16_largefov", pretrained=True, weights_path=str(path)))
    torch.testing.assert_close(loaded.features[28].weight, src.features[28].weight, rtol=0, atol=0)


def test_normalize() -> None:
    bb = build_backbone(ModelConfig(backbone="tiny", pretrained=False))
    x = torch.tensor(bb.mean).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    assert normalize(x, bb).abs().max() < 1e-6


def test_largefov_head() -> None:
    head = LargeFOVHead(32, 21, hidden=16, dilation=12, dropout=0.5)
    assert head.fc6.dilation == (12, 12) and head.fc6.padding == (12, 12) and head.fc6.kernel_size == (3, 3)
    assert head.fc7.kernel_size == (1, 1) and head.fc8.out_channels == 21
    assert head.fc8.bias.abs().sum() == 0 and head.fc8.weight.std() < 0.02
    assert head(torch.randn(2, 32, 9, 7)).shape == (2, 21, 9, 7)
    with pytest.raises(ValueError, match="dropout"):
        LargeFOVHead(32, 21, dropout=1.0)
    with pytest.raises(ValueError, match="num_classes=0"):
        LargeFOVHead(32, 0)


@pytest.mark.parametrize("frozen", [True, False])
def test_freeze_bn_keeps_statistics_and_affine_fixed(frozen: bool) -> None:
    """``model.freeze_bn``: after a training step (``train()`` mode, SGD) a frozen backbone's BatchNorm
    running mean/var and weight/bias are bit-identical to before, while its convolutions moved; an
    unfrozen one updates both (the running mean of the first BN moves towards the batch mean)."""
    torch.manual_seed(0)
    bb = build_backbone(ModelConfig(backbone="tiny", pretrained=False, output_stride=8, freeze_bn=frozen))
    bns = [m for m in bb.modules() if isinstance(m, nn.BatchNorm2d)]
    convs = [m for m in bb.modules() if isinstance(m, nn.Conv2d)]
    before = [(m.running_mean.clone(), m.running_var.clone(), m.weight.detach().clone()) for m in bns]
    conv_before = convs[0].weight.detach().clone()
    bb.train()
    bb.requires_grad_(True)   # methods toggle the whole backbone when they change stage
    bb.train()
    assert all(m.training is not frozen for m in bns)
    opt = torch.optim.SGD([p for p in bb.parameters() if p.requires_grad], lr=0.1)
    bb(torch.randn(4, 3, 32, 32) + 2.0).square().mean().backward()
    opt.step()
    moved_stats = [not torch.equal(b[0], m.running_mean) for b, m in zip(before, bns)]
    moved_affine = [not torch.equal(b[2], m.weight.detach()) for b, m in zip(before, bns)]
    assert not torch.equal(conv_before, convs[0].weight.detach())
    if frozen:
        assert not any(moved_stats) and not any(moved_affine)
    else:
        assert all(moved_stats) and all(moved_affine)


def test_freeze_at_stops_gradients_and_statistics_of_the_first_stages() -> None:
    """``model.freeze_at=2`` on the tiny backbone (os 8: 3 stride-2 conv-BN-ReLU stages + 1 stride-1 stage):
    after one SGD step the first 2 stages' conv weights and BN running means are bit-identical and got no
    gradient, stages 3 and 4 moved; the freeze survives the whole-backbone ``requires_grad_(True)`` that
    methods issue on a stage change (``train()`` re-applies it). 5 stages is too many for it."""
    torch.manual_seed(0)
    bb = build_backbone(ModelConfig(backbone="tiny", pretrained=False, output_stride=8, freeze_at=2))
    stages = bb.stages()
    assert len(stages) == 4 and [len(s) for s in stages] == [3, 3, 3, 3]
    convs = [s[0] for s in stages]
    bns = [s[1] for s in stages]
    w0 = [c.weight.detach().clone() for c in convs]
    m0 = [b.running_mean.clone() for b in bns]
    bb.requires_grad_(True)
    bb.train()
    assert [b.training for b in bns] == [False, False, True, True]
    opt = torch.optim.SGD([p for p in bb.parameters() if p.requires_grad], lr=0.1)
    bb(torch.randn(4, 3, 32, 32) + 2.0).square().mean().backward()
    opt.step()
    assert [c.weight.grad is None for c in convs] == [True, True, False, False]
    assert [torch.equal(w, c.weight.detach()) for w, c in zip(w0, convs)] == [True, True, False, False]
    assert [torch.equal(m, b.running_mean) for m, b in zip(m0, bns)] == [True, True, False, False]
    with pytest.raises(ValueError, match=r"freeze_at 5: backbone TinyBackbone has 4 stages \(valid 0..4\)"):
        bb.set_freeze_at(5)


def test_efficientnet_stages_partition_the_blocks() -> None:
    """EfficientNet-Lite0's 8 stages: the stem, then blocks 0 | 1-2 | 3-4 | 5-7 | 8-10 | 11-14 | 15 (the
    native 16/24/40/80/112/192/320-channel stages), every block exactly once and in order."""
    bb = EfficientNetLite0(output_stride=16, pretrained=False)
    stages = bb.stages()
    assert len(stages) == 8 and stages[0][0] is bb._conv_stem
    blocks = [b for s in stages[1:] for b in s]
    assert len(blocks) == 16 and all(a is b for a, b in zip(blocks, bb._blocks))
    assert [int(s[-1]._block_args.output_filters) for s in stages[1:]] == [16, 24, 40, 80, 112, 192, 320]


def test_space_to_batch_conv_hand_checked() -> None:
    """3x3 kernel of ones, dilation 2, "same" zero padding, on a 3x3 image of ones: a pixel sums the
    taps at offsets {-2, 0, 2}^2 that fall inside, 4 at the corners, 2 on the edges, 1 in the centre."""
    from raysemiseg.models.backbones import SpaceToBatchConv2d

    conv = SpaceToBatchConv2d(1, 1, 3, dilation=2, groups=1, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    out = conv(torch.ones(1, 1, 3, 3))
    assert out[0, 0].tolist() == [[4.0, 2.0, 4.0], [2.0, 1.0, 2.0], [4.0, 2.0, 4.0]]


@pytest.mark.parametrize("mode", ["space_to_batch", "dilated"])
@pytest.mark.parametrize("k,d,size", [(5, 2, (12, 12)), (5, 2, (13, 20)), (3, 2, (7, 9)), (3, 4, (12, 11)),
                                      (5, 4, (3, 5)), (3, 2, (1, 1))])
def test_space_to_batch_conv_equals_dilated_depthwise_conv(k: int, d: int, size: tuple[int, int], mode: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The space-to-batch form of the dilated depthwise conv (DeepLab's atrous trick) gives torch's
    dilated "same" convolution, its input gradient and its weight gradient, on any H, W; so does the
    ``RAYSEMISEG_ATROUS=dilated`` switch."""
    import torch.nn.functional as F

    from raysemiseg.models import backbones
    from raysemiseg.models.backbones import SpaceToBatchConv2d

    monkeypatch.setattr(backbones, "ATROUS_CPU", mode)

    torch.manual_seed(0)
    c = 6
    conv = SpaceToBatchConv2d(c, c, k, dilation=d, groups=c, bias=False)
    x = torch.randn(2, c, *size, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    w_ref = conv.weight.detach().clone().requires_grad_()
    p = (k - 1) * d  # TF "same", stride 1
    ref = F.conv2d(F.pad(x_ref, [p // 2, p - p // 2, p // 2, p - p // 2]), w_ref, dilation=d, groups=c)
    out = conv(x)
    assert out.shape == (2, c, *size)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(conv.weight.grad, w_ref.grad, rtol=1e-4, atol=1e-4)


def test_efficientnet_dilated_blocks_use_space_to_batch_and_keep_weight_names() -> None:
    """os 16: blocks 12..15 (dilation 2) run their depthwise conv in space-to-batch form; the
    parameter names are the package's (the ImageNet state dict loads), blocks 0..11 are unchanged."""
    from raysemiseg.models.backbones import SpaceToBatchConv2d

    bb = EfficientNetLite0(output_stride=16, pretrained=False)
    kinds = [isinstance(b._depthwise_conv, SpaceToBatchConv2d) for b in bb._blocks]
    assert kinds == [False] * 12 + [True] * 4
    assert "_blocks.12._depthwise_conv.weight" in bb.state_dict()


def test_unknown_atrous_switch_fails_at_import_naming_the_values() -> None:
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "import raysemiseg.models.backbones"], capture_output=True, text=True,
                          env={**os.environ, "RAYSEMISEG_ATROUS": "fast"}, timeout=120)
    assert proc.returncode != 0
    assert "RAYSEMISEG_ATROUS='fast': valid are 'space_to_batch' (default) and 'dilated'" in proc.stderr
