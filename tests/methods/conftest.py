"""Shared fixtures of the method tests: a tiny, hand-made :class:`Batch` on the voc21 space."""

from __future__ import annotations

from typing import Callable

import pytest
import torch

from raysemiseg.labels import builtin
from raysemiseg.methods import Batch

SIZE = 112  # tiny backbone at output stride 8 -> 14x14 features: LargeFOV's dilation-12 taps see data


def make_tiny_batch(is_strong: list[bool], size: int = SIZE, seed: int = 0) -> Batch:
    """Rows with background and one rectangle of a foreground class each (ids 1..20), a few void
    pixels; weak rows have ``masks == ignore`` and the true mask as pseudo label."""
    g = torch.Generator().manual_seed(seed)
    n, ign = len(is_strong), builtin("voc21").ignore_index
    truth = torch.zeros(n, size, size, dtype=torch.long)
    box = torch.full((n, size, size), ign, dtype=torch.long)
    labels = torch.zeros(n, builtin("voc21").num_classes)
    labels[:, 0] = 1.0
    for i in range(n):
        c = 1 + (3 * i + seed) % 20
        y0, x0 = torch.randint(0, size // 2, (2,), generator=g).tolist()
        truth[i, y0:y0 + size // 3, x0:x0 + size // 3] = c
        box[i] = 0
        box[i, y0:y0 + size // 3, x0:x0 + size // 3] = c
        labels[i, c] = 1.0
    truth[:, :2, :] = ign  # a void border
    strong = torch.tensor(is_strong)
    masks = torch.where(strong.view(-1, 1, 1), truth, torch.full_like(truth, ign))
    pseudo = torch.where(strong.view(-1, 1, 1), torch.full_like(truth, ign), truth)
    return Batch(
        images=torch.randn(n, 3, size, size, generator=g),
        masks=masks,
        pseudo=pseudo,
        image_labels=labels,
        is_strong=strong,
        box_masks=box,
        image_ids=[f"img{i}" for i in range(n)],
    )


@pytest.fixture
def tiny_batch() -> Callable[..., Batch]:
    """``tiny_batch(is_strong: list[bool], size=112, seed=0) -> Batch`` (see :func:`make_tiny_batch`)."""
    return make_tiny_batch
