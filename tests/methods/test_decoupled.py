"""DecoupledNet (Hong et al. 2015): saliency (Eq. 3) against finite differences and its
normalisation, the label conditioning of the bridge output, the per-label merge and the Sec. 4.3
background map, the model's own unpooling with the classifier's switches, the BatchNorm'd decoder
and its optimizer recipe, combinatorial cropping in the segment stage (Sec. 4.4), fitting one
batch, and what each stage trains."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from raysemiseg.config import ModelConfig, OptimConfig
from raysemiseg.labels import builtin
from raysemiseg.methods import Batch, get_method
from raysemiseg.methods.decoupled import DecoupledNet, DecoupledParams, class_saliency
from raysemiseg.methods.decoupled.losses import ABSENT_LOGIT, binary_targets, combine_binary_maps, present_pairs
from raysemiseg.methods.decoupled.model import _ClassifierHead, normalise_saliency

ROOT = Path(__file__).resolve().parents[2]
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


def colour_scene(size: int = 64) -> Batch:
    """Three strong rows whose objects are visible: cat=8 red and dog=12 green squares in row 0
    (two labels: only the label conditioning can tell them apart), person=15 blue in row 1, a
    dog in row 2; Gaussian noise (std 0.3) everywhere."""
    g = torch.Generator().manual_seed(3)
    masks = torch.zeros(3, size, size, dtype=torch.long)
    masks[0, 6:30, 6:30] = 8
    masks[0, 34:60, 30:60] = 12
    masks[1, 10:50, 20:44] = 15
    masks[2, 20:56, 8:40] = 12
    img = 0.3 * torch.randn(3, 3, size, size, generator=g)
    for c, rgb in {8: (2.0, -1.0, -1.0), 12: (-1.0, 2.0, -1.0), 15: (-1.0, -1.0, 2.0)}.items():
        img += torch.tensor(rgb).view(1, 3, 1, 1) * (masks == c)[:, None]
    labels = torch.zeros(3, SPACE.num_classes)
    labels[:, 0] = 1
    labels[0, [8, 12]] = 1
    labels[1, 15] = 1
    labels[2, 12] = 1
    return Batch(images=img, masks=masks, pseudo=torch.full_like(masks, 255), image_labels=labels,
                 is_strong=torch.ones(3, dtype=torch.bool), image_ids=["a", "b", "c"])


def fg_ious(method, b: Batch) -> dict[tuple[int, int], float]:
    """fg IoU of every (row, present label) of ``b`` under ``predict`` with the given labels."""
    method.eval()
    with torch.no_grad():
        pred = method.predict(b.images, image_labels=b.image_labels).argmax(1)
    out = {}
    for r in range(b.images.shape[0]):
        for c in b.image_labels[r, 1:].nonzero().flatten().add(1).tolist():
            t, q = b.masks[r] == c, pred[r] == c
            out[(r, c)] = float((t & q).sum() / (t | q).sum().clamp(min=1))
    return out


def shipped_optim(method_name: str) -> OptimConfig:
    """The ``optim`` section of the shipped ``configs/methods/<method_name>.yaml`` (AMP off)."""
    cfg = yaml.safe_load((ROOT / "configs" / "methods" / f"{method_name}.yaml").read_text())
    return OptimConfig(**{**cfg["optim"], "amp": False})


def fit(method, b: Batch, stages: list[tuple[str, int]]) -> dict[str, float]:
    """Train through the method's own optimizer groups, the shared loop's ``train_step`` and the
    recipe of the method's shipped config (the old SGD recipes left both decoders at the prior)."""
    from stage_training import train_stages  # tests/methods/stage_training.py

    return train_stages(method, b, stages, shipped_optim(method.name))[1]


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


def test_saliency_normalisation_hand_checked() -> None:
    """f_cls / RMS(f_cls) per pair: [3, 4] has RMS sqrt(12.5) -> [0.8485, 1.1314]; zeros stay zero."""
    sal = torch.tensor([[[[3.0, 4.0]]], [[[0.0, 0.0]]]])  # (2, 1, 1, 2)
    out = normalise_saliency(sal)
    assert torch.allclose(out[0].flatten(), torch.tensor([3.0, 4.0]) / math.sqrt(12.5))
    assert torch.equal(out[1], torch.zeros(1, 1, 2))


def test_bridge_and_segmenter_output_depend_on_the_label() -> None:
    """Class conditioning (Sec. 4.3, D5): the same image with label cat vs dog must give another
    bridge output g and another figure-ground map. The raw saliency is ~1e-3 of pool5: without
    normalisation g moved 0.2 % and the fg-bg logits 8e-7 between the labels (old code)."""
    m = make().eval()
    x = colour_scene().images[:1]
    pool5, switches, sizes = m.classify_features(x)
    img, w = torch.tensor([0, 0]), m._pair_weights(torch.tensor([8, 12]))
    logits = m.segment_pairs(pool5, switches, sizes, img, w, (64, 64)).detach()
    margin = logits[:, 1] - logits[:, 0]
    assert float((margin[0] - margin[1]).abs().mean()) > 0.05
    g = m.bridge_features(pool5, img, w).detach()
    assert float((g[0] - g[1]).abs().mean() / g.abs().mean()) > 0.1


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
    """The model's own deconvolution path (Sec. 4.2): the input of each deconv layer, captured in
    ``segment_pairs``, holds the previous layer's values exactly at the positions where the
    mirrored trunk pool of *that pair's image* took its max, and zeros elsewhere (pairs listed out
    of image order, two pools: the last pool is unpooled first)."""
    m = make(SMALL.model_copy(update={"num_pools": 2})).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    pool5, switches, sizes = m.classify_features(x)
    pair_img = torch.tensor([1, 0, 0])
    w = m._pair_weights(torch.tensor([8, 12, 15]))
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.deconv[j].register_forward_hook(lambda mod, inp, out, j=j: seen.update({f"in{j}": inp[0], f"out{j}": out}))
             for j in range(2)]
    m.segment_pairs(pool5, switches, sizes, pair_img, w, (64, 64))
    for h in hooks:
        h.remove()
    g = m.bridge_features(pool5, pair_img, w).detach()
    for j, (src, pool) in enumerate([(g, 1), (seen["out0"].detach(), 0)]):
        unpooled = seen[f"in{j}"].detach()
        assert unpooled.shape[-2:] == sizes[pool]
        idx = switches[pool][pair_img].flatten(2)
        assert torch.equal(unpooled.flatten(2).gather(2, idx), src.flatten(2))   # values at the switches
        rest = unpooled.flatten(2).scatter(2, idx, 0.0)
        assert torch.count_nonzero(rest) == 0                                    # zeros elsewhere


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
    for mod in (m.bridge, m.deconv, m.upsample, m.seg_out):
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


def test_segment_stage_fits_a_batch() -> None:
    """Classify 20 steps, then segment 80 steps through the method's own optimizer groups and its
    shipped recipe (configs/methods/decoupled.yaml): every
    (image, label) of the batch reaches fg IoU > 0.5 under ``predict`` with the given labels,
    including the two labels of row 0. A background-prior collapse scores 0 here; the old plain
    decoder (no BN, default init, no saliency normalisation) scored 0.0 / 0.19 on row 0."""
    m = make()
    b = colour_scene()
    fit(m, b, [("classify", 20), ("segment", 80)])
    ious = fg_ious(m, b)
    assert set(ious) == {(0, 8), (0, 12), (1, 15), (2, 12)}
    assert min(ious.values()) > 0.5, ious


def test_decoder_is_batchnormed_and_its_recipe() -> None:
    """DeconvNet: every (de)convolution of the bridge and the decoder is followed by BatchNorm; the
    optimizer is Adam with the backbone at lr, trunk + classifier head at 10x, and the segmenter
    at ``seg_lr_mult`` (not the default 10x SGD on plain layers)."""
    m = make()
    for mod in [m.bridge, *m.deconv, *m.upsample, *m.trunk]:
        layers = list(mod.modules())
        convs = [i for i, x in enumerate(layers) if isinstance(x, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
        assert convs and all(isinstance(layers[i + 1], torch.nn.BatchNorm2d) for i in convs)
    m.set_stage("classify")
    (grp,) = m.optimizer_groups(1e-4)
    assert grp.optimizer == "adam"
    assert [pg["lr"] for pg in grp.params] == [pytest.approx(1e-4), pytest.approx(1e-3)]
    m.set_stage("segment")
    (grp,) = m.optimizer_groups(1e-4)
    seg = {id(q) for mod in (m.bridge, m.deconv, m.upsample, m.seg_out) for q in mod.parameters()}
    assert len(grp.params) == 1 and {id(q) for q in grp.params[0]["params"]} == seg
    assert grp.params[0]["lr"] == pytest.approx(1e-4 * m.params.seg_lr_mult)


def test_inference_background_is_the_union_pair() -> None:
    """Sec. 4.3: background = M_b(g*), g* the bridge output for ALL identified labels; for a
    single-label image g* = g^l. ``background: min`` keeps log(1 - max_l p_fg)."""
    m = make().eval()
    b = colour_scene()
    with torch.no_grad():
        out = m.predict(b.images, image_labels=b.image_labels)
    pool5, switches, sizes = m.classify_features(b.images)
    union = torch.zeros(1, len(SPACE.foreground_ids))
    union[0, [7, 11]] = 1.0  # columns of cat=8 and dog=12
    g_star = m.segment_pairs(pool5, switches, sizes, torch.tensor([0]), union, (64, 64)).detach()
    assert torch.allclose(out[0, 0], torch.log_softmax(g_star, 1)[0, 0], atol=1e-5)
    p_fg = torch.stack([out[0, 8].exp(), out[0, 12].exp()]).max(0).values
    assert float((out[0, 0] - torch.log1p(-p_fg)).abs().max()) > 1e-2  # not the min rule
    single = m.segment_pairs(pool5, switches, sizes, torch.tensor([1]), m._pair_weights(torch.tensor([15])),
                             (64, 64)).detach()
    assert torch.allclose(out[1, 0], torch.log_softmax(single, 1)[0, 0], atol=1e-5)
    assert torch.allclose(out[1, 15], torch.log_softmax(single, 1)[0, 1], atol=1e-5)
    m_min = make(SMALL.model_copy(update={"background": "min"})).eval()
    with torch.no_grad():
        out_min = m_min.predict(b.images, image_labels=b.image_labels)
    p_fg = torch.stack([out_min[0, 8].exp(), out_min[0, 12].exp()]).max(0).values
    assert torch.allclose(out_min[0, 0], torch.log1p(-p_fg), atol=1e-5)


def test_segment_stage_runs_combinatorial_crops() -> None:
    """Sec. 4.4 in the segment stage: with ``combinatorial_crops = 2`` the segmenter sees the
    3 singleton pairs + 1 union pair of the two strong rows of ``batch()`` plus 2 crops per
    strong row; with 0 only the 4 pairs."""
    sizes = {}
    for crops in (0, 2):
        m = make(SMALL.model_copy(update={"combinatorial_crops": crops}))
        m.set_stage("segment")
        m.train()
        seen = []
        h = m.seg_out.register_forward_hook(lambda mod, inp, out: seen.append(out.shape[0]))
        loss = m.compute_losses(batch())["seg"]
        h.remove()
        assert torch.isfinite(loss)
        sizes[crops] = seen[0]
    assert sizes == {0: 4, 2: 8}


def test_pairs_follow_batch_labels_with_an_absent_class() -> None:
    """A strong row whose (recomputed) labels list a class with no pixel in the mask trains an
    all-background target for it (pairs come from ``batch.image_labels``) and does not break the
    crops; a batch without any strong label gives a zero loss that still reaches the segmenter."""
    b = batch()
    b.image_labels[1, 3] = 1.0  # boat: not in row 1's mask
    img, cls = present_pairs(b.image_labels, torch.tensor(SPACE.foreground_ids), b.is_strong)
    assert (1, 3) in list(zip(img.tolist(), cls.tolist()))
    t = binary_targets(b.masks, img, cls)
    k = list(zip(img.tolist(), cls.tolist())).index((1, 3))
    assert set(t[k].unique().tolist()) <= {0, 255}
    m = make(SMALL.model_copy(update={"combinatorial_crops": 3}))
    m.set_stage("segment")
    m.train()
    for seed in range(3):
        torch.manual_seed(seed)
        assert torch.isfinite(m.compute_losses(b)["seg"])
    none = batch()
    none.image_labels[:, 1:] = 0.0
    loss = m.compute_losses(none)["seg"]
    assert loss.item() == 0.0
    loss.backward()
    assert all(q.grad is not None for q in m.bridge.parameters())


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


def test_pretraining_stage_hands_on_its_latest_checkpoint() -> None:
    """The classify stage's val mIoU scores an untrained segmenter (ties every epoch): the driver
    hands on its latest checkpoint; the segment stage's best by val mIoU."""
    from raysemiseg.train.driver import checkpoint_rule
    from raysemiseg.config import load_config

    cfg = load_config(str(Path(__file__).resolve().parents[2] / "configs" / "methods" / "decoupled.yaml"))
    assert checkpoint_rule(cfg.model_copy(update={"method": cfg.method.model_copy(update={"stage": "classify"})})) == "latest"
    assert checkpoint_rule(cfg.model_copy(update={"method": cfg.method.model_copy(update={"stage": "segment"})})) == "best"


def test_i3s_per_class_experiment_has_a_split_per_arm() -> None:
    """configs/experiments/decoupled_i3s_per_class.yaml (Table 1's 5/10/25 strong images per class):
    every arm's segment stage trains on its own i3s-per-class split, strong rows only, with
    combinatorial cropping; the classifier (image labels of every row, the same in all three
    splits) is trained once, in the first arm, and shared."""
    from raysemiseg.experiment import load_experiment, plan_experiment

    exp = load_experiment(str(ROOT / "configs" / "experiments" / "decoupled_i3s_per_class.yaml"))
    assert exp.store.sample == "voc"
    assert [(a.name, a.split.kind, a.split.per_class) for a in exp.arms] == [
        ("decoupled-5", "i3s-per-class", 5), ("decoupled-10", "i3s-per-class", 10), ("decoupled-25", "i3s-per-class", 25)]
    plan = plan_experiment(exp)
    assert [(arm, step) for arm, step, _ in plan] == [("decoupled-5", "classify"), ("decoupled-5", "segment"),
                                                       ("decoupled-10", "segment"), ("decoupled-25", "segment")]
    for arm, step, cfg in plan:
        assert cfg.data.split_file.endswith(f"split-{arm}.parquet")
        assert cfg.method.name == "decoupled" and cfg.method.stage == step
        if step == "segment":
            assert cfg.data.strong_fraction == 1.0 and cfg.method.build_params().combinatorial_crops == 1
