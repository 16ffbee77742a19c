"""L-Net / P-Net (Xiao et al. 2018): Eq. 1 target, P-Net = Table 1, adversarial groups
(Eq. 3-5), stages, and the L-Net map M from a checkpoint."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from raysemiseg.config import ModelConfig, load_config
from raysemiseg.data.schema import decode_mask, encode_image
from raysemiseg.labels import builtin
from raysemiseg.methods import Batch, get_method
from raysemiseg.methods.lpnet import LNet, LNetMapStage, LNetParams, LNetPNet, LNetPNetParams, PNet, class_agnostic_target, lnet_map

SPACE = builtin("voc21")
MODEL = ModelConfig(backbone="tiny", pretrained=False, output_stride=8)


def batch(size: int = 64) -> Batch:
    g = torch.Generator().manual_seed(3)
    truth = torch.zeros(2, size, size, dtype=torch.long)
    truth[0, 8:40, 8:40] = 5
    truth[1, 20:60, 10:30] = 9
    truth[:, :2] = 255
    labels = torch.zeros(2, SPACE.num_classes)
    labels[:, 0] = 1
    labels[0, 5] = 1
    labels[1, 9] = 1
    masks = truth.clone()
    masks[1] = 255
    pseudo = torch.full_like(truth, 255)
    pseudo[1] = truth[1]
    return Batch(images=torch.randn(2, 3, size, size, generator=g), masks=masks, pseudo=pseudo,
                 image_labels=labels, is_strong=torch.tensor([True, False]))


def make(cls=LNetPNet, **kw):
    torch.manual_seed(0)
    P = LNetPNetParams if cls is LNetPNet else LNetParams
    return cls(SPACE, MODEL, P(head_hidden=16, **kw))


def test_registered() -> None:
    assert get_method("lnet") is LNet and get_method("lnet_pnet") is LNetPNet


def test_pnet_layers_match_table_1() -> None:
    """Six 3x3 convs 16-32-64-64-128-128, three 2x2 pools, fc 256-512-1."""
    net = PNet(64)
    convs = [m for m in net.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 32, 64, 64, 128, 128]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    pools = [m for m in net.features if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 3 and all(p.kernel_size == 2 for p in pools)
    fcs = [m for m in net.classifier if isinstance(m, nn.Linear)]
    assert [f.out_features for f in fcs] == [256, 512, 1]
    x = torch.randn(4, 3, 64, 64)
    assert net.features(x).shape == (4, 128, 8, 8)
    assert net(x).shape == (4,)
    assert net(torch.randn(2, 3, 50, 70)).shape == (2,)  # any input size is resized to S x S


def test_class_agnostic_target() -> None:
    m = torch.tensor([[0, 3, 255], [7, 0, 0]])
    assert class_agnostic_target(m, 0).tolist() == [[0, 1, 255], [1, 0, 0]]


def test_lnet_stages() -> None:
    m = make(LNet)
    m.set_stage("lnet")
    m.train()
    losses = m.compute_losses(batch())
    assert set(losses) == {"lnet"}
    losses["lnet"].backward()
    assert all(p.grad is None for p in m.backbone.parameters())
    assert all(p.grad is not None for p in m.lnet_backbone.parameters())
    m.zero_grad()
    m.set_stage("segment")
    losses = m.compute_losses(batch())
    assert set(losses) == {"seg_strong", "seg_weak"} and losses["seg_weak"] > 0  # weak row's pseudo labels used
    sum(losses.values()).backward()
    assert all(p.grad is None for p in m.lnet_head.parameters())


def test_adversarial_groups_are_separated() -> None:
    """disc/* (Eq. 3) never reaches the segmentation net; main/adv (Eq. 4-5) does."""
    m = make(lambda_adv=0.5)
    m.set_stage("joint")
    m.train()
    groups = {g.name: {id(p) for d in g.params for p in d["params"]} for g in m.optimizer_groups(0.01)}
    assert set(groups) == {"main", "disc"}
    assert groups["disc"] == {id(p) for p in m.pnet.parameters()}
    assert not groups["main"] & groups["disc"]
    losses = m.compute_losses(batch())
    assert set(losses) == {"main/seg_strong", "main/seg_weak", "main/adv", "disc/real", "disc/fake"}
    (losses["disc/real"] + losses["disc/fake"]).backward()
    assert all(p.grad is None for p in m.head.parameters())
    assert all(p.grad is not None for p in m.pnet.parameters())
    m.zero_grad()
    losses = m.compute_losses(batch())
    losses["main/adv"].backward()
    assert all(p.grad is not None for p in m.head.parameters())


def test_pretrain_pnet_trains_pnet_only() -> None:
    m = make()
    m.set_stage("pretrain_pnet")
    m.train()
    assert [g.name for g in m.optimizer_groups(0.01)] == ["disc"]
    losses = m.compute_losses(batch())
    assert set(losses) == {"disc/real", "disc/fake"}
    gt = torch.zeros(2, 16, 16)
    gt[0, 2:6, 3:9] = 1
    gt[1, 5:12, 4:8] = 1
    fake = m._corrupted(gt)
    assert fake[0].sum() == 24 and fake[0, 2:6, 3:9].all()  # bounding box (already a box here)
    assert fake[1].sum() == gt[1].sum() and not torch.equal(fake[1], gt[1])  # shifted


def test_lnet_map_from_checkpoint(tmp_path) -> None:
    """M in [0, 1] at image size, from a checkpoint written by the training helper's code."""
    from raysemiseg.train.checkpoint import save_checkpoint

    m = make(LNet)
    imgs = torch.randn(2, 3, 40, 56)
    M = lnet_map(m, imgs)
    assert M.shape == (2, 40, 56) and (M >= 0).all() and (M <= 1).all()
    cfg = load_config({"data": {"store": str(tmp_path / "store")}, "model": MODEL.model_dump(),
                       "method": {"name": "lnet", "stage": "lnet", "params": {"head_hidden": 16}}})
    save_checkpoint(tmp_path / "ckpt", m, cfg, SPACE)
    stage = LNetMapStage(str(tmp_path / "ckpt"), device="cpu")
    rgb = (np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)
    out = stage({"image_id": np.array(["x"], dtype=object), "image": np.array([encode_image(rgb, "png")], dtype=object)})
    got = decode_mask(out["lnet_map"][0]) / 255.0
    bb = m.lnet_backbone
    x = (torch.from_numpy(rgb).permute(2, 0, 1).float() / 255 - torch.tensor(bb.mean)[:, None, None]) / torch.tensor(bb.std)[:, None, None]
    want = lnet_map(m, x[None])[0].numpy()
    assert got.shape == (40, 56)
    assert np.abs(got - want).max() <= 1 / 255 + 1e-6


def test_c3s_miou_strong_vs_weak() -> None:
    """Split-set 1: strong = bicycle, boat, bus, car, cat, chair, cow, diningtable, person, tvmonitor."""
    from raysemiseg.methods.lpnet import c3s_miou

    iou = np.full(21, np.nan)
    iou[0] = 0.9
    iou[SPACE.index("cat")] = 0.6
    iou[SPACE.index("person")] = 0.4
    iou[SPACE.index("dog")] = 0.2
    r = c3s_miou(iou, SPACE, 1)
    assert np.isclose(r["strong_miou"], 0.5) and np.isclose(r["weak_miou"], 0.2)
    assert np.isclose(r["fg_miou"], 0.4)
    flat = {"val_miou": 0.5, "val_iou/cat": 0.6, "val_iou/person": 0.4, "val_iou/dog": 0.2, "val_iou/background": 0.9}
    assert c3s_miou(flat, SPACE, 1) == r
