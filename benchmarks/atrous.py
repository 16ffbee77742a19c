"""Dilated depthwise convolutions on CPU: torch's dilated kernel vs the space-to-batch form
(:class:`raysemiseg.models.backbones.SpaceToBatchConv2d`), measured side by side in one process.

    python benchmarks/atrous.py [--rounds 6] [--steps 5] [--threads 2]

1. One convolution, forward + backward: EfficientNet-Lite0's 5x5 depthwise conv at 1152 channels
   with dilation 2, 8 x 12 x 12 outputs (output stride 16, 192 px crops), as in blocks 12-14; the two forms
   interleaved in 6 rounds of 10 calls, the first round dropped.
2. The quickstart's strong-only training step (``configs/quickstart.yaml``: EfficientNet-Lite0 at
   output stride 16, 8 random 192 px crops, ``train_step`` with its AdamW groups): two copies of the
   network with the same initial weights, one with the backbone's dilated depthwise convolutions
   switched back to torch's dilated kernel; their steps interleaved in rounds, the first round
   dropped as warm-up.

Prints ms per call / s per step for both and the ratio space-to-batch / dilated (< 1: faster).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def one_conv(n: int = 10) -> tuple[float, float]:
    """(dilated ms, space-to-batch ms) per forward + backward of the 1152-channel 5x5 conv."""
    import torch

    from raysemiseg.models.backbones import SpaceToBatchConv2d

    conv = SpaceToBatchConv2d(1152, 1152, 5, dilation=2, groups=1152, bias=False)
    plain = SpaceToBatchConv2d(1152, 1152, 5, dilation=2, groups=1152, bias=False)
    plain.forward = plain.forward_dilated
    x = torch.randn(8, 1152, 12, 12, requires_grad=True)
    total = [0.0, 0.0]
    for r in range(6):  # interleaved rounds, the first dropped as warm-up
        for k, m in enumerate((plain, conv)):
            t = time.perf_counter()
            for _ in range(n):
                m(x).sum().backward()
            if r:
                total[k] += 1000 * (time.perf_counter() - t) / (n * 5)
    return total[0], total[1]


def train_steps(rounds: int, steps: int) -> tuple[float, float]:
    """(dilated s/step, space-to-batch s/step) of the quickstart's strong-only step, interleaved."""
    import json

    import torch

    from raysemiseg.config import dotted, load_config
    from raysemiseg.experiment import load_experiment
    from raysemiseg.labels import load_label_space
    from raysemiseg.methods.base import get_method
    from raysemiseg.models.backbones import SpaceToBatchConv2d
    from raysemiseg.train.data import Batch
    from raysemiseg.train.loop import build_optimizers, train_step

    ecfg = load_experiment(ROOT / "configs" / "quickstart.yaml")
    arm = next(a for a in ecfg.arms if a.name == "strong-only")
    cfg = load_config(json.loads(json.dumps(ecfg.base)), overrides=dotted(arm.steps[0].train or {}))
    space = load_label_space(cfg.label_space)
    b, s = cfg.data.batch_size, cfg.data.crop_size
    batch = Batch(images=torch.randn(b, 3, s, s), masks=torch.randint(0, space.num_classes, (b, s, s)),
                  pseudo=torch.full((b, s, s), space.ignore_index), image_labels=torch.zeros(b, space.num_classes),
                  is_strong=torch.ones(b, dtype=torch.bool), box_masks=None, image_ids=[str(i) for i in range(b)],
                  valid=None, box_bits=None)
    nets = {}
    for name in ("dilated", "space_to_batch"):
        torch.manual_seed(0)
        m = get_method(cfg.method.name)(space, cfg.model, cfg.method.build_params())
        m.set_stage(cfg.method.stage)
        m.train()
        if name == "dilated":
            for mod in m.modules():
                if isinstance(mod, SpaceToBatchConv2d):
                    mod.forward = mod.forward_dilated
        nets[name] = (m, build_optimizers(m, cfg.optim))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    total = {k: 0.0 for k in nets}
    for r in range(rounds):
        for k, (m, opts) in nets.items():
            t = time.perf_counter()
            for _ in range(steps):
                train_step(m, batch, opts, scaler, amp=False)
            if r:
                total[k] += (time.perf_counter() - t) / (steps * (rounds - 1))
    return total["dilated"], total["space_to_batch"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    d, s = one_conv()
    print(f"5x5 depthwise conv, 1152 ch, dilation 2, 8x12x12, fwd+bwd: dilated {d:.1f} ms, "
          f"space-to-batch {s:.1f} ms, ratio {s / d:.2f}")
    d, s = train_steps(args.rounds, args.steps)
    print(f"quickstart strong-only train_step ({args.threads} threads): dilated {d:.3f} s, "
          f"space-to-batch {s:.3f} s, ratio {s / d:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
