"""TransferNet (Hong et al. 2016): attention (Eq. 2-4), densified attention = G alpha
(Appendix A), the joint loss (Eq. 9) and what each stage trains."""

from __future__ import annotations

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

SPACE = builtin("voc21")
MODEL = ModelConfig(backbone="tiny", pretrained=False, output_stride=8)
SMALL = TransferNetParams(attention_dim=8, cls_hidden=16, decoder_width=8)


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
    """W_feat = I, W_label y_l = e, W_att = 1, b = 0.5: v = A e + 0.5, alpha = softmax(v) (Eq. 2-4)."""
    A = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]])  # M=3, D=2
    e = torch.tensor([[2.0, -1.0]])
    w_feat = nn.Linear(2, 2, bias=False)
    w_att = nn.Linear(2, 1)
    with torch.no_grad():
        w_feat.weight.copy_(torch.eye(2))
        w_att.weight.fill_(1.0)
        w_att.bias.fill_(0.5)
    alpha = attention_weights(A, e, w_feat, w_att)
    v = torch.tensor([2.0, -2.0, 1.0]) + 0.5
    assert torch.allclose(alpha[0], torch.softmax(v, 0))
    assert torch.allclose(alpha.sum(1), torch.ones(1))


def test_model_attention_consistent_with_functions() -> None:
    m = make().eval()
    A, hw = m.encode(torch.randn(1, 3, 64, 64))
    alpha, z, s = m.attend(A, torch.tensor([0, 0]), torch.tensor([3, 7]))
    assert alpha.shape == (2, hw[0] * hw[1]) and z.shape == (2, m.backbone.out_channels)
    G = A[0] @ A[0].T
    assert torch.allclose(s, alpha @ G.T, atol=1e-4)
    assert not torch.allclose(alpha[0], alpha[1])  # label-specific


def test_attention_stage_and_joint_lambda() -> None:
    m = make(lambda_cls=0.25)
    b = batch()
    m.set_stage("attention")
    m.train()
    la = m.compute_losses(b)
    assert set(la) == {"cls", "img_cls"}
    sum(la.values()).backward()
    assert all(p.grad is None and not p.requires_grad for p in m.decoder.parameters())
    assert all(p.grad is None for p in m.backbone.parameters())  # frozen encoder
    assert all(p.grad is not None for mod in (m.w_feat, m.w_label, m.w_att, m.f_cls) for p in mod.parameters())
    m.zero_grad()
    m.set_stage("joint")
    lj = m.compute_losses(b)
    assert set(lj) == {"cls", "img_cls", "seg"}
    assert torch.allclose(lj["cls"], 0.25 * la["cls"])  # Eq. 9: e_seg + lambda e_cls
    sum(lj.values()).backward()
    assert all(p.grad is not None for p in m.decoder.parameters())


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
