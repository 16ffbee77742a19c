"""Recipe study on a held-out part of the **train** list (val is never read): the quickstart's strong-only arm
trained on its 25 % strong training images, scored on the other 75 % of the training images, for a few recipe
variants side by side in one run.

    python benchmarks/recipe_holdout.py [--steps 300] [--seeds 0] \\
        [--variant base] [--variant "none:model.freeze_at=0"] [--variant "lr2e-4:optim.lr=0.0002"]

Each variant is ``NAME[:KEY=VALUE,KEY=VALUE...]``, dotted keys of the train config (``raysemiseg train``'s
schema, as ``--set``). The base config is the strong-only arm of ``configs/quickstart.yaml`` (its ``base`` plus
the arm's method), the split is the quickstart's (``i3s-fraction`` 0.25, seed 0, over the store's train rows).

The loop is ``benchmarks/train_overhead.py``'s plain path (:func:`train_overhead.plain_loop`: the package's own
:func:`raysemiseg.train.data.augment_batch`, :func:`collate`, :func:`train_step`, the poly schedule, with the
config's ``scaling.cpus_per_worker`` torch threads), its batches drawn from a seeded permutation of the strong
rows per pass; ``s/step`` is the step alone, after 5 warm-up steps. Scoring is
:func:`raysemiseg.eval.predict.evaluate_rows` at native size (the sample's images are <= 320 px), the quickstart's
own evaluation.

Prints, per variant and seed: held-out mIoU %, seconds per training step, and the ratios to the first variant.
This is how a recipe is chosen without looking at val (``README.md``, Results notes). On a shared machine the
step times are noisy; at this size two seeds of one recipe differ by 2-3 mIoU points.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``"name:a.b=1,c=x"`` -> ``("name", {"a.b": 1, "c": "x"})`` (values parsed as YAML). A comma splits
    only where the next ``KEY=`` starts, so list values keep theirs: ``"wide:data.scale_range=[0.5,1.5]"``."""
    from raysemiseg.quickstart import parse_overrides

    name, _, rest = text.partition(":")
    return name, parse_overrides([kv for kv in re.split(r",(?=[\w.]+=)", rest) if kv])


def quickstart_strong_only(store: Path, overrides: dict[str, Any]) -> Any:
    """The quickstart's strong-only train config on ``store``, with ``overrides`` (dotted keys)."""
    import json

    from raysemiseg.config import dotted, load_config
    from raysemiseg.experiment import load_experiment

    ecfg = load_experiment(ROOT / "configs" / "quickstart.yaml")
    arm = next(a for a in ecfg.arms if a.name == "strong-only")
    base = json.loads(json.dumps(ecfg.base))
    over = {**dotted(arm.steps[0].train or {}), "data.store": str(store), **overrides}
    return load_config(base, overrides=over)


def held_out_split(store: Path) -> tuple[set[str], set[str]]:
    """(strong ids, held-out ids): the quickstart's split of the train rows (25 % strong, seed 0)."""
    from raysemiseg.data.splits import SplitSpec, make_split

    t = make_split(store, SplitSpec("i3s-fraction", seed=0, fraction=0.25))
    ids, roles = t.column("image_id").to_pylist(), t.column("role").to_pylist()
    return ({i for i, r in zip(ids, roles) if r == "strong"}, {i for i, r in zip(ids, roles) if r == "weak"})


def run_variant(cfg: Any, strong: Any, held_out: Any, steps: int, seed: int) -> dict[str, float]:
    """Train ``steps`` steps on the ``strong`` rows (pyarrow Table; :func:`train_overhead.plain_loop`, shuffled),
    score ``held_out`` without and with flip test-time augmentation; returns
    ``{"miou": %, "miou_flip": %, "step_s": s, "eval_s": s}``."""
    from train_overhead import plain_loop

    from raysemiseg.eval.predict import evaluate_rows
    from raysemiseg.labels import load_label_space

    trained: list[Any] = []
    stats = plain_loop(cfg, steps, warmup=5, rows=strong, shuffle=True, seed=seed, trained=trained)
    space = load_label_space(cfg.label_space)
    t = time.perf_counter()
    res = evaluate_rows(trained[0], held_out, space, val_size=cfg.data.val_size, desc="held-out", progress=False)
    eval_s = time.perf_counter() - t
    flipped = evaluate_rows(trained[0], held_out, space, val_size=cfg.data.val_size, desc="held-out flip",
                            progress=False, flip=True)
    return {"miou": 100.0 * res.metrics.miou, "miou_flip": 100.0 * flipped.metrics.miou,
            "step_s": stats["step_s"], "eval_s": eval_s}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default="runs/voc-sample-voc21", help="VOC sample store (built when missing)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--variant", action="append", default=[], help="NAME[:KEY=VALUE,...] (first = reference)")
    args = p.parse_args(argv)

    import pyarrow as pa
    import pyarrow.compute as pc
    from raysemiseg.data.store import open_store
    from raysemiseg.experiment import ensure_store

    store = ensure_store(Path(args.store).resolve(), "voc21", sample="voc")
    strong_ids, held_ids = held_out_split(store)
    table = open_store(store).read_table(filter_split="train")
    ids = table.column("image_id")
    strong = table.filter(pc.is_in(ids, value_set=pa.array(sorted(strong_ids))))
    held_out = table.filter(pc.is_in(ids, value_set=pa.array(sorted(held_ids))))
    print(f"train rows {table.num_rows}: {strong.num_rows} strong (trained), {held_out.num_rows} held out (scored); "
          f"val not read; {args.steps} steps per run", flush=True)

    variants = [parse_variant(v) for v in (args.variant or ["base"])]
    results: dict[str, list[dict[str, float]]] = {}
    for name, over in variants:
        cfg = quickstart_strong_only(store, over)
        for seed in args.seeds:
            r = run_variant(cfg, strong, held_out, args.steps, seed)
            results.setdefault(name, []).append(r)
            print(f"{name} seed {seed}: held-out mIoU {r['miou']:.2f} % (flip TTA {r['miou_flip']:.2f} %), "
                  f"{r['step_s']:.3f} s/step "
                  f"(eval {r['eval_s']:.0f} s)", flush=True)

    ref = variants[0][0]
    mean = {k: {m: sum(r[m] for r in v) / len(v) for m in ("miou", "miou_flip", "step_s")} for k, v in results.items()}
    print(f"\n| variant | overrides | held-out mIoU % (mean of {len(args.seeds)}) | with flip TTA | s/step | "
          f"mIoU - {ref} | time / {ref} |\n| --- | --- | --- | --- | --- | --- | --- |")
    for name, over in variants:
        m = mean[name]
        print(f"| {name} | {', '.join(f'{k}={v}' for k, v in over.items()) or '-'} | {m['miou']:.2f} | "
              f"{m['miou_flip']:.2f} | {m['step_s']:.3f} | {m['miou'] - mean[ref]['miou']:+.2f} | {m['step_s'] / mean[ref]['step_s']:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
