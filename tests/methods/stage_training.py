"""Stage-by-stage training through the shared loop, for the method tests (a plain module with a
unique name: ``from conftest import ...`` resolves to whichever ``conftest`` pytest imported last)."""

from __future__ import annotations

from typing import Any, Callable

import torch

from raysemiseg.methods import Batch


def train_stages(method, batch: Batch, stages, optim_cfg, until: Callable[[Any], bool] | None = None,
                 every: int = 5) -> tuple[dict[str, float], dict[str, float], int]:
    """Train ``method`` on ``batch`` through its own optimizer groups and the shared loop's
    ``train_step``, stage by stage (``[(stage, steps)]``, optimizers rebuilt per stage as the pipeline's
    stage chain does).

    ``until(method) -> bool``, when given, is asked every ``every`` steps of the *last* stage (and after its
    last step): training stops at the first True (the check's "fits within the budget": the budget is the
    stage's step count, the answer the same check the test asserts). ``until`` may switch the method to eval
    mode; training mode is restored before the next step.

    Returns:
        The (first, last) step's loss values and the number of steps the last stage ran.
    """
    from raysemiseg.train.loop import build_optimizers, train_step

    first: dict[str, float] = {}
    last: dict[str, float] = {}
    ran = 0
    for i, (stage, steps) in enumerate(stages):
        method.set_stage(stage)
        opts = build_optimizers(method, optim_cfg)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        final = i == len(stages) - 1
        for ran in range(1, steps + 1):
            method.train()
            last = train_step(method, batch, opts, scaler, amp=False)
            first = first or dict(last)
            if final and until is not None and (ran % every == 0 or ran == steps) and until(method):
                break
    return first, last, ran
