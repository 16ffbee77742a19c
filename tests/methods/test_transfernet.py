"""TransferNet (Hong et al. 2016): attention (Eq. 2-4, the global projection with its per-location
bias), densified attention = G alpha (Appendix A), the joint loss (Eq. 9, lambda on e_seg) and
the e_seg path into the attention, the BatchNorm'd decoder and its Adam recipe, fitting one batch,
batches without foreground labels, and what each stage trains."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from raysemiseg.config import ModelConfig
from raysemiseg.labels import builtin
from raysemiseg.methods import Batch, get_method
from raysemiseg.methods.decoupled.losses import ABSENT_LOGIT
from raysemiseg.methods.transfernet import (
    TransferNet,
    TransferNetParams,
    attended_feature,
    attention_weights,
    densified_attention,
)
from test_decoupled import colour_scene, fg_ious, fit  # noqa: E402  (shared toy batch and helpers)

SPACE = builtin("voc21")
MODEL = ModelConfig(backbone="tiny", pretrained=False, output_stride=8)
SMALL = TransferNetParams(attention_dim=8, cls_hidden=16, decoder_width=8, attention_grid=8)


def make(**update) -> TransferNet:
    torch.manual_seed(0)
    return TransferNet(SPACE, MODEL, SMALL.model_copy(update=update))


def batch(strong: tuple[bool, bool] = (True, False), size: int = 64) -> Batch:
    g = torch.Generator().manual_seed(2)
    masks = torch.zeros(2, size, size, dtype=torch.long)
    masks[0, 8:40, 8:40] = 3
    masks[1, 20:60, 10:30] = 7
    labels = torch.zeros(2, SPACE.num_classes)
    labels[:, 0] = 1
    labels[0, 3] = 1
    labels[1, 7] = 1
    st = torch.tensor(strong)
    masks = torch.where(st[:, None, None], masks, torch.full_like(masks, 255))
    return Batch(images=torch.randn(2, 3, size, size, generator=g), masks=masks, pseudo=torch.full_like(masks, 255),
                 image_labels=labels, is_strong=st)


def test_registered() -> None:
    assert get_method("transfernet") is TransferNet


def test_densified_attention_is_G_alpha() -> None:
    """s_l = A z_l = A A^T alpha_l = G alpha_l (TransferNet Appendix A)."""
    torch.manual_seed(0)
    A = torch.randn(3, 10, 5, dtype=torch.float64)  # (P, M, D)
    alpha = torch.softmax(torch.randn(3, 10, dtype=torch.float64), dim=1)
    z = attended_feature(A, alpha)
    assert torch.allclose(z, torch.stack([A[p].T @ alpha[p] for p in range(3)]))  # Eq. 5
    s = densified_attention(A, z)
    G = A @ A.transpose(1, 2)  # (P, M, M)
    assert torch.allclose(s, torch.einsum("pmn,pn->pm", G, alpha))


def test_attention_hand_checked() -> None:
    """Eq. 4, global form: v = W_att (W_feat vec(A) ⊙ W_label y_l) + b, alpha = softmax(v) (Eq. 3).
    A = [[1, 0], [0, 2]] (M = 2 locations, D = 2), vec(A) = [1, 0, 0, 2]; W_feat picks entries 0
    and 3 -> u = [1, 2]; W_label y_l = [2, -1] -> u ⊙ e = [2, -2]; W_att = I -> v = [2, -2] + b.
    b = 0: alpha = [e^4 / (1 + e^4), 1 / (1 + e^4)] = [0.98201, 0.01799]; b = [0, 4]: v = [2, 2],
    alpha = [0.5, 0.5]: the per-location bias changes the result (a scalar bias would not)."""
    A = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    e = torch.tensor([[2.0, -1.0]])
    w_feat = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    w_att = torch.eye(2)
    a0 = attention_weights(A, e, w_feat, w_att, torch.zeros(2))
    assert torch.allclose(a0[0], torch.tensor([math.exp(4) / (1 + math.exp(4)), 1 / (1 + math.exp(4))]))
    a1 = attention_weights(A, e, w_feat, w_att, torch.tensor([0.0, 4.0]))
    assert torch.allclose(a1[0], torch.tensor([0.5, 0.5]))
    # the per-location option: v_m = w_att . (W_feat A_m ⊙ e) + b_m with W_feat = I, w_att = 1:
    # v = [2, -2] + b again
    a2 = attention_weights(A, e, torch.eye(2), torch.ones(2), torch.tensor([0.0, 4.0]), mode="local")
    assert torch.allclose(a2[0], torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="bias b"):
        attention_weights(A, e, w_feat, w_att, torch.zeros(3))


def test_model_attention_consistent_with_functions() -> None:
    m = make().eval()
    A, hw = m.encode(torch.randn(1, 3, 64, 64))
    alpha, z, s = m.attend(A, hw, torch.tensor([0, 0]), torch.tensor([3, 7]))
    assert alpha.shape == (2, hw[0] * hw[1]) and z.shape == (2, m.backbone.out_channels)
    G = A[0] @ A[0].T
    assert torch.allclose(s, alpha @ G.T, atol=1e-4)
    assert not torch.allclose(alpha[0], alpha[1])  # label-specific


def test_attention_on_other_input_sizes() -> None:
    """M is fixed by ``attention_grid``: a 96 px input (12 x 12 features) is resized to the 8 x 8
    grid for alpha and z = A_grid^T alpha; s = A z stays on the image's own 12 x 12 grid."""
    m = make().eval()
    A, hw = m.encode(torch.randn(1, 3, 96, 96))
    assert hw == (12, 12)
    alpha, z, s = m.attend(A, hw, torch.tensor([0]), torch.tensor([3]))
    assert alpha.shape == (1, 64) and s.shape == (1, 144)
    assert torch.allclose(s, A[0] @ z[0], atol=1e-4)
    with torch.no_grad():
        assert m.predict(torch.randn(1, 3, 96, 96)).shape == (1, 21, 96, 96)


def test_attention_stage_and_joint_lambda() -> None:
    """Eq. 9: e = e_cls + lambda e_seg (lambda on the SEGMENTATION term; the old code weighted
    e_cls). e_seg alone reaches the attention (W_feat, W_label, W_att, b) through s = A A^T alpha;
    detaching s from alpha makes these gradients vanish and this test fail."""
    b = batch()
    m = make(lambda_seg=0.25)
    m.set_stage("attention")
    m.train()
    la = m.compute_losses(b)
    assert set(la) == {"cls", "img_cls"}
    sum(la.values()).backward()
    assert all(p.grad is None and not p.requires_grad for p in m.decoder.parameters())
    assert all(p.grad is None for p in m.backbone.parameters())  # frozen encoder
    attention = [m.w_feat, m.w_label.weight, m.w_att, m.att_bias]
    assert all(p.grad is not None for p in attention + list(m.f_cls.parameters()))
    m.zero_grad()
    m.set_stage("joint")
    lj = m.compute_losses(b)
    assert set(lj) == {"cls", "img_cls", "seg"}
    assert torch.allclose(lj["cls"], la["cls"])          # e_cls unweighted
    one = make(lambda_seg=1.0)
    one.set_stage("joint")
    one.train()
    assert torch.allclose(lj["seg"], 0.25 * one.compute_losses(b)["seg"], rtol=1e-5)
    grads = torch.autograd.grad(lj["seg"], attention, allow_unused=True, retain_graph=True)
    assert all(g is not None and float(g.abs().sum()) > 0 for g in grads)
    sum(lj.values()).backward()
    assert all(p.grad is not None for p in m.decoder.parameters())


def test_batch_without_foreground_labels_trains() -> None:
    """T22: a batch whose rows hold no foreground label gives no pair; the losses are exact zeros
    that still reach every trainable parameter (the old code raised ValueError)."""
    b = batch()
    b.image_labels[:, 1:] = 0.0
    m = make()
    m.set_stage("joint")
    m.train()
    losses = m.compute_losses(b)
    assert losses["cls"].item() == 0.0 and losses["seg"].item() == 0.0
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_decoder_output_depends_on_its_input() -> None:
    """At init the BatchNorm'd, Kaiming-initialised decoder passes its input through: two
    different densified attentions give fg-bg margins that differ by > 0.05 on average (the old
    plain decoder: 1.7e-3, its output was the biases)."""
    m = make().eval()
    g = torch.Generator().manual_seed(0)
    s1, s2 = torch.randn(1, 64, generator=g), torch.randn(1, 64, generator=g)
    with torch.no_grad():
        o1, o2 = m.decode(s1, (8, 8), (64, 64)), m.decode(s2, (8, 8), (64, 64))
    d = (o1[:, 1] - o1[:, 0]) - (o2[:, 1] - o2[:, 0])
    assert float(d.abs().mean()) > 0.05


def test_decoder_is_batchnormed_and_paper_optimizer() -> None:
    """DeconvNet decoder: every (de)convolution followed by BatchNorm; Adam (Sec. 6.1) with the
    attention + decoder at ``optim.lr * head_lr_mult`` = 5e-4 at the configs' lr 1e-4."""
    m = make()
    layers = list(m.decoder.modules())
    convs = [i for i, x in enumerate(layers) if isinstance(x, (nn.Conv2d, nn.ConvTranspose2d))]
    assert all(isinstance(layers[i + 1], nn.BatchNorm2d) for i in convs[:-1]) and len(convs) >= 3
    (grp,) = m.optimizer_groups(1e-4)
    assert grp.optimizer == "adam"
    assert [pg["lr"] for pg in grp.params] == [pytest.approx(5e-4)] * 2  # attention, heads; frozen encoder
    ids = [id(p) for pg in grp.params for p in pg["params"]]
    assert sorted({id(p) for p in m.parameters() if p.requires_grad}) == sorted(ids)


def test_joint_stage_fits_a_batch() -> None:
    """Attention 20 steps, then joint 200 steps through the method's own optimizer groups and its
    shipped recipe (configs/methods/transfernet.yaml: Adam 5e-4; a frozen random tiny encoder): every (image, label) pair of the toy batch reaches fg IoU > 0.5 with the given labels,
    the two labels of row 0 included. The old plain decoder with its SGD recipe stayed at the prior."""
    torch.manual_seed(0)
    m = TransferNet(SPACE, MODEL, SMALL.model_copy(update={"decoder_width": 16}))
    b = colour_scene()
    fit(m, b, [("attention", 20), ("joint", 200)])
    ious = fg_ious(m, b)
    assert min(ious.values()) > 0.5, ious


def test_decoder_learns_from_source_rows_only() -> None:
    m = make()
    m.train()
    losses = m.compute_losses(batch(strong=(False, False)))
    assert losses["seg"].item() == 0.0
    losses["seg"].backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in m.decoder.parameters())


def test_predict_gt_labels_and_own_classifier() -> None:
    b = batch()
    m = make(use_gt_labels=True).eval()
    with torch.inference_mode():
        out = m.predict(b.images, image_labels=b.image_labels)
    present = (out > ABSENT_LOGIT).flatten(2).any(-1)
    assert present[0].nonzero().flatten().tolist() == [0, 3]
    assert present[1].nonzero().flatten().tolist() == [0, 7]
    m2 = make().eval()
    with torch.no_grad():
        out2 = m2.predict(b.images)
    assert out2.shape == (2, 21, 64, 64) and torch.isfinite(out2).all()


def test_pretraining_stage_hands_on_its_latest_checkpoint() -> None:
    """The attention stage's val mIoU scores an untrained segmenter (ties every epoch): the driver
    hands on its latest checkpoint; the joint stage's best by val mIoU."""
    from raysemiseg.train.driver import checkpoint_rule
    from raysemiseg.config import load_config

    cfg = load_config(str(Path(__file__).resolve().parents[2] / "configs" / "methods" / "transfernet.yaml"))
    assert checkpoint_rule(cfg.model_copy(update={"method": cfg.method.model_copy(update={"stage": "attention"})})) == "latest"
    assert checkpoint_rule(cfg.model_copy(update={"method": cfg.method.model_copy(update={"stage": "joint"})})) == "best"
