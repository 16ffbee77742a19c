"""strong_only: CE on strong rows only (checked against a direct computation), the zero-strong-row
batch, config validation of its params, and that it learns a fixed batch."""

from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from raysemiseg.config import ConfigError, ModelConfig, load_config
from raysemiseg.labels import builtin
from raysemiseg.methods import Batch, get_method
from raysemiseg.methods.strong_only import StrongOnly, StrongOnlyParams

SPACE = builtin("voc21")
TINY = ModelConfig(backbone="tiny", pretrained=False)


def make(**params) -> StrongOnly:
    torch.manual_seed(0)
    return StrongOnly(SPACE, TINY, StrongOnlyParams(**params))


def test_registered_with_params() -> None:
    assert get_method("strong_only") is StrongOnly
    m = make(head_hidden=64, head_dropout=0.1)
    assert m.head.fc6.out_channels == 64 and m.head.drop.p == 0.1 and m.head.fc6.dilation == (12, 12)
    assert m.head.fc8.out_channels == SPACE.num_classes
    with pytest.raises(ConfigError, match="method: Value error, method 'strong_only' params"):
        load_config({"data": {"store": "s"}, "method": {"name": "strong_only", "params": {"head_hiden": 8}}})
    cfg = load_config({"data": {"store": "s"}, "method": {"name": "strong_only", "params": {"head_hidden": 256}}})
    assert cfg.method.build_params().head_hidden == 256


def test_loss_is_ce_over_strong_rows_only(tiny_batch: Callable[..., Batch]) -> None:
    m = make(head_hidden=32).eval()  # eval: no dropout, fixed BN -> deterministic
    batch = tiny_batch([True, False, True], size=64)
    loss = m.compute_losses(batch)["ce"]
    strong = batch.is_strong
    expected = F.cross_entropy(m.predict(batch.images[strong]), batch.masks[strong], ignore_index=255)
    torch.testing.assert_close(loss, expected)
    # the weak row's image and pseudo label do not matter
    other = tiny_batch([True, False, True], size=64)
    other.images[0], other.images[2] = batch.images[0], batch.images[2]
    other.masks[0], other.masks[2] = batch.masks[0], batch.masks[2]
    torch.testing.assert_close(m.compute_losses(other)["ce"], loss)


def test_zero_strong_rows_gives_connected_zero(tiny_batch: Callable[..., Batch]) -> None:
    m = make(head_hidden=32).train()
    loss = m.compute_losses(tiny_batch([False, False], size=64))["ce"]
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in m.parameters())


def test_predict_upsamples_to_input() -> None:
    m = make(head_hidden=32).eval()
    with torch.no_grad():
        assert m.predict(torch.randn(1, 3, 61, 45)).shape == (1, 21, 61, 45)


def test_learns_a_fixed_batch(tiny_batch: Callable[..., Batch]) -> None:
    m = make(head_hidden=64, head_dropout=0.0).train()
    batch = tiny_batch([True, True], size=48)
    groups = m.optimizer_groups(lr=0.01)
    assert len(groups) == 1 and groups[0].params[1]["lr"] == pytest.approx(0.1)  # head at 10x
    opt = torch.optim.SGD(groups[0].params, momentum=0.9)
    first = None
    for _ in range(15):
        opt.zero_grad()
        loss = m.compute_losses(batch)["ce"]
        first = loss.item() if first is None else first
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first, (first, loss.item())
