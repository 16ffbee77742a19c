"""Ray Train overhead: the same model, data and steps through Ray Train (1 worker) and a plain loop.

    python benchmarks/train_overhead.py [--backbone efficientnet_lite0] [--steps 30] [--batch 8] [--crop 192]

Both paths use the same pieces: the store's train rows, :func:`raysemiseg.train.data.augment_batch`
(decode + random scale/crop/flip), :func:`collate`, :func:`train_step` and the same optimizers,
seeded identically. The Ray path runs them as Ray Data tasks feeding one ``TorchTrainer`` worker
(``cpus_per_worker`` threads); the plain path decodes inline in one process with the same number
of torch threads. Steady-state images/s skips the first ``--warmup`` steps of each. Prints both and
the ratio Ray / plain (goal >= 0.9).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def plain_loop(cfg, steps: int, warmup: int) -> float:
    """Single-process PyTorch loop; returns steady-state images/s."""
    import numpy as np
    import torch

    from raysemiseg.data.store import open_store
    from raysemiseg.methods.base import get_method
    from raysemiseg.train.data import attach_roles, augment_batch, collate, read_roles
    from raysemiseg.train.loop import build_optimizers, normalisation, poly_factor, set_lr, train_step

    torch.set_num_threads(int(cfg.scaling.cpus_per_worker))
    store = open_store(cfg.data.store)
    space = store.label_space
    roles = read_roles(cfg.data, store).to_pydict()
    ids = {i: r for i, s, r in zip(roles["image_id"], roles["split"], roles["role"]) if s == cfg.data.train_split}
    rows = attach_roles(store.read_table(), ids, {})
    torch.manual_seed(cfg.run.seed)
    method = get_method(cfg.method.name)(space, cfg.model, cfg.method.build_params())
    method.set_stage(cfg.method.stage)
    mean, std = normalisation(method)
    opts = build_optimizers(method, cfg.optim)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    rng = np.random.default_rng(cfg.run.seed)
    b = cfg.data.batch_size
    method.train()
    t0, n = None, 0
    for step in range(steps):
        if step == warmup:
            t0, n = time.perf_counter(), 0
        start = (step * b) % max(rows.num_rows - b, 1)
        arrays = augment_batch(rows.slice(start, b), crop=cfg.data.crop_size, scale_range=tuple(cfg.data.scale_range),
                               flip=cfg.data.flip, ignore_index=space.ignore_index, num_classes=space.num_classes,
                               uses_boxes=False, seed=cfg.run.seed, rng=rng)
        set_lr(opts, poly_factor(step, steps, cfg.optim.poly_power))
        train_step(method, collate(arrays, mean, std), opts, scaler, amp=False)
        n += b
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/bench")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=2, help="steps excluded from the steady-state rate (Ray loop: 2)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--crop", type=int, default=192)
    p.add_argument("--cpus", type=int, default=2, help="threads of the training process (Ray: cpus_per_worker)")
    args = p.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")

    from raysemiseg.config import load_config
    from raysemiseg.quickstart import ensure_store
    from raysemiseg.runtime import ensure_ray
    from raysemiseg.train.driver import train

    work = Path(args.workdir).resolve()
    cfg = load_config({
        "data": {"store": str(work / "store"), "crop_size": args.crop, "batch_size": args.batch, "max_val_rows": 2,
                 "scale_range": [0.75, 1.25]},
        "model": {"backbone": args.backbone, "pretrained": args.backbone != "tiny", "output_stride": 16},
        "method": {"name": "strong_only", "params": {"head_hidden": 256, "head_dilation": 6}},
        "optim": {"epochs": 1, "steps_per_epoch": args.steps, "lr": 0.001},
        "scaling": {"num_workers": 1, "cpus_per_worker": args.cpus},
        "run": {"name": f"bench-{int(time.time())}", "storage_path": str(work / "runs"), "max_failures": 0},
        "tracking": {"enabled": False},
    })
    ensure_ray(num_cpus=args.cpus + 1)
    ensure_store(cfg.data.store, cfg.label_space)

    print(f"{args.backbone}, batch {args.batch}, crop {args.crop}, {args.steps} steps ({args.warmup} warm-up), "
          f"{args.cpus} training threads", flush=True)
    t = time.perf_counter()
    plain = plain_loop(cfg, args.steps, args.warmup)
    print(f"plain PyTorch loop : {plain:7.2f} images/s   ({time.perf_counter() - t:.0f} s wall)", flush=True)
    t = time.perf_counter()
    res = train(cfg)
    ray_rate = float(res.metrics["train_images_per_s"])
    print(f"Ray Train, 1 worker: {ray_rate:7.2f} images/s   ({time.perf_counter() - t:.0f} s wall incl. start-up)")
    print(f"ratio Ray / plain  : {ray_rate / plain:7.3f}   (goal >= 0.90)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
