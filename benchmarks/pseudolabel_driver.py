"""Driver-side cost per shard of a pseudo-label run: bytes the driver receives and seconds it spends
in its loop body (commit + manifest for the old engine, counters for the new), bbox_rect."""
import json, shutil, sys, time
from pathlib import Path
import ray
from ray.data import Dataset

stats = {"bytes": 0, "batches": 0, "body_s": 0.0}
orig = Dataset.iter_batches
def wrapped(self, *a, **k):
    for b in orig(self, *a, **k):
        stats["bytes"] += b.nbytes
        stats["batches"] += 1
        t = time.perf_counter()
        yield b
        stats["body_s"] += time.perf_counter() - t
Dataset.iter_batches = wrapped

from raysemiseg.pseudolabel.pipeline import load_recipe, run_pipeline
rows, per = int(sys.argv[2]), int(sys.argv[3])
out = Path(sys.argv[1])
shutil.rmtree(out, ignore_errors=True)
rec = load_recipe(Path("configs/pseudolabel/bbox_rect.yaml"), {"max_rows": rows, "rows_per_shard": per})
r = run_pipeline(rec, sys.argv[4], out, num_cpus=2, progress=False)
n = r.shards_run
print(json.dumps({"shards": n, "driver_bytes_per_shard": stats["bytes"] / n,
                  "driver_body_ms_per_shard": 1000 * stats["body_s"] / n,
                  "manifest_bytes": (out / "manifest.json").stat().st_size, "wall_s": r.seconds}))
