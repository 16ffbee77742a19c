"""Ray Train overhead and 2-worker DDP scaling: the same model, data and steps through a plain PyTorch
loop and through Ray Train with 1 and 2 workers, on the same total logical CPUs.

    python benchmarks/train_overhead.py [--backbone efficientnet_lite0] [--steps 30] [--batch 8] [--crop 192]
        [--cpus 2] [--workers 1 2]

Both paths use the same pieces: the store's train rows, :func:`raysemiseg.train.data.augment_batch`
(decode + random scale/crop/flip), :func:`collate`, :func:`train_step` and the same optimizers,
seeded identically. The plain path decodes inline in one process with ``--cpus`` torch threads. The
Ray path gets a local Ray of ``--cpus`` logical CPUs too (it used to get one more): one
(:data:`raysemiseg.runtime.DATA_CPUS`) is left to the Ray Data tasks that decode and augment, the
rest is split evenly between the ``TorchTrainer`` workers (``cpus_per_worker``; gradients averaged by
DDP, gloo on CPU). Each worker trains on ``--batch`` rows per step, so N workers process N x batch.

Prints steady-state images/s (all workers; the first ``--warmup`` steps of each epoch skipped), the
ratio Ray / plain at 1 worker (goal >= 0.90), the 2-worker / 1-worker throughput at the same CPUs
(ideal 1.0 here, since the CPUs are split, not added) and where the time goes: per step, waiting for
data, to-device (collate) and the step itself, then per run, what lies outside the steps (Ray start,
worker group, dataset set-up, validation, report and checkpoint). On a shared machine the figures are
noisy: run it on an idle one for numbers to quote.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def plain_loop(cfg, steps: int, warmup: int, device: str = "cpu", rows=None, shuffle: bool = False,
               seed: int | None = None, trained: list | None = None) -> dict[str, float]:
    """Single-process PyTorch loop; returns steady-state images/s and per-step seconds
    (``data_s``: slice + decode + augment, ``to_device_s``: collate, ``step_s``: train_step).
    On ``cuda`` with ``cfg.optim.amp``: float16 autocast + GradScaler, as the Ray workers.

    ``rows``: the store rows to train on (default: the train split's pixel rows), all fed as strong;
    ``shuffle``: batches from a seeded permutation per pass instead of consecutive slices; ``seed``:
    torch and numpy seed (default ``cfg.run.seed``); ``trained``: a list the trained method is appended to."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import torch

    from raysemiseg.data.store import open_store
    from raysemiseg.methods.base import get_method
    from raysemiseg.train.data import augment_batch, collate
    from raysemiseg.train.loop import build_optimizers, normalisation, poly_factor, set_lr, train_step

    torch.set_num_threads(int(cfg.scaling.cpus_per_worker))
    store = open_store(cfg.data.store)
    space = store.label_space
    seed = cfg.run.seed if seed is None else seed
    if rows is None:  # the same rows as the Ray run's pool (the train split's pixel rows), read in this process
        rows = store.read_table(filter_split=cfg.data.train_split)
        rows = rows.filter(pc.equal(rows["supervision"], "pixel"))
    rows = rows.append_column("role", pa.array(["strong"] * rows.num_rows)) \
        .append_column("pseudo", pa.nulls(rows.num_rows, pa.binary()))
    torch.manual_seed(seed)
    method = get_method(cfg.method.name)(space, cfg.model, cfg.method.build_params())
    method.set_stage(cfg.method.stage)
    dev = torch.device(device)
    method.to(dev)
    amp = bool(cfg.optim.amp and dev.type == "cuda")
    mean, std = normalisation(method)
    opts = build_optimizers(method, cfg.optim)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp)
    rng = np.random.default_rng(seed)
    b = cfg.data.batch_size
    method.train()
    t0, n = None, 0
    split = {"data_s": 0.0, "to_device_s": 0.0, "step_s": 0.0}
    order, pos = (rng.permutation(rows.num_rows) if shuffle else None), 0
    for step in range(steps):
        if step == warmup:
            t0, n = time.perf_counter(), 0
        ta = time.perf_counter()
        if shuffle:
            if pos + b > len(order):
                order, pos = (rng.permutation(rows.num_rows) if shuffle else None), 0
            batch_rows, pos = rows.take(pa.array(order[pos:pos + b])), pos + b
        else:
            batch_rows = rows.slice((step * b) % max(rows.num_rows - b, 1), b)
        arrays = augment_batch(batch_rows, crop=cfg.data.crop_size, scale_range=tuple(cfg.data.scale_range),
                               flip=cfg.data.flip, ignore_index=space.ignore_index, num_classes=space.num_classes,
                               uses_boxes=False, seed=seed, rng=rng)
        tb = time.perf_counter()
        set_lr(opts, poly_factor(step, steps, cfg.optim.poly_power))
        batch = collate(arrays, mean, std, dev)
        tc = time.perf_counter()
        train_step(method, batch, opts, scaler, amp=amp)  # syncs on the loss values (float())
        if t0 is not None:
            split["data_s"] += tb - ta
            split["to_device_s"] += tc - tb
            split["step_s"] += time.perf_counter() - tc
        n += b
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    timed = max(steps - warmup, 1)
    if trained is not None:
        trained.append(method)
    return {"images_per_s": n / (time.perf_counter() - t0), **{k: v / timed for k, v in split.items()}}


def ray_run(cfg, workers: int, cpus: int, steps: int) -> dict[str, float]:
    """One Ray Train run of ``steps`` steps on ``workers`` workers sharing ``cpus - DATA_CPUS`` CPUs."""
    from raysemiseg.config import load_config
    from raysemiseg.runtime import DATA_CPUS
    from raysemiseg.train.driver import train

    d = cfg.model_dump(mode="json")
    d["scaling"].update(num_workers=workers, cpus_per_worker=(cpus - DATA_CPUS) / workers)
    d["run"]["name"] = f"bench-{workers}w-{int(time.time())}"
    run_cfg = load_config(d)
    t = time.perf_counter()
    res = train(run_cfg)
    wall = time.perf_counter() - t
    m = res.metrics
    per_step = m["time/data_wait_s"] + m["time/to_device_s"] + m["time/step_s"]
    return {"images_per_s": float(m["train_images_per_s"]) * workers, "data_s": m["time/data_wait_s"],
            "to_device_s": m["time/to_device_s"], "step_s": m["time/step_s"], "wall_s": wall,
            "epoch_s": float(m["epoch_time_s"]), "steps_s": per_step * steps,
            "cpus_per_worker": run_cfg.scaling.cpus_per_worker}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/bench")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=2, help="steps excluded from the steady-state rate (Ray loop: 2)")
    p.add_argument("--batch", type=int, default=8, help="rows per step and worker")
    p.add_argument("--crop", type=int, default=192)
    p.add_argument("--cpus", type=int, default=2, help="logical CPUs of each side: plain torch threads = the local "
                                                        "Ray's num_cpus (workers + Ray Data)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray Train worker counts to run")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per Ray worker, and the plain loop on cuda:0")
    args = p.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    from raysemiseg.runtime import DATA_CPUS

    if args.cpus - DATA_CPUS <= 0:
        p.error(f"--cpus must exceed the {DATA_CPUS:g} CPU(s) the Ray side leaves to Ray Data")

    from raysemiseg.config import load_config
    from raysemiseg.quickstart import ensure_store
    from raysemiseg.runtime import ensure_ray
    from raysemiseg.train.driver import cpu_need

    work = Path(args.workdir).resolve()
    cfg = load_config({
        "data": {"store": str(work / "store"), "crop_size": args.crop, "batch_size": args.batch, "max_val_rows": 2,
                 "scale_range": [0.75, 1.25]},
        "model": {"backbone": args.backbone, "pretrained": args.backbone != "tiny", "output_stride": 16},
        "method": {"name": "strong_only", "params": {"head_hidden": 256, "head_dilation": 6}},
        "optim": {"epochs": 1, "steps_per_epoch": args.steps, "lr": 0.001, "amp": args.use_gpu},
        "scaling": {"num_workers": 1, "cpus_per_worker": args.cpus, "use_gpu": args.use_gpu},
        "run": {"name": "bench", "storage_path": str(work / "runs"), "max_failures": 0},
        "tracking": {"enabled": False},
    })
    ray_cfg = cfg.model_copy(update={"scaling": cfg.scaling.model_copy(update={"cpus_per_worker": args.cpus - 1})})
    ensure_ray(num_cpus=args.cpus, need=cpu_need(ray_cfg))  # the same logical CPUs as the plain loop's threads
    ensure_store(cfg.data.store, cfg.label_space)

    print(f"{args.backbone}, batch {args.batch} per worker, crop {args.crop}, {args.steps} steps "
          f"({args.warmup} warm-up), {args.cpus} logical CPUs per side"
          f"{', GPU' if args.use_gpu else ''} (other processes on this machine add noise)", flush=True)
    t = time.perf_counter()
    plain = plain_loop(cfg, args.steps, args.warmup, device="cuda:0" if args.use_gpu else "cpu")
    print(f"plain PyTorch loop ({args.cpus} threads): {plain['images_per_s']:7.2f} images/s   "
          f"({time.perf_counter() - t:.0f} s wall)", flush=True)
    rows = {"plain": plain}
    for n in args.workers:
        r = ray_run(cfg, n, args.cpus, args.steps)
        rows[f"ray{n}"] = r
        print(f"Ray Train, {n} worker(s) x {r['cpus_per_worker']:g} CPUs + {DATA_CPUS:g} for Ray Data: "
              f"{r['images_per_s']:7.2f} images/s   ({r['wall_s']:.0f} s wall incl. start-up)", flush=True)

    print("\nper step (steady state, s; Ray: rank 0)   data     to-device  step     sum")
    for key, r in rows.items():
        name = "plain" if key == "plain" else f"Ray {key[3:]} worker(s)"
        total = r["data_s"] + r["to_device_s"] + r["step_s"]
        print(f"  {name:<38} {r['data_s']:8.4f} {r['to_device_s']:9.4f}  {r['step_s']:8.4f} {total:8.4f}")
    print("  (plain data = decode + augment inline; Ray data = waiting for the Ray Data stream, which decodes "
          "on its own CPU)")
    for n in args.workers:
        r = rows[f"ray{n}"]
        outside_epoch = r["wall_s"] - r["epoch_s"]
        print(f"Ray {n} worker(s), outside the steps: {r['epoch_s'] - r['steps_s']:.1f} s in the epoch (warm-up "
              f"steps, validation), {outside_epoch:.1f} s around it (Ray Train start, worker group, dataset "
              f"set-up, report + checkpoint, shutdown) of {r['wall_s']:.1f} s wall")
    if "ray1" in rows:
        print(f"ratio Ray (1 worker) / plain: {rows['ray1']['images_per_s'] / plain['images_per_s']:7.3f}   "
              "(goal >= 0.90)")
    if "ray1" in rows and "ray2" in rows:
        print(f"2 workers / 1 worker        : {rows['ray2']['images_per_s'] / rows['ray1']['images_per_s']:7.3f}   "
              "(same total CPUs split in two: ideal 1.0; below it is the cost of DDP and a second data stream)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
