"""Stage-by-stage training through the shared loop, for the method tests (a plain module with a
unique name: ``from conftest import ...`` resolves to whichever ``conftest`` pytest imported last)."""

from __future__ import annotations

import torch

from raysemiseg.methods import Batch


def train_stages(method, batch: Batch, stages, optim_cfg) -> tuple[dict[str, float], dict[str, float]]:
    """Train ``method`` on ``batch`` through its own optimizer groups and the shared loop's
    ``train_step``, stage by stage (``[(stage, steps)]``, optimizers rebuilt per stage as the pipeline's
    stage chain does). Returns the (first, last) step's loss values."""
    from raysemiseg.train.loop import build_optimizers, train_step

    first: dict[str, float] = {}
    last: dict[str, float] = {}
    for stage, steps in stages:
        method.set_stage(stage)
        opts = build_optimizers(method, optim_cfg)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        method.train()
        for _ in range(steps):
            last = train_step(method, batch, opts, scaler, amp=False)
            first = first or dict(last)
    return first, last
