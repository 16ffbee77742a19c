"""Where to decode and augment the training rows on a CPU-only machine: Ray Data tasks (``data.augment_in:
ray_data``) or the Train worker itself (``worker``), in the quickstart's layout: its strong-only config
(EfficientNet-Lite0 at output stride 16, 8 crops of 192 px, random rescale 0.5-1.5), one Train worker holding
every core (``scaling.cpus_per_worker`` = cores) and a local Ray of one logical CPU more for Ray Data
(``configs/quickstart.yaml``: ``num_cpus: 3`` on 2 cores), through ``raysemiseg.train.driver.train``.

    python benchmarks/augment_in.py [--pairs 2] [--steps 40] [--store runs/voc-sample-voc21]

Runs the two settings in interleaved pairs (machine noise hits both alike) and prints, per run, the worker's
steady-state seconds per step split into waiting for data, collate and ``train_step``, and the run's wall time;
then the means and the ratio worker / ray_data. With Ray Data, a decode task runs beside the worker's torch
threads on the same cores; in the worker, decoding is serial with the step but nothing else competes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def run(cfg, augment_in: str, steps: int, tag: str) -> dict[str, float]:
    """One Ray Train run of ``steps`` steps with ``data.augment_in = augment_in``; per-step seconds and wall."""
    from raysemiseg.config import load_config
    from raysemiseg.train.driver import train

    d = cfg.model_dump(mode="json")
    d["data"]["augment_in"] = augment_in
    d["optim"].update(epochs=1, steps_per_epoch=steps)
    d["run"].update(name=f"bench-augment-{tag}-{int(time.time())}", max_failures=0)
    d["tracking"]["enabled"] = False
    t = time.perf_counter()
    res = train(load_config(d))
    m = res.metrics
    return {"data_s": m["time/data_wait_s"], "to_device_s": m["time/to_device_s"], "step_s": m["time/step_s"],
            "sum_s": m["time/data_wait_s"] + m["time/to_device_s"] + m["time/step_s"],
            "wall_s": time.perf_counter() - t}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--store", default="runs/voc-sample-voc21", help="VOC sample store (built when missing)")
    p.add_argument("--workdir", default="runs/bench-augment")
    args = p.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    from recipe_holdout import quickstart_strong_only

    from raysemiseg.experiment import ensure_store
    from raysemiseg.runtime import ensure_ray
    from raysemiseg.train.driver import cpu_need

    store = Path(args.store).resolve()
    cores = max(os.cpu_count() or 1, 2)
    cfg = quickstart_strong_only(store, {"scaling.cpus_per_worker": cores, "data.max_val_rows": 2,
                                         "run.storage_path": str(Path(args.workdir).resolve())})
    ensure_ray(num_cpus=cores + 1, need=cpu_need(cfg))
    ensure_store(store, "voc21", sample="voc")
    print(f"quickstart strong-only, {args.steps} steps per run, 1 worker x {cores} CPUs, local Ray of {cores + 1} "
          f"logical CPUs on {os.cpu_count()} cores", flush=True)
    print("run                 data_s   collate_s  step_s   sum_s    wall_s")
    out: dict[str, list[dict[str, float]]] = {"ray_data": [], "worker": []}
    for i in range(args.pairs):
        for mode in ("ray_data", "worker"):
            r = run(cfg, mode, args.steps, f"{mode}-{i}")
            out[mode].append(r)
            print(f"{mode:<9} pair {i}   {r['data_s']:7.4f}  {r['to_device_s']:8.4f}  {r['step_s']:7.4f}  "
                  f"{r['sum_s']:7.4f}  {r['wall_s']:7.1f}", flush=True)
    mean = {k: {m: sum(r[m] for r in v) / len(v) for m in v[0]} for k, v in out.items()}
    for k, m in mean.items():
        print(f"mean {k:<9} {m['data_s']:7.4f}  {m['to_device_s']:8.4f}  {m['step_s']:7.4f}  {m['sum_s']:7.4f}  "
              f"{m['wall_s']:7.1f}")
    print(f"per-step time worker / ray_data: {mean['worker']['sum_s'] / mean['ray_data']['sum_s']:.3f}   "
          f"(wall {mean['worker']['wall_s'] / mean['ray_data']['wall_s']:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
