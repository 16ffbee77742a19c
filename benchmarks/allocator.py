"""glibc allocator settings for a training step: the quickstart's strong-only arm (its config, EfficientNet-Lite0 at
output stride 16, 8 crops of 192 px) trained for a few steps by ``benchmarks/train_overhead.py``'s plain loop
(:func:`train_overhead.plain_loop`: the store's rows, ``augment_batch``, ``collate``, ``train_step`` with the
method's ``compute_losses`` and optimizers) in fresh processes, without and with
:data:`raysemiseg.runtime.MALLOC_TUNABLES` in ``GLIBC_TUNABLES``, interleaved pairs.

    python benchmarks/allocator.py [--pairs 4] [--steps 20] [--store runs/voc-sample-voc21]

Prints each pair and the mean seconds per ``train_step`` of each setting with their ratio. The tunables are
read by the dynamic loader, so each setting runs in its own process (as a Ray worker does:
``runtime.worker_env_vars``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

STEP = """
import sys
from pathlib import Path
sys.path.insert(0, {bench!r})
from recipe_holdout import quickstart_strong_only
from train_overhead import plain_loop
cfg = quickstart_strong_only(Path({store!r}), {{}})
print(plain_loop(cfg, {steps} + 3, warmup=3, shuffle=True)["step_s"])
"""


def time_step(store: Path, steps: int, tunables: str | None) -> float:
    """Seconds per ``train_step`` (after 3 warm-up steps) in a fresh process, with ``GLIBC_TUNABLES=tunables``
    (None: unset)."""
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env["PYTHONPATH"] = str(ROOT)
    if tunables:
        env["GLIBC_TUNABLES"] = tunables
    code = STEP.format(bench=str(ROOT / "benchmarks"), store=str(store), steps=steps)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--store", default="runs/voc-sample-voc21", help="VOC sample store (built when missing)")
    args = p.parse_args(argv)
    from raysemiseg.experiment import ensure_store
    from raysemiseg.runtime import MALLOC_TUNABLES

    store = ensure_store(Path(args.store).resolve(), "voc21", sample="voc")

    base, tuned = [], []
    for i in range(args.pairs):
        base.append(time_step(store, args.steps, None))
        tuned.append(time_step(store, args.steps, MALLOC_TUNABLES))
        print(f"pair {i}: glibc default {base[-1]:.3f} s/step, tunables {tuned[-1]:.3f} s/step "
              f"({tuned[-1] / base[-1]:.2f}x)", flush=True)
    b, t = sum(base) / len(base), sum(tuned) / len(tuned)
    print(f"\n| allocator | s/step (mean of {args.pairs}) | ratio |\n| --- | --- | --- |\n"
          f"| glibc default | {b:.3f} | 1.00x |\n| {MALLOC_TUNABLES} | {t:.3f} | {t / b:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
