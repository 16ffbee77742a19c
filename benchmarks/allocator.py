"""glibc allocator settings for a training step: the quickstart's strong-only step (EfficientNet-Lite0 at output
stride 16, 8 crops of 192 px, the quickstart's model config and method; forward + CE + backward) timed in fresh
processes without and with :data:`raysemiseg.runtime.MALLOC_TUNABLES` in ``GLIBC_TUNABLES``, interleaved pairs.

    python benchmarks/allocator.py [--pairs 4] [--steps 20]

Prints each pair and the mean seconds per step of each setting with their ratio. The tunables are read by the
dynamic loader, so each setting runs in its own process (as a Ray worker does: ``runtime.worker_env_vars``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

STEP = """
import sys, time, torch, torch.nn.functional as F
sys.path.insert(0, {bench!r})
from recipe_holdout import quickstart_strong_only
from raysemiseg.labels import load_label_space
from raysemiseg.methods.base import get_method
torch.set_num_threads(2)
torch.manual_seed(0)
cfg = quickstart_strong_only(__import__("pathlib").Path("unused-store"), {{}})
m = get_method(cfg.method.name)(load_label_space(cfg.label_space), cfg.model, cfg.method.build_params())
m.set_stage(cfg.method.stage)
m.train()
x, y = torch.randn(8, 3, 192, 192), torch.randint(0, 21, (8, 192, 192))
def step():
    F.cross_entropy(m.predict(x), y).backward()
for _ in range(3):
    step()
t = time.perf_counter()
for _ in range({steps}):
    step()
print((time.perf_counter() - t) / {steps})
"""


def time_step(steps: int, tunables: str | None) -> float:
    """Seconds per step in a fresh process, with ``GLIBC_TUNABLES=tunables`` (None: unset)."""
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env["PYTHONPATH"] = str(ROOT)
    if tunables:
        env["GLIBC_TUNABLES"] = tunables
    code = STEP.format(bench=str(ROOT / "benchmarks"), steps=steps)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args(argv)
    from raysemiseg.runtime import MALLOC_TUNABLES

    base, tuned = [], []
    for i in range(args.pairs):
        base.append(time_step(args.steps, None))
        tuned.append(time_step(args.steps, MALLOC_TUNABLES))
        print(f"pair {i}: glibc default {base[-1]:.3f} s/step, tunables {tuned[-1]:.3f} s/step "
              f"({tuned[-1] / base[-1]:.2f}x)", flush=True)
    b, t = sum(base) / len(base), sum(tuned) / len(tuned)
    print(f"\n| allocator | s/step (mean of {args.pairs}) | ratio |\n| --- | --- | --- |\n"
          f"| glibc default | {b:.3f} | 1.00x |\n| {MALLOC_TUNABLES} | {t:.3f} | {t / b:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
