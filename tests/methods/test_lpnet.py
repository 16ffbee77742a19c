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
    """Xiao et al. 2018, Table 1: six 3x3 convs 16-32-64-64-128-128 (ReLU), three 2x2 pools, then
    fc4 256 **tanh**, fc5 512 **tanh**, fc6 1 **sigmoid** (the sigmoid is applied inside the BCE:
    ``forward`` returns fc6's logit, O_P = sigmoid(logit))."""
    net = PNet(64)
    convs = [m for m in net.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 32, 64, 64, 128, 128]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert [type(m) for m in net.features].count(nn.ReLU) == 6
    pools = [m for m in net.features if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 3 and all(p.kernel_size == 2 for p in pools)
    assert [type(m) for m in net.classifier] == [nn.Linear, nn.Tanh, nn.Linear, nn.Tanh, nn.Linear]
    fcs = [m for m in net.classifier if isinstance(m, nn.Linear)]
    assert [f.out_features for f in fcs] == [256, 512, 1]
    # hand-checked: fc4 = fc5 = 0 weights, bias -1 -> tanh(-1) = -0.761594 (ReLU would give 0);
    # fc6 = weights 1, bias 0 -> logit = 512 * tanh(-1) = -389.936
    with torch.no_grad():
        for f in fcs:
            f.weight.zero_()
        fcs[0].bias.fill_(-1.0)
        fcs[1].weight.fill_(0.0)
        fcs[1].bias.fill_(-1.0)
        fcs[2].weight.fill_(1.0)
        fcs[2].bias.zero_()
        assert torch.allclose(net(torch.randn(2, 3, 64, 64)), torch.full((2,), -389.936), atol=1e-2)
    net = PNet(64)
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


def pnet_batch_sizes(m: LNetPNet, b: Batch) -> tuple[dict[str, torch.Tensor], list[int]]:
    """compute_losses(b) and the number of masked images of each P-Net call (forward pre-hook)."""
    sizes: list[int] = []
    h = m.pnet.register_forward_pre_hook(lambda mod, args: sizes.append(int(args[0].shape[0])))
    try:
        return m.compute_losses(b), sizes
    finally:
        h.remove()


def test_joint_real_samples_include_the_weak_labels() -> None:
    """X17. Xiao et al. Eq. 3 sums over every training image I: J_b(1, O_P(L_I)) + J_b(0, O_P(O_S(I))),
    where a weak image's label L_I is its weak label L_w (batch.pseudo). So the real and the fake
    samples come from the same (image, class) pairs and each category appears on both sides (no
    category shortcut for P-Net).

    batch(): row 0 strong, class 5 on truth[0, 8:40, 8:40] (32 x 32 = 1024 px); row 1 weak, L_w
    holds class 9 on [20:60, 10:30] (40 x 20 = 800 px)."""
    m = make()
    m.set_stage("joint")
    m.train()
    b = batch()
    img, maps = m._real_pairs(b)
    assert img.tolist() == [0, 1]
    assert maps[0].sum() == 1024 and maps[1].sum() == 800
    assert torch.equal(maps[1], (b.pseudo[1] == 9).float())
    losses, sizes = pnet_batch_sizes(m, b)
    assert sizes == [2, 2, 2]  # real, generator's fake (Eq. 4), detached fake (Eq. 3): the same 2 pairs
    # a weak row without L_w for its class gives neither a real nor a fake sample
    b.pseudo[1] = 255
    img, _ = m._real_pairs(b)
    assert img.tolist() == [0]
    _, sizes = pnet_batch_sizes(m, b)
    assert sizes == [1, 1, 1]
    # a strong row whose crop holds no pixel of a labelled class: no (black) real sample either
    b.masks[0] = 0
    losses, sizes = pnet_batch_sizes(m, b)
    assert sizes == [] and set(losses) == {"main/seg_strong", "main/seg_weak", "main/adv", "disc/real", "disc/fake"}
    assert float(losses["main/adv"]) == 0.0 and losses["main/adv"].requires_grad


def test_pnet_losses_hand_checked_generator_is_non_saturating() -> None:
    """Eq. 3 (P-Net): L_P = -[log O_P(x*y) + log(1 - O_P(x*S(x)_c))]; Eq. 4 (generator):
    L_adv = -log O_P(x*S(x)_c), i.e. the fake labelled 1 (non-saturating), weighted by lambda.

    fc6 weights 0, bias b = 2: O_P = sigmoid(2) for every input, so
    disc/real = log(1 + e^-2) = 0.126928, disc/fake = log(1 + e^2) = 2.126928,
    main/adv = 0.5 * 0.126928 = 0.063464 (labelling the fake 0 would give 1.063464, the saturating
    log(1 - O_P) form -1.063464)."""
    m = make(lambda_adv=0.5)
    m.set_stage("joint")
    m.train()
    fc6 = m.pnet.classifier[-1]
    with torch.no_grad():
        fc6.weight.zero_()
        fc6.bias.fill_(2.0)
    losses = m.compute_losses(batch())
    assert abs(float(losses["disc/real"]) - 0.126928) < 1e-5
    assert abs(float(losses["disc/fake"]) - 2.126928) < 1e-5
    assert abs(float(losses["main/adv"]) - 0.063464) < 1e-5


def test_pretrain_fake_is_the_segmenters_prediction() -> None:
    """X18. P-Net pre-training (Xiao et al. Sec. 3.3) on the strong categories: real = x * ground
    truth, fake = x * S(x)_c of the (trained, frozen) segmentation network, for the same pairs."""
    m = make()
    m.set_stage("pretrain_pnet")
    m.train()
    b = batch()
    seen: list[torch.Tensor] = []
    h = m.pnet.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    m.compute_losses(b)
    h.remove()
    with torch.no_grad():
        prob = torch.softmax(m.seg_logits(b.images), dim=1)[0, 5]
    assert len(seen) == 2 and seen[1].shape == (1, 3, 64, 64)
    assert torch.allclose(seen[0], b.images[:1] * (b.masks[0] == 5).float())
    assert torch.allclose(seen[1], b.images[:1] * prob, atol=1e-6)
    m2 = make(pretrain_fake="corrupted")
    m2.set_stage("pretrain_pnet")
    assert set(m2.compute_losses(b)) == {"disc/real", "disc/fake"}


def test_c3s_pnet_arm_fine_tunes_the_trained_segmenter() -> None:
    """X19. Xiao et al.: the segmentation model is trained first (L_s + L_w), then fine-tuned with
    P-Net (seg lr 1e-5, P-Net lr 1e-3 against DeepLab's 1e-3 training lr). The lnet-pnet arm starts
    from the lnet arm's trained segmenter (step ``segment``), pre-trains P-Net with it frozen, and
    fine-tunes at 1/100 of the segment step's lr with P-Net at 100x (``disc_lr_mult``)."""
    from raysemiseg.experiment import load_experiment, plan_experiment

    ecfg = load_experiment("configs/experiments/c3s_split1.yaml")
    ecfg = ecfg.model_copy(update={"arms": [a for a in ecfg.arms if a.name in ("lnet", "lnet-pnet")]})
    plan = {(a, s): item for a, s, item in plan_experiment(ecfg)}
    seg, pre, joint = plan[("lnet", "segment")], plan[("lnet-pnet", "pretrain_pnet")], plan[("lnet-pnet", "joint")]
    assert seg.method.stage == "segment" and seg.method.params["init_from"] == "<lnet.lnet>"
    assert pre.method.params["init_from"] == "<lnet.segment>"
    assert joint.method.params["init_from"] == "<lnet-pnet.pretrain_pnet>"
    assert joint.optim.lr == seg.optim.lr / 100
    assert joint.method.build_params().disc_lr_mult == 100
    assert pre.method.build_params().pretrain_fake == "predicted"
    assert LNetPNetParams().disc_lr_mult == 100


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
