"""Gradient averaging with torch DDP (raysemiseg.train.loop.GradSync) across 2 real gloo processes.

A 2-worker step with batch B per worker must equal a 1-worker step on the 2B batch (the losses are
means over the batch, so the mean of the two workers' gradients is the gradient on 2B), for every
optimizer group (SGD with momentum and weight decay, and Adam), including a parameter used on one
worker only (counts as zero on the other) and one used on none (keeps no gradient: weight decay
leaves it alone). A non-finite gradient on one worker makes the GradScaler skip the step and back
off on *both* workers.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from raysemiseg.config import OptimConfig
from raysemiseg.labels import builtin
from raysemiseg.methods.base import Batch, Method, OptimizerGroup
from raysemiseg.train.loop import GradSync, build_optimizers, train_step

B = 3          # rows per worker
LR = 0.1
WD = 0.01


class _Tiny(Method):
    """A segmenter (main, SGD), a critic fed by it (disc, Adam), a term on strong rows only, and an
    unused layer. Every loss is a sum over rows divided by the batch size (a batch mean)."""

    name: ClassVar[str] = "_ddp_tiny_test"

    def __init__(self) -> None:
        super().__init__(builtin("voc21"), None)
        self.seg = nn.Linear(2, 2)
        self.extra = nn.Linear(2, 1, bias=False)  # used on strong rows only
        self.critic = nn.Linear(2, 1)
        self.unused = nn.Linear(2, 2)

    def compute_losses(self, batch: Batch) -> dict[str, Tensor]:
        x, n = batch.images, batch.images.shape[0]
        out = self.seg(x)
        losses = {"ce": out.pow(2).sum() / n, "disc/adv": self.critic(torch.tanh(out)).sum() / n}
        if batch.is_strong.any():
            losses["strong"] = self.extra(x[batch.is_strong]).sum() / n
        return losses

    def optimizer_groups(self, lr: float) -> list[OptimizerGroup]:
        main = [*self.seg.parameters(), *self.extra.parameters(), *self.unused.parameters()]
        return [OptimizerGroup("main", [{"params": main, "lr": lr}]),
                OptimizerGroup("disc", [{"params": list(self.critic.parameters()), "lr": lr * 2}], optimizer="adam")]


def _batches() -> list[Batch]:
    """Two steps of 2B rows; the strong rows are all in the first B (worker 0's half)."""
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(2):
        x = torch.randn(2 * B, 2, generator=g)
        strong = torch.zeros(2 * B, dtype=torch.bool)
        strong[:2] = True
        out.append(Batch(images=x, masks=torch.zeros(2 * B), pseudo=torch.zeros(2 * B),
                         image_labels=torch.zeros(2 * B, 21), is_strong=strong))
    return out


def _half(b: Batch, rank: int) -> Batch:
    return b.select(torch.arange(rank * B, (rank + 1) * B))


def _model_and_opts() -> tuple[_Tiny, dict[str, torch.optim.Optimizer]]:
    torch.manual_seed(0)
    m = _Tiny()
    return m, build_optimizers(m, OptimConfig(lr=LR, momentum=0.9, weight_decay=WD))


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        m, opts = _model_and_opts()
        sync = GradSync(opts)
        assert sync.distributed and set(sync.ddp) == {"main", "disc"}
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        for b in _batches():
            train_step(m, _half(b, rank), opts, scaler, amp=False, sync=sync)
        torch.save(m.state_dict(), Path(out_dir) / f"rank{rank}.pt")

        # one worker's loss is inf: both workers skip the step and halve the scale
        m2, opts2 = _model_and_opts()
        sync2 = GradSync(opts2)
        scaler2 = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, enabled=True)
        b = _half(_batches()[0], rank)
        if rank == 1:
            b.images[0, 0] = float("inf")
        train_step(m2, b, opts2, scaler2, amp=True, sync=sync2)
        torch.save({"state": m2.state_dict(), "scale": scaler2.get_scale()}, Path(out_dir) / f"inf{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_workers_at_batch_b_equal_one_worker_at_2b(tmp_path: Path) -> None:
    m, opts = _model_and_opts()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    batches = _batches()
    # hand check of the first step of `extra` (SGD, zero momentum buffer): d/dw sum_strong(w.x)/2B
    w0 = m.extra.weight.detach().clone()
    x0 = batches[0].images
    expected_extra_1 = w0 - LR * (x0[:2].sum(0, keepdim=True) / (2 * B) + WD * w0)
    train_step(m, batches[0], opts, scaler, amp=False)
    assert torch.allclose(m.extra.weight, expected_extra_1, atol=1e-7)
    train_step(m, batches[1], opts, scaler, amp=False)
    single = m.state_dict()
    assert torch.equal(single["unused.weight"], before["unused.weight"])  # no gradient: weight decay skipped
    assert not torch.equal(single["critic.weight"], before["critic.weight"])

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for k, v in single.items():
            torch.testing.assert_close(got[k], v, atol=1e-6, rtol=1e-5, msg=lambda s, k=k: f"{k}: {s}")
    inf = [torch.load(tmp_path / f"inf{rank}.pt", weights_only=True) for rank in range(2)]
    for rank in range(2):
        assert inf[rank]["scale"] == 2.0 ** 9  # backed off once, on both workers
        for k in ("seg.weight", "seg.bias", "extra.weight", "unused.weight"):
            assert torch.equal(inf[rank]["state"][k], before[k]), k  # main's inf gradient: step skipped
    # the critic sees tanh(inf) = 1, a finite gradient: it steps, identically on both workers
    assert not torch.equal(inf[0]["state"]["critic.weight"], before["critic.weight"])
    for k, v in inf[0]["state"].items():
        assert torch.equal(inf[1]["state"][k], v), k


def test_one_process_needs_no_sync_and_rejects_shared_parameters() -> None:
    m, opts = _model_and_opts()
    sync = GradSync(opts)
    assert not sync.distributed and sync.ddp == {}
    loss = torch.tensor(2.0)
    assert sync.attach("main", loss) is loss
    shared = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="'a' and 'b'"):
        GradSync({"a": torch.optim.SGD(shared.parameters(), lr=0.1), "b": torch.optim.SGD([shared.weight], lr=0.1)})
