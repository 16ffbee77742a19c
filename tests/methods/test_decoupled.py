"""DecoupledNet (Hong et al. 2015): saliency (Eq. 3) against finite differences, the per-label
merge, unpooling switches, and what each stage trains."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from raysemiseg.config import ModelConfig
from raysemiseg.labels import builtin
from raysemiseg.methods import Batch, get_method
from raysemiseg.methods.decoupled import DecoupledNet, DecoupledParams, class_saliency
from raysemiseg.methods.decoupled.losses import ABSENT_LOGIT, binary_targets, combine_binary_maps, present_pairs
from raysemiseg.methods.decoupled.model import _ClassifierHead

SPACE = builtin("voc21")
MODEL = ModelConfig(backbone="tiny", pretrained=False, output_stride=8)
SMALL = DecoupledParams(width=16, fc_width=16, bridge_width=16)


def make(params: DecoupledParams = SMALL) -> DecoupledNet:
    torch.manual_seed(0)
    return DecoupledNet(SPACE, MODEL, params)


def batch(size: int = 64) -> Batch:
    """Row 0 strong (cat=8 and dog=12 rectangles), row 1 strong (person=15), row 2 weak (cat)."""
    g = torch.Generator().manual_seed(1)
    masks = torch.zeros(3, size, size, dtype=torch.long)
    masks[0, 4:30, 4:30] = 8
    masks[0, 34:60, 30:60] = 12
    masks[1, 10:50, 20:40] = 15
    masks[:, 0, :] = 255
    masks[2] = 255
    labels = torch.zeros(3, SPACE.num_classes)
    labels[:, 0] = 1
    labels[0, [8, 12]] = 1
    labels[1, 15] = 1
    labels[2, 8] = 1
    return Batch(images=torch.randn(3, 3, size, size, generator=g), masks=masks,
                 pseudo=torch.full_like(masks, 255), image_labels=labels,
                 is_strong=torch.tensor([True, True, False]), image_ids=["a", "b", "c"])


def test_registered() -> None:
    assert get_method("decoupled") is DecoupledNet
    assert DecoupledNet.STAGES == ("default", "classify", "segment")


def test_saliency_equals_finite_differences() -> None:
    """f_cls^l = dS_l/df(pool5) (Eq. 3), single label and label subset, vs central differences."""
    torch.manual_seed(0)
    head = _ClassifierHead(4, 6, 3).double()
    feats = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    pair_img = torch.tensor([0, 1, 1])
    w = torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 1.0]], dtype=torch.float64)  # last = subset {1, 2}
    sal = class_saliency(head, feats, pair_img, w)
    assert sal.shape == (3, 4, 3, 3)
    eps = 1e-6
    for p in range(3):
        x = feats[pair_img[p]].clone()
        fd = torch.zeros_like(x)
        for idx in range(x.numel()):
            xp, xm = x.clone().view(-1), x.clone().view(-1)
            xp[idx] += eps
            xm[idx] -= eps
            sp = (head(xp.view(1, *x.shape)) * w[p]).sum()
            sm = (head(xm.view(1, *x.shape)) * w[p]).sum()
            fd.view(-1)[idx] = (sp - sm) / (2 * eps)
        assert torch.allclose(sal[p], fd, atol=1e-7), (p, (sal[p] - fd).abs().max())
    # the features themselves are left untouched (no grad attached)
    assert feats.grad is None


def test_saliency_is_spatially_varying_in_the_model() -> None:
    m = make().double()
    pool5, _, _ = m.classify_features(torch.randn(1, 3, 128, 128, dtype=torch.float64))
    sal = class_saliency(m.cls_head, pool5, torch.tensor([0]), m._pair_weights(torch.tensor([8])).double())
    assert sal.shape == pool5.shape
    assert sal.flatten(2).std(dim=2).max() > 0  # not a constant map (fc6/fc7 non-linearities)


def test_combine_binary_maps_hand_checked() -> None:
    """Pixel 0: p_fg(cat)=0.8, p_fg(dog)=0.3 -> cat; pixel 1: 0.2 / 0.4 -> background."""
    def logit_pair(p_fg: float) -> tuple[float, float]:
        return 0.0, math.log(p_fg / (1 - p_fg))

    cat = [logit_pair(0.8), logit_pair(0.2)]
    dog = [logit_pair(0.3), logit_pair(0.4)]
    pair_logits = torch.tensor([[[c[0] for c in cat], [c[1] for c in cat]],
                                [[d[0] for d in dog], [d[1] for d in dog]]]).view(2, 2, 1, 2)
    out = combine_binary_maps(pair_logits, torch.tensor([0, 0]), torch.tensor([8, 12]), 1, 21, 0)
    assert out.shape == (1, 21, 1, 2)
    assert torch.allclose(out[0, 8, 0], torch.log(torch.tensor([0.8, 0.2])), atol=1e-6)
    assert torch.allclose(out[0, 0, 0], torch.log(torch.tensor([1 - 0.8, 1 - 0.4])), atol=1e-6)
    assert (out[0, 1, 0] == ABSENT_LOGIT).all()
    assert out.argmax(1)[0, 0].tolist() == [8, 0]


def test_binary_targets_and_pairs() -> None:
    b = batch()
    img, cls = present_pairs(b.image_labels, torch.tensor(SPACE.foreground_ids), b.is_strong)
    assert list(zip(img.tolist(), cls.tolist())) == [(0, 8), (0, 12), (1, 15)]
    t = binary_targets(b.masks, img, cls)
    assert t[0, 10, 10] == 1 and t[0, 40, 40] == 0 and t[1, 40, 40] == 1 and t[2, 20, 25] == 1 and t[0, 0, 0] == 255


def test_unpooling_uses_the_classifier_switches() -> None:
    """Every non-zero of the first unpooled map sits where the last trunk pool took its max."""
    m = make()
    pool5, switches, sizes = m.classify_features(torch.randn(2, 3, 64, 64))
    g = torch.rand_like(pool5) + 0.1
    up = F.max_unpool2d(g, switches[-1], 2, 2, output_size=sizes[-1])
    assert up.shape[-2:] == sizes[-1]
    nz = (up != 0).flatten(2).sum(-1)
    assert (nz == pool5.shape[-2] * pool5.shape[-1]).all()


def test_stage_classify_trains_only_the_classifier() -> None:
    m = make()
    m.set_stage("classify")
    m.train()
    losses = m.compute_losses(batch())
    assert set(losses) == {"cls"}
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in m.cls_head.parameters())
    assert all(p.grad is None and not p.requires_grad for p in m.bridge.parameters())
    names = [n for g in m.optimizer_groups(0.01) for d in g.params for n in [id(p) for p in d["params"]]]
    assert set(names) == {id(p) for p in m.parameters() if p.requires_grad}


def test_stage_segment_freezes_classifier_and_its_statistics() -> None:
    m = make()
    m.set_stage("segment")
    m.train()
    bn = next(x for x in m.backbone.modules() if isinstance(x, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    losses = m.compute_losses(batch())
    assert set(losses) == {"seg"}
    sum(losses.values()).backward()
    assert torch.equal(bn.running_mean, before) and not bn.training
    assert all(p.grad is None for p in m.backbone.parameters())
    assert all(p.grad is None for p in m.cls_head.parameters())
    for mod in (m.bridge, m.deconv, m.seg_out):
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in mod.parameters())


def test_default_stage_keeps_networks_decoupled() -> None:
    """The segmentation loss never reaches the classification network."""
    m = make()
    m.train()
    losses = m.compute_losses(batch())
    assert set(losses) == {"cls", "seg"}
    losses["seg"].backward()
    assert all(p.grad is None for p in m.backbone.parameters())
    assert all(p.grad is not None for p in m.bridge.parameters())


def test_segment_stage_learns_a_batch() -> None:
    m = make()
    m.set_stage("segment")
    m.train()
    b = batch()
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=3e-3)
    first = None
    for _ in range(20):
        opt.zero_grad()
        loss = m.compute_losses(b)["seg"]
        first = loss.item() if first is None else first
        loss.backward()
        opt.step()
    assert loss.item() < 0.85 * first


def test_predict_with_given_labels_and_under_inference_mode() -> None:
    m = make(SMALL.model_copy(update={"use_gt_labels": True})).eval()
    b = batch()
    with torch.inference_mode():
        out = m.predict(b.images, image_labels=b.image_labels)
    assert out.shape == (3, 21, 64, 64)
    present = (out > ABSENT_LOGIT).flatten(2).any(-1)
    assert present[0].nonzero().flatten().tolist() == [0, 8, 12]
    assert present[2].nonzero().flatten().tolist() == [0, 8]
    with torch.no_grad():  # classifier-identified labels: at least one (fallback_top1)
        out2 = m.predict(b.images)
    assert ((out2 > ABSENT_LOGIT).flatten(2).any(-1).sum(1) >= 2).all()


def test_init_from_earlier_stage(tmp_path) -> None:
    """A stage starts from the previous stage's checkpoint (``init_from``), matching tensors only."""
    first = make()
    torch.save(first.state_dict(), tmp_path / "model.pt")
    torch.manual_seed(123)
    second = DecoupledNet(SPACE, MODEL.model_copy(update={"pretrained": True}),
                          SMALL.model_copy(update={"init_from": str(tmp_path)}))
    for (n, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), n
    other = torch.nn.Linear(2, 2)
    torch.save(other.state_dict(), tmp_path / "other.pt")
    with pytest.raises(ValueError, match="none of its"):
        DecoupledNet(SPACE, MODEL.model_copy(update={"pretrained": True}),
                     SMALL.model_copy(update={"init_from": str(tmp_path / "other.pt")}))
