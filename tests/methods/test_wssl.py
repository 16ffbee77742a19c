"""WSSL (Papandreou et al. 2015): online E-step through the method, target precedence, M-step loss,
Bbox-EM-Fixed, Cross-Pretrain and the Cross-Joint union label space. Hand-checked small cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raysemiseg.config import ModelConfig, load_config
from raysemiseg.labels import builtin
from raysemiseg.methods import Batch, get_method
from raysemiseg.methods.wssl import WsslParams, load_cross_pretrain, union_label_space, write_label_space_yaml
from raysemiseg.methods.wssl.losses import (
    SOURCE_ESTEP,
    SOURCE_PSEUDO,
    SOURCE_STRONG,
    box_regions,
    masked_cross_entropy,
    unpack_box_bits,
    select_targets,
)
from raysemiseg.pseudolabel.em import EStepParams, e_step

TINY = ModelConfig(backbone="tiny", pretrained=False, output_stride=8)
TINY_INIT = ModelConfig(backbone="tiny", pretrained=True, output_stride=8)  # tiny ignores ImageNet weights
VOC = builtin("voc21")
IG = 255


def make_wssl(space=VOC, model=TINY, **params):
    params = {"head_hidden": 16, "head_dropout": 0.0, **params}
    return get_method("wssl")(space, model, WsslParams(**params))


def make_batch(n_strong: int, n_weak: int, k: int = 21, size: int = 32, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    n = n_strong + n_weak
    masks = torch.full((n, size, size), IG, dtype=torch.long)
    masks[:n_strong] = torch.randint(0, 3, (n_strong, size, size), generator=g)
    labels = torch.zeros(n, k)
    labels[:, 0] = 1
    labels[:, 7] = 1
    return Batch(
        images=torch.randn(n, 3, size, size, generator=g),
        masks=masks,
        pseudo=torch.full((n, size, size), IG, dtype=torch.long),
        image_labels=labels,
        is_strong=torch.arange(n) < n_strong,
    )


def ramp_scores(k: int, h: int, w: int, fg: int) -> torch.Tensor:
    """Background score 0 everywhere; class ``fg`` score = -(pixel index) / S * 10 (so the
    foreground is always below the background, by a margin that grows along raster order);
    every other class (absent) scores +100 so that suppression of absent classes is visible."""
    s = torch.full((1, k, h, w), 100.0)
    s[0, 0] = 0.0
    s[0, fg] = -torch.arange(h * w, dtype=torch.float32).view(h, w) / (h * w) * 10.0
    return s


def test_masked_cross_entropy_hand_checked():
    logits = torch.zeros(1, 4, 2, 2, requires_grad=True)          # uniform over 4 classes
    target = torch.tensor([[[0, 1], [IG, 3]]])
    loss = masked_cross_entropy(logits, target, IG)
    assert loss.item() == pytest.approx(math.log(4))               # mean over the 3 valid pixels
    empty = masked_cross_entropy(logits, torch.full_like(target, IG), IG)
    assert empty.item() == 0.0
    empty.backward()                                              # connected, zero gradient
    assert logits.grad is not None and float(logits.grad.abs().sum()) == 0.0


def test_em_adapt_biases_reach_rho_targets_through_method():
    """EM-Adapt (Sec. 3.2): on a map where background wins every pixel, the E-step run by the
    method gives the present foreground class exactly ceil(rho_fg * S) pixels (the ones with the
    smallest margin, the start of the ramp), background the rest (>= rho_bg); absent classes,
    though scoring highest, get none."""
    m = make_wssl(estep="adapt", rho_fg=0.2, rho_bg=0.4)
    h = w = 10
    s = ramp_scores(21, h, w, fg=7)
    batch = make_batch(0, 1, size=h)
    labels = m.e_step(s, batch, torch.tensor([True]))[0]
    assert set(labels.unique().tolist()) == {0, 7}
    fg = labels == 7
    assert int(fg.sum()) == math.ceil(0.2 * h * w) == 20
    assert fg.flatten()[:20].all()                        # the 20 smallest margins
    assert float((labels == 0).float().mean()) >= 0.4
    # the opposite map: foreground wins everywhere -> background is raised to >= 40 %
    s2 = ramp_scores(21, h, w, fg=7)
    s2[0, 0], s2[0, 7] = s[0, 7], torch.zeros(h, w)
    lab2 = m.e_step(s2, batch, torch.tensor([True]))[0]
    assert float((lab2 == 0).float().mean()) >= 0.4 and float((lab2 == 7).float().mean()) >= 0.2
    # EM-Fixed (Eq. 10): absent classes keep their raw score (+100 here), so they win every pixel ...
    mf = make_wssl(estep="fixed", b_fg=5, b_bg=3)
    assert (mf.e_step(s, batch, torch.tensor([True]))[0] == 1).all()      # channel 1: first absent class
    # ... unless suppressed (the option), or below the biased present scores: with absent at -100,
    # fg wins where s_fg + 5 > 0 + 3, i.e. -10 i / S > -2 -> i < 20
    sup = make_wssl(estep="fixed", b_fg=5, b_bg=3, suppress_absent=True).e_step(s, batch, torch.tensor([True]))[0]
    s_low = s.clone()
    s_low[s_low == 100.0] = -100.0
    for lab3 in (sup.flatten(), mf.e_step(s_low, batch, torch.tensor([True]))[0].flatten()):
        assert (lab3[:20] == 7).all() and (lab3[20:] == 0).all()


def test_em_adapt_gives_rho_fg_to_each_present_class_through_method():
    """EM-Adapt (Sec. 3.2): "at least rho_l of the image area to class l" with rho_l = rho_fg for
    EACH present foreground class (DeepLab's AdaptiveBiasChannelLayer), the default ``fg_share``
    of WsslParams. 1 x 10 image, bg = 0, class 3 = -(j + 1), class 9 = -(10 - j), absent = +100:
    ceil(0.2 * 10) = 2 pixels each (3 on pixels 0, 1; 9 on 8, 9); ``fg_share="total"`` gives 1 each."""
    j = torch.arange(10, dtype=torch.float32)
    s = torch.full((1, 21, 1, 10), 100.0)
    s[0, 0, 0], s[0, 3, 0], s[0, 9, 0] = torch.zeros(10), -(j + 1), -(10 - j)
    batch = make_batch(0, 1, size=1)
    batch.image_labels[:] = 0
    batch.image_labels[0, [0, 3, 9]] = 1
    m = make_wssl(estep="adapt", rho_fg=0.2, rho_bg=0.4)
    assert m.params.estep_params().fg_share == "per_class"
    assert m.e_step(s, batch, torch.tensor([True]))[0].flatten().tolist() == [3, 3, 0, 0, 0, 0, 0, 0, 9, 9]
    tot = make_wssl(estep="adapt", rho_fg=0.2, rho_bg=0.4, fg_share="total")
    assert tot.e_step(s, batch, torch.tensor([True]))[0].flatten().tolist() == [3, 0, 0, 0, 0, 0, 0, 0, 0, 9]


def _bits(regions: dict[int, list[tuple[int, int, int, int]]], h: int, w: int, k: int = 21) -> torch.Tensor:
    """(1, ceil(K/8), h, w) uint8 box bits: bit c % 8 of byte c // 8 where a box (y0, y1, x0, x1) of class c lies."""
    out = torch.zeros(1, (k + 7) // 8, h, w, dtype=torch.uint8)
    for c, boxes in regions.items():
        for y0, y1, x0, x1 in boxes:
            out[0, c // 8, y0:y1, x0:x1] |= 1 << (c % 8)
    return out


def test_bbox_em_fixed_biases_only_inside_boxes():
    """Bbox-EM-Fixed (Papandreou et al. 2015 Sec. 3.3): the present foreground scores are boosted
    only inside that class's boxes; outside every box the pixels are background. s_7 = -1 everywhere:
    with b_fg = 5 > b_bg = 3 class 7 would win every pixel of an image-level E-step."""
    m = make_wssl(estep="fixed", use_boxes=True)
    h = w = 8
    s = torch.zeros(1, 21, h, w)
    s[0, 7] = -1.0
    batch = make_batch(0, 1, size=h)
    batch.box_masks = torch.zeros(1, h, w, dtype=torch.long)
    batch.box_masks[0, 2:5, 3:7] = 7
    for bits in (None, _bits({7: [(2, 5, 3, 7)]}, h, w)):      # Bbox-Rect rendering only / per-class bits
        batch.box_bits = bits
        lab = m.e_step(s, batch, torch.tensor([True]))[0]
        assert (lab[2:5, 3:7] == 7).all()
        lab[2:5, 3:7] = 0
        assert (lab == 0).all()
    # a row WITHOUT boxes (box mask all ignore_index) falls back to the image-level E-step
    batch.box_masks[:] = IG
    batch.box_bits = torch.zeros_like(batch.box_bits)
    assert (m.e_step(s, batch, torch.tensor([True]))[0] == 7).all()
    region = box_regions(torch.tensor([[[0, 7], [IG, IG]]]), 21)
    assert region.shape == (1, 21, 2, 2) and region[0, 0].all() and region[0, 7].tolist() == [[False, True], [False, False]]


def test_bbox_em_fixed_crop_without_box_pixel_is_background():
    """A row that HAS boxes but whose random crop holds no box pixel (box mask all background) is
    known background (Sec. 3.3: pixels outside every box are background), not an image-level row:
    the E-step must not put class 7 (s_7 + b_fg = 4 > 0 + b_bg = 3) on it."""
    m = make_wssl(estep="fixed", use_boxes=True)
    s = torch.zeros(1, 21, 6, 6)
    s[0, 7] = -1.0
    batch = make_batch(0, 1, size=6)
    batch.box_masks = torch.zeros(1, 6, 6, dtype=torch.long)        # boxed row, no box pixel in the crop
    batch.box_masks[0, 5] = IG                                       # (+ a padded row: still a boxed row)
    for bits in (None, _bits({}, 6, 6)):
        batch.box_bits = bits
        lab = m.e_step(s, batch, torch.tensor([True]))[0]
        assert (lab == 0).all()
    region = box_regions(torch.zeros(1, 2, 2, dtype=torch.long), 21)
    assert region[0, 0].all() and not region[0, 1:].any()


def test_bbox_em_fixed_nested_boxes_keep_the_larger_box_class():
    """Per-class box regions: a person box (15) inside a horse box (13) must not forbid "horse"
    inside the person box (the Bbox-Rect rendering paints the smaller box on top).
    Scores: s_13 = -1 (+5 -> 4), s_15 = -1.5 (+5 -> 3.5) except s_15 = 0 (-> 5) at pixel (3, 3),
    bg 0 (+3). Inside the horse box horse wins (4 > 3.5 > 3), also inside the person box, except
    (3, 3) where person wins; outside: background."""
    m = make_wssl(estep="fixed", use_boxes=True)
    h = w = 8
    s = torch.zeros(1, 21, h, w)
    s[0, 13], s[0, 15] = -1.0, -1.5
    s[0, 15, 3, 3] = 0.0
    batch = make_batch(0, 1, size=h)
    batch.image_labels[0, [13, 15]] = 1
    batch.box_masks = torch.zeros(1, h, w, dtype=torch.long)
    batch.box_masks[0, 1:7, 1:7] = 13
    batch.box_masks[0, 2:5, 2:5] = 15                    # Bbox-Rect: the smaller box on top
    batch.box_bits = _bits({13: [(1, 7, 1, 7)], 15: [(2, 5, 2, 5)]}, h, w)
    lab = m.e_step(s, batch, torch.tensor([True]))[0]
    expect = torch.zeros(h, w, dtype=torch.long)
    expect[1:7, 1:7] = 13
    expect[3, 3] = 15
    assert lab.tolist() == expect.tolist()
    regions = unpack_box_bits(batch.box_bits, 21)
    assert regions.shape == (1, 21, h, w) and regions[0, 13, 2:5, 2:5].all() and int(regions[0, 15].sum()) == 9


def test_select_targets_precedence():
    masks = torch.tensor([[[1, 2]], [[IG, IG]], [[IG, IG]]])
    pseudo = torch.tensor([[[5, 5]], [[3, IG]], [[IG, IG]]])
    est = torch.tensor([[[9, 9]], [[9, 9]], [[4, 0]]])
    strong = torch.tensor([True, False, False])
    t, src = select_targets(masks, pseudo, strong, est, IG)
    assert t.tolist() == [[[1, 2]], [[3, IG]], [[4, 0]]]
    assert src.tolist() == [SOURCE_STRONG, SOURCE_PSEUDO, SOURCE_ESTEP]
    t2, src2 = select_targets(masks, pseudo, strong, est, IG, use_label_store=False)
    assert t2[1].tolist() == [[9, 9]] and src2[1] == SOURCE_ESTEP


def _constant_logit_wssl(**params):
    """A WSSL net whose logits are the fc8 bias everywhere (fc8 weight 0): 1 for class 3, -1 for
    class 7, 0 else. Per-pixel CE is then z - 1 at class 3, z + 1 at class 7 and z at any other
    class, z = ln(19 + e + 1/e)."""
    m = make_wssl(**params)
    with torch.no_grad():
        m.head.fc8.weight.zero_()
        m.head.fc8.bias.zero_()
        m.head.fc8.bias[3] = 1.0
        m.head.fc8.bias[7] = -1.0
    return m


def _three_row_batch(size: int = 4) -> Batch:
    """Row 0 strong: 4 pixels of class 3, the rest void. Row 1 weak (labels {bg, 7}), no stored label:
    EM-Fixed on the constant logits gives bg 0 + 3, class 7 -1 + 5, absent class 3 1 + 0 -> class 7
    on all 16 pixels (swapped biases would give background). Row 2 weak with a stored pseudo label: 8 pixels of class 3 (no E-step)."""
    b = make_batch(1, 2, size=size)
    b.masks[0] = IG
    b.masks[0, 0] = 3
    b.pseudo[2, :2] = 3
    return b


def test_compute_losses_pools_strong_and_weak_pixels_eq1():
    """WSSL's M-step (Papandreou et al. 2015 Eq. 1 / Alg. 1 l.4, semi-supervised Sec. 3.4): ONE sum
    of log P(y_m | x) over all pixels m of the mixed mini-batch, strong masks and weak targets alike;
    this project divides it by the number of labelled pixels (a mean, as for strong_only).

    Hand-checked on :func:`_three_row_batch`, z = ln(19 + e + 1/e): strong 4 px at z - 1, E-step
    16 px at class 7 (z + 1), stored 8 px at class 3 (z - 1):
    pooled = (4 (z - 1) + 16 (z + 1) + 8 (z - 1)) / 28; with weak_weight 0.5 the weak pixels count
    half. ``loss_pooling="per_group"`` (the former form): (z - 1) + (16 (z + 1) + 8 (z - 1)) / 24."""
    z = math.log(19 + math.e + 1 / math.e)
    batch = _three_row_batch()
    losses = _constant_logit_wssl(estep="fixed").compute_losses(batch)
    assert set(losses) == {"strong_ce", "weak_ce"}
    assert losses["strong_ce"].item() == pytest.approx(4 * (z - 1) / 28, rel=1e-5)
    assert losses["weak_ce"].item() == pytest.approx((16 * (z + 1) + 8 * (z - 1)) / 28, rel=1e-5)
    half = _constant_logit_wssl(estep="fixed", weak_weight=0.5).compute_losses(batch)
    assert sum(half.values()).item() == pytest.approx((4 * (z - 1) + 0.5 * (16 * (z + 1) + 8 * (z - 1))) / 28, rel=1e-5)
    per = _constant_logit_wssl(estep="fixed", loss_pooling="per_group").compute_losses(batch)
    assert per["strong_ce"].item() == pytest.approx(z - 1, rel=1e-5)
    assert per["weak_ce"].item() == pytest.approx((16 * (z + 1) + 8 * (z - 1)) / 24, rel=1e-5)
    # use_label_store: false -> row 2 gets the E-step too (16 px of class 7 instead of 8 of class 3)
    nostore = _constant_logit_wssl(estep="fixed", use_label_store=False).compute_losses(batch)
    assert sum(nostore.values()).item() == pytest.approx((4 * (z - 1) + 32 * (z + 1)) / 36, rel=1e-5)
    # the E-step labels are targets (no gradient through them); the loss has one
    m = make_wssl(estep="fixed")
    sum(m.compute_losses(batch).values()).backward()
    assert m.head.fc8.weight.grad is not None and float(m.head.fc8.weight.grad.abs().sum()) > 0


def test_padding_gets_no_estep_label_and_no_loss():
    """Padded crop pixels (``batch.valid`` False) are not image pixels: the online E-step leaves
    them ``ignore_index`` and they add nothing to the M-step loss (Eq. 1 sums over image pixels).

    :func:`_three_row_batch` with the E-step row's lower half (8 of 16 px) padding:
    pooled = (4 (z - 1) + 8 (z + 1) + 8 (z - 1)) / 20, z = ln(19 + e + 1/e)."""
    z = math.log(19 + math.e + 1 / math.e)
    batch = _three_row_batch()
    batch.valid = torch.ones(3, 4, 4, dtype=torch.bool)
    batch.valid[1, 2:] = False
    m = _constant_logit_wssl(estep="fixed")
    est = m.e_step(torch.zeros(3, 21, 4, 4), batch, torch.tensor([False, True, False]))
    assert (est[1, :2] == 7).all() and (est[1, 2:] == IG).all()          # bg 0 + 3 < class 7 0 + 5
    assert sum(m.compute_losses(batch).values()).item() == pytest.approx((4 * (z - 1) + 8 * (z + 1) + 8 * (z - 1)) / 20,
                                                                         rel=1e-5)


def test_params_validation():
    with pytest.raises(ValueError, match="rho_fg"):
        WsslParams(estep="adapt", rho_fg=0.7, rho_bg=0.5)
    with pytest.raises(ValueError, match="rho_fg"):
        WsslParams(estep="adapt", rho_fg=0.7, rho_bg=0.5, fg_share="total")
    assert WsslParams(estep="adapt", rho_fg=0.3, rho_bg=0.4).estep_params().fg_share == "per_class"
    assert WsslParams(suppress_absent=True).estep_params().absent_suppressed
    with pytest.raises(ValueError):
        WsslParams(estep="adapt", use_boxes=True)
    with pytest.raises(ValueError):
        WsslParams(b_fgg=1)


def test_cross_pretrain_replaces_classifier(tmp_path):
    torch.manual_seed(0)
    src = make_wssl(space=builtin("coco80"))
    path = tmp_path / "coco.pt"
    torch.save({"model": src.state_dict()}, path)
    dst = make_wssl(space=VOC, model=TINY_INIT, init_from=str(path))
    for name, t in dst.backbone.state_dict().items():
        assert torch.equal(t, src.backbone.state_dict()[name]), name
    assert torch.equal(dst.head.fc7.weight, src.head.fc7.weight)
    assert dst.head.fc8.weight.shape[0] == 21
    # same-size space: the classifier is still replaced (fresh), not copied
    same = make_wssl(space=builtin("coco80"))
    report = load_cross_pretrain(same, path)
    assert report["replaced"] == ["head.fc8.bias", "head.fc8.weight"]
    assert not torch.equal(same.head.fc8.weight, src.head.fc8.weight)
    assert torch.equal(same.head.fc6.weight, src.head.fc6.weight)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_wssl(model=TINY_INIT, init_from=str(tmp_path / "missing.pt"))
    # rebuilding for inference (pretrained: false, as load_method does) does not read init_from
    assert make_wssl(init_from=str(tmp_path / "missing.pt")).head.fc8.weight.shape[0] == 21


def test_cross_joint_union_label_space(tmp_path):
    coco, voc = builtin("coco80"), builtin("voc21")
    union = union_label_space(coco, voc)
    assert union.names[:21] == voc.names                     # VOC ids kept
    assert union.num_classes == 21 + 60                      # + the 60 non-VOC COCO classes
    lut = coco.mapping_to(union)
    assert lut[coco.index("airplane")] == voc.index("aeroplane")
    assert lut[coco.index("person")] == voc.index("person")
    assert lut[coco.index("truck")] == union.index("truck") >= 21
    # every COCO class has its own id in the union (no class falls to background)
    assert len(set(lut[1:81].tolist())) == 80 and 0 not in lut[1:81]
    assert np.array_equal(voc.mapping_to(union)[:21], np.arange(21))
    p = write_label_space_yaml(union, tmp_path / "voc_coco.yaml")
    cfg = load_config({"label_space": str(p), "data": {"store": "x"}, "model": {"backbone": "tiny"},
                       "method": {"name": "wssl"}})
    assert cfg.label_space == str(p)
