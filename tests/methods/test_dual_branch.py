"""Strong-weak dual-branch network (Luo & Yang 2020) and its baselines: neck sharing by parameter
identity, gradient isolation between branches, strong-branch-only inference, the paper's loss
and optimiser groups, single-branch mixed CE and the Eq. 4 lambda ensemble."""

from __future__ import annotations

import math

import pytest
import torch

from raysemiseg.config import ModelConfig
from raysemiseg.labels import builtin
from raysemiseg.methods import Batch, get_method
from raysemiseg.methods.dual_branch import DualBranchParams, LambdaEnsemble, SingleBranchParams
from raysemiseg.methods.dual_branch.losses import lambda_average

TINY = ModelConfig(backbone="tiny", pretrained=False, output_stride=8)
VOC = builtin("voc21")
IG = 255


def make_dual(n: int, **kw):
    return get_method("dual_branch")(VOC, TINY, DualBranchParams(neck_depth=n, neck_channels=8, **kw))


def make_batch(n_strong: int, n_weak: int, size: int = 32, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    n = n_strong + n_weak
    strong = torch.arange(n) < n_strong
    masks = torch.full((n, size, size), IG, dtype=torch.long)
    masks[strong] = torch.randint(0, 21, (n_strong, size, size), generator=g)
    pseudo = torch.full((n, size, size), IG, dtype=torch.long)
    pseudo[~strong] = torch.randint(0, 21, (n_weak, size, size), generator=g)
    labels = torch.zeros(n, 21)
    labels[:, 0] = 1
    return Batch(images=torch.randn(n, 3, size, size, generator=g), masks=masks, pseudo=pseudo,
                 image_labels=labels, is_strong=strong)


@pytest.mark.parametrize("n", [0, 1, 2, 3])
def test_neck_sharing_by_parameter_identity(n):
    m = make_dual(n)
    s_path, w_path = m.neck_path("strong"), m.neck_path("weak")
    assert len(s_path) == len(w_path) == 3
    assert [a is b for a, b in zip(s_path, w_path)] == [True] * n + [False] * (3 - n)
    s_params = {id(p) for layer in s_path for p in layer.parameters()}
    w_params = {id(p) for layer in w_path for p in layer.parameters()}
    shared = {id(p) for p in m.shared_neck.parameters()}
    assert s_params & w_params == shared
    assert len(shared) == 2 * n                                   # weight + bias per shared conv
    if n == 3:
        assert s_params == w_params                               # every neck parameter shared
    if n == 0:
        assert not (s_params & w_params)                          # none shared
    # the classifiers are never shared; branches have identical structure
    assert m.strong_branch.classifier is not m.weak_branch.classifier
    assert [p.shape for p in m.strong_branch.parameters()] == [p.shape for p in m.weak_branch.parameters()]


@pytest.mark.parametrize("n", [0, 3])
def test_gradients_do_not_cross_branches(n):
    torch.manual_seed(0)
    for kind in ("weak", "strong"):
        m = make_dual(n)
        batch = make_batch(0, 3) if kind == "weak" else make_batch(3, 0)
        sum(m.compute_losses(batch).values()).backward()
        used = m.weak_branch if kind == "weak" else m.strong_branch
        other = m.strong_branch if kind == "weak" else m.weak_branch
        for name, p in other.named_parameters():
            assert p.grad is None or float(p.grad.abs().sum()) == 0.0, (kind, name)
        for name, p in used.named_parameters():
            assert p.grad is not None and float(p.grad.abs().sum()) > 0.0, (kind, name)
        for name, p in list(m.backbone.named_parameters()) + list(m.shared_neck.named_parameters()):
            assert p.grad is not None, name


def test_predict_uses_the_strong_branch_only():
    torch.manual_seed(0)
    m = make_dual(2).eval()
    x = torch.randn(2, 3, 32, 32)
    before = m.predict(x)
    assert before.shape == (2, 21, 32, 32)
    with torch.no_grad():
        for p in m.weak_branch.parameters():
            p.add_(1.0)
    assert torch.equal(m.predict(x), before)
    with torch.no_grad():
        m.strong_branch.classifier.bias.add_(1.0)
    assert not torch.equal(m.predict(x), before)


def _constant_dual(**kw):
    """Dual-branch net whose logits are its classifiers' biases everywhere (weights 0): strong
    branch 1 at class 3, weak branch 2 at class 5, 0 elsewhere. Per-pixel CE: strong branch
    z_s - 1 at class 3 and z_s elsewhere (z_s = ln(20 + e)); weak branch z_w - 2 at class 5 and
    z_w elsewhere (z_w = ln(20 + e^2))."""
    m = make_dual(1, **kw)
    with torch.no_grad():
        for b, c, v in ((m.strong_branch, 3, 1.0), (m.weak_branch, 5, 2.0)):
            b.classifier.weight.zero_()
            b.classifier.bias.zero_()
            b.classifier.bias[c] = v
    return m


def _loss_batch() -> Batch:
    """Row 0 strong: mask 4 px class 3 + 12 px class 0, and a pseudo label (the generator's) of
    8 px class 5 + 8 void. Row 1 weak: pseudo 8 px class 5 + 8 px class 0. Row 2 weak: 16 px class 0."""
    masks = torch.full((3, 4, 4), IG, dtype=torch.long)
    masks[0] = 0
    masks[0, 0] = 3
    pseudo = torch.full((3, 4, 4), IG, dtype=torch.long)
    pseudo[0, :2] = 5
    pseudo[1] = 0
    pseudo[1, :2] = 5
    pseudo[2] = 0
    labels = torch.zeros(3, 21)
    labels[:, 0] = 1
    return Batch(images=torch.randn(3, 3, 4, 4), masks=masks, pseudo=pseudo, image_labels=labels,
                 is_strong=torch.tensor([True, False, False]))


def test_loss_is_two_separately_normalised_ces_eq3():
    """Luo & Yang 2020 Eq. 2/3: L = L_ce(s^s, m^s) + L_ce(s^w, m^w), each CE averaged over its OWN
    mask's labelled pixels (Eq. 2), the strong branch on the strong rows only, the weak branch on
    the weak rows only; equal weights (weak_weight scales the second term).

    Hand-checked on :func:`_loss_batch`: strong CE = (4 (z_s - 1) + 12 z_s) / 16 = z_s - 1/4;
    weak CE = (8 (z_w - 2) + 24 z_w) / 32 = z_w - 1/2 (the strong row's pseudo label is not used).
    A pooled mean would give (4 (z_s - 1) + 12 z_s + 8 (z_w - 2) + 24 z_w) / 48 instead."""
    zs, zw = math.log(20 + math.e), math.log(20 + math.e ** 2)
    losses = _constant_dual().compute_losses(_loss_batch())
    assert set(losses) == {"strong_ce", "weak_ce"}
    assert losses["strong_ce"].item() == pytest.approx(zs - 0.25, rel=1e-6)
    assert losses["weak_ce"].item() == pytest.approx(zw - 0.5, rel=1e-6)
    half = _constant_dual(weak_weight=0.5).compute_losses(_loss_batch())
    assert half["weak_ce"].item() == pytest.approx(0.5 * (zw - 0.5), rel=1e-6)
    assert half["strong_ce"].item() == pytest.approx(zs - 0.25, rel=1e-6)


def test_weak_branch_can_train_on_strong_rows_too():
    """Luo & Yang Table 1's main setting: the weak branch trained on "strong + weak" images.
    ``weak_branch_rows="all"``: strong rows also go through the weak branch, with their mask
    (default ``weak_branch_strong_target="mask"``: Table 1 names the weak branch's data by
    annotation kind) or with their pseudo label (``"pseudo"``, the proxy label the generator G
    gives every image). The strong branch is unchanged (z_s - 1/4).

    mask:   weak CE = (8 (z_w - 2) + 24 z_w + 16 z_w) / 48 = z_w - 1/3;
    pseudo: weak CE = (16 (z_w - 2) + 24 z_w) / 40 = z_w - 0.8."""
    zs, zw = math.log(20 + math.e), math.log(20 + math.e ** 2)
    allp = _constant_dual(weak_branch_rows="all", weak_branch_strong_target="pseudo").compute_losses(_loss_batch())
    assert allp["weak_ce"].item() == pytest.approx(zw - 0.8, rel=1e-6)
    assert allp["strong_ce"].item() == pytest.approx(zs - 0.25, rel=1e-6)
    allm = _constant_dual(weak_branch_rows="all").compute_losses(_loss_batch())
    assert allm["weak_ce"].item() == pytest.approx(zw - 1 / 3, rel=1e-6)
    # strong rows now send a gradient into the weak branch
    m = make_dual(1, weak_branch_rows="all")
    sum(m.compute_losses(make_batch(2, 0)).values()).backward()
    assert float(m.weak_branch.classifier.weight.grad.abs().sum()) > 0
    assert DualBranchParams().weak_branch_rows == "weak"
    assert DualBranchParams(weak_branch_rows="all").pseudo_label_roles() == ("weak",)
    pseudo = DualBranchParams(weak_branch_rows="all", weak_branch_strong_target="pseudo")
    assert set(pseudo.pseudo_label_roles()) == {"weak", "strong"}


def test_optimizer_groups_follow_the_paper():
    m = make_dual(2)
    (group,) = m.optimizer_groups(1e-4)
    assert group.name == "main" and group.optimizer == "adam"
    lrs = [g["lr"] for g in group.params]
    assert lrs == pytest.approx([5e-6, 1e-4])
    n_backbone = sum(1 for _ in m.backbone.parameters())
    assert len(group.params[0]["params"]) == n_backbone
    assert sum(len(g["params"]) for g in group.params) == sum(1 for _ in m.parameters())


def test_single_branch_mixed_is_one_ce_over_both_kinds():
    torch.manual_seed(0)
    cls = get_method("single_branch_mixed")
    m = cls(VOC, TINY, SingleBranchParams(neck_channels=8)).eval()
    with torch.no_grad():
        m.branch.classifier.weight.zero_()
        m.branch.classifier.bias.zero_()
        m.branch.classifier.bias[3] = 1.0          # logits (0,..,1 at class 3,..,0)
    batch = Batch(images=torch.randn(2, 3, 8, 8), masks=torch.full((2, 8, 8), IG), pseudo=torch.full((2, 8, 8), IG),
                  image_labels=torch.zeros(2, 21), is_strong=torch.tensor([True, False]))
    batch.masks[0, :2] = 3          # 16 strong pixels of class 3
    batch.pseudo[1, :6] = 0         # 48 weak pixels of class 0
    z = math.log(20 + math.e)
    expected = (16 * (z - 1.0) + 48 * z) / 64
    assert m.compute_losses(batch)["mixed_ce"].item() == pytest.approx(expected, rel=1e-5)
    strong_only = cls(VOC, TINY, SingleBranchParams(neck_channels=8, use_weak=False)).eval()
    strong_only.load_state_dict(m.state_dict())
    assert strong_only.compute_losses(batch)["mixed_ce"].item() == pytest.approx(z - 1.0, rel=1e-5)
    with pytest.raises(ValueError, match="at least one"):
        cls(VOC, TINY, SingleBranchParams(use_strong=False, use_weak=False))


def test_lambda_ensemble_eq4():
    """Luo & Yang 2020 Eq. 4: F(x) = lambda F_w(x) + (1 - lambda) F_s(x), i.e. lambda weights the
    WEAK network (the paper's best lambda = 0.4 puts 0.4 on the weak net, 0.6 on the strong one).

    Hand-checked: p_s = [0.9, 0.1], p_w = [0.3, 0.7], lambda = 0.25:
    0.25 * [0.3, 0.7] + 0.75 * [0.9, 0.1] = [0.075 + 0.675, 0.175 + 0.075] = [0.75, 0.25]
    (the reversed convention would give [0.45, 0.55])."""
    ps = torch.tensor([0.9, 0.1]).view(1, 2, 1, 1)
    pw = torch.tensor([0.3, 0.7]).view(1, 2, 1, 1)
    assert lambda_average(ps, pw, 0.25).flatten().tolist() == pytest.approx([0.75, 0.25])
    # lambda = 0.4 (the paper's best): 0.4 * 0.3 + 0.6 * 0.9 = 0.66
    assert lambda_average(prob_strong=ps, prob_weak=pw, lam=0.4).flatten().tolist() == pytest.approx([0.66, 0.34])
    with pytest.raises(ValueError):
        lambda_average(ps, pw, 1.5)
    torch.manual_seed(0)
    a, b = make_dual(3).eval(), make_dual(3).eval()
    x = torch.randn(1, 3, 16, 16)
    # lambda = 1: the weak network alone; lambda = 0: the strong network alone
    assert torch.allclose(LambdaEnsemble(a, b, lam=1.0).predict(x), b.predict(x).log_softmax(1), atol=1e-5)
    assert torch.allclose(LambdaEnsemble(a, b, lam=0.0).predict(x), a.predict(x).log_softmax(1), atol=1e-5)
    mix = LambdaEnsemble(a, b, lam=0.25).predict(x).exp()
    assert torch.allclose(mix, 0.75 * a.predict(x).softmax(1) + 0.25 * b.predict(x).softmax(1), atol=1e-6)
    assert LambdaEnsemble(a, b).lam == 0.4                         # the paper's best lambda by default
