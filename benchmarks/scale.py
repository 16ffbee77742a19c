"""Scale behaviour at ImageNet-21k shape, printed side by side (not a test).

Two synthetic ImageNet-21k-shaped image stores, of N and 10N images (default N = 300), are built
through the real ``raysemiseg data build --folders`` path: a label space of 21,841 classes
(background + 21,840 synthetic WordNet-style names, ``ignore_index`` 65535), one folder per class
(the ImageNet layout read by :mod:`raysemiseg.data.folders`), image-level labels only (no masks).
Every image is a distinct real photo crop: a random square crop of a real photo
(``../shared/data`` COCO / VOC images, else the bundled ``raysemiseg/sample_data``), randomly
flipped and rescaled to a side of 320..448 px (~384), saved as JPEG; each image gets a random class.

For each size, in one subprocess per measurement (so each peak is its own process's), it measures

(a) ``raysemiseg data build``;
(b) the start of a CAM-classifier training run: ``raysemiseg train`` of
    ``configs/pseudolabel/cam_classifier_train.yaml`` on the store (a split file holds every 10th
    image out as ``val``), 1 epoch of ``--steps`` steps, ``--val-rows`` validation rows, tracking off,
    ``data.cache_rows: false`` (streamed, the setting for stores larger than the object store):
    the driver side (data plan, trainer set-up, the report loop) of a run whose work is fixed;
(c) a CAM pseudo-label run: ``raysemiseg pseudolabel configs/pseudolabel/cam.yaml`` over every
    image, with the checkpoint of (b);

and prints the driver process's peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of that
process only: Ray's raylet and workers are other processes) and the time per image, with the
10N / N ratios (goal <= 1.2x). For (b), whose work does not grow with the store, the ratio is of
total seconds (a driver that does O(N) work at start-up shows up there) and per image is given for
reference.

Usage::

    PYTHONPATH=. .venv/bin/python benchmarks/scale.py [--n 300] [--work DIR] [--keep] [--json out.json]
    PYTHONPATH=. .venv/bin/python benchmarks/scale.py --n 30        # smoke run (about 5 min on 2 cores)

At N = 300 (3,300 images in all) it takes roughly 20-25 min on 2 cores, most of it the CAM
pseudo-label pass over the 10N store.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 21_841
MARK = "@@SCALE@@"

#: runs the CLI in this (child) process and reports its own wall time and peak RSS
_CHILD = f"""
import json, resource, sys, time
t0 = time.perf_counter()
from raysemiseg.cli import main
rc = main(sys.argv[1:])
dt = time.perf_counter() - t0
print({MARK!r} + json.dumps({{"rc": rc, "seconds": dt,
      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}}), flush=True)
sys.exit(rc)
"""


def photo_sources() -> list[Path]:
    """Real photos to crop from: ``../shared/data`` (COCO, VOC) when present, else the bundled sample."""
    shared = ROOT.parent / "shared" / "data"
    roots = [shared / "coco-mini", shared / "coco-tiny", shared / "voc2012-476" / "JPEGImages"]
    found = sorted(p for r in roots if r.is_dir() for p in r.rglob("*.jpg"))
    if not found:
        found = sorted((ROOT / "raysemiseg" / "sample_data").rglob("*.jpg"))
    if not found:
        raise FileNotFoundError("no real photos found under ../shared/data or raysemiseg/sample_data")
    return found


def class_names() -> list[str]:
    """background + 21,840 synthetic WordNet-style ids (``n00000001`` ...): 21,841 classes."""
    return ["background"] + [f"n{i:08d}" for i in range(1, NUM_CLASSES)]


def write_label_space(path: Path) -> Path:
    """The 21,841-class label-space YAML (``ignore_index`` 65535: 255 is a class id here)."""
    import yaml

    path.write_text(yaml.safe_dump({"names": class_names(), "ignore_index": 65535, "background": "background"},
                                   default_flow_style=None, width=1_000_000))
    return path


def make_folders(root: Path, n: int, seed: int, photos: list[Path]) -> None:
    """``n`` distinct crops as ``root/<class name>/<i>.jpg`` (ImageNet layout), a random class each."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    names = class_names()
    cache: dict[Path, Image.Image] = {}
    for i in range(n):
        src = photos[int(rng.integers(len(photos)))]
        if src not in cache:
            if len(cache) > 64:
                cache.clear()
            cache[src] = Image.open(src).convert("RGB")
        img = cache[src]
        w, h = img.size
        side = int(min(w, h) * rng.uniform(0.45, 1.0))
        x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        crop = img.crop((x, y, x + side, y + side))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out = int(rng.integers(320, 449))
        crop = crop.resize((out, out), Image.Resampling.BILINEAR)
        cls = names[1 + int(rng.integers(NUM_CLASSES - 1))]
        d = root / cls
        d.mkdir(parents=True, exist_ok=True)
        crop.save(d / f"img{seed:03d}_{i:06d}.jpg", quality=90)


def write_split_file(store: Path, path: Path) -> Path:
    """Every 10th store row -> split ``val``, the rest ``train``; all weak (image labels only)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raysemiseg.data.store import open_store

    ids = open_store(store).read_table(columns=["image_id"])["image_id"].to_pylist()
    split = ["val" if i % 10 == 0 else "train" for i in range(len(ids))]
    pq.write_table(pa.table({"image_id": ids, "split": split, "role": ["weak"] * len(ids)}), path)
    return path


def write_train_config(path: Path, *, space: Path, store: Path, split_file: Path, storage: Path, name: str,
                       steps: int, val_rows: int, backbone: str) -> Path:
    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / "pseudolabel" / "cam_classifier_train.yaml").read_text())
    cfg["label_space"] = str(space)
    cfg["data"].update(store=str(store), split_file=str(split_file), train_split="train", val_split="val",
                       crop_size=224, batch_size=4, max_val_rows=val_rows,
                       # the ImageNet-scale setting: rows streamed from Parquet every pass (cache_rows puts
                       # the selected rows into the object store at start-up: O(N) by design)
                       cache_rows=False)
    cfg["model"].update(backbone=backbone, pretrained=backbone != "tiny")
    cfg["optim"].update(epochs=1, steps_per_epoch=steps)
    cfg["run"].update(name=name, storage_path=str(storage))
    cfg["tracking"] = {"enabled": False}
    path.write_text(yaml.safe_dump(cfg))
    return path


def measure(argv: list[str], log: Path, timeout: float) -> dict[str, Any]:
    """Run ``raysemiseg ARGV`` in a fresh Python process; its wall time and peak RSS (MB)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}   # a local Ray of its own
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("RAY_DEDUP_LOGS", "0")
    t0 = time.perf_counter()
    with log.open("w") as f:
        p = subprocess.run([sys.executable, "-c", _CHILD, *argv], stdout=subprocess.PIPE, stderr=f, text=True,
                           timeout=timeout, env=env, cwd=ROOT)
    f_out = p.stdout
    log.with_suffix(".stdout").write_text(f_out)
    lines = [ln for ln in f_out.splitlines() if ln.startswith(MARK)]
    if p.returncode != 0 or not lines:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"raysemiseg {' '.join(argv)} failed (rc {p.returncode}); stderr tail:\n{tail}")
    out = json.loads(lines[-1][len(MARK):])
    out["process_seconds"] = time.perf_counter() - t0
    return out


def latest_checkpoint(run_dir: Path) -> Path:
    cks = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())  # not checkpoint_manager_snapshot.json
    if not cks:
        raise FileNotFoundError(f"no checkpoint under {run_dir}")
    return cks[-1]


def run_size(n: int, work: Path, space: Path, photos: list[Path], args: argparse.Namespace) -> dict[str, Any]:
    d = work / f"n{n}"
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    make_folders(d / "imagenet21k", n, seed=n, photos=photos)
    print(f"[scale] {n} images written in {time.perf_counter() - t0:.1f} s", flush=True)
    res: dict[str, Any] = {"images": n}
    store = d / "store"
    res["build"] = measure(["data", "build", "--folders", str(d / "imagenet21k"), "--label-space", str(space),
                            "--out", str(store)], d / "build.log", args.timeout)
    print(f"[scale] n={n} build {res['build']}", flush=True)
    split = write_split_file(store, d / "split.parquet")
    cfg = write_train_config(d / "train.yaml", space=space, store=store, split_file=split, storage=d / "runs",
                             name="cam21k", steps=args.steps, val_rows=args.val_rows, backbone=args.backbone)
    res["train_start"] = measure(["train", str(cfg)], d / "train.log", args.timeout)
    print(f"[scale] n={n} train start {res['train_start']}", flush=True)
    ckpt = latest_checkpoint(d / "runs" / "cam21k")
    res["pseudolabel_cam"] = measure(["pseudolabel", str(ROOT / "configs" / "pseudolabel" / "cam.yaml"),
                                      "--store", str(store), "--out", str(d / "labels"), "--checkpoint", str(ckpt),
                                      "--num-cpus", str(args.num_cpus), "--no-progress"],
                                     d / "pseudolabel.log", args.timeout)
    print(f"[scale] n={n} pseudolabel {res['pseudolabel_cam']}", flush=True)
    return res


def report(small: dict[str, Any], big: dict[str, Any]) -> str:
    n, n10 = small["images"], big["images"]
    head = (f"{'measurement':<18} {'N=' + str(n) + ' s/img':>14} {'RSS MB':>8}   {'10N=' + str(n10) + ' s/img':>16} "
            f"{'RSS MB':>8}   {'time 10N/N':>10} {'RSS 10N/N':>10}")
    lines = [head, "-" * len(head)]
    for key, label, per_image in (("build", "data build", True), ("train_start", "train start (b)", False),
                                  ("pseudolabel_cam", "pseudolabel cam", True)):
        a, b = small[key], big[key]
        t_ratio = (b["seconds"] / n10) / (a["seconds"] / n) if per_image else b["seconds"] / a["seconds"]
        r_ratio = b["peak_rss_mb"] / a["peak_rss_mb"]
        flag = "" if t_ratio <= 1.2 and r_ratio <= 1.2 else "   > 1.2x"
        lines.append(f"{label:<18} {a['seconds'] / n:>14.4f} {a['peak_rss_mb']:>8.0f}   {b['seconds'] / n10:>16.4f} "
                     f"{b['peak_rss_mb']:>8.0f}   {t_ratio:>9.2f}x {r_ratio:>9.2f}x{flag}")
    lines.append("-" * len(head))
    lines.append(f"time ratio: per image for data build and pseudolabel; total seconds for train start "
                 f"(fixed work: {small['train_start']['seconds']:.1f} s vs {big['train_start']['seconds']:.1f} s). "
                 f"Goal <= 1.2x.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=300, help="images of the small store (the large one has 10N)")
    ap.add_argument("--work", default=None, help="working folder (default: a temporary one, removed unless --keep)")
    ap.add_argument("--keep", action="store_true", help="keep the working folder")
    ap.add_argument("--steps", type=int, default=2, help="training steps of (b)")
    ap.add_argument("--val-rows", type=int, default=4, help="validation rows of (b)")
    ap.add_argument("--backbone", default="efficientnet_lite0", help="cam_classifier backbone (tiny: faster smoke)")
    ap.add_argument("--num-cpus", type=int, default=2, help="CPUs of the pseudo-label run's local Ray")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per measurement")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    if args.n < 10:
        ap.error("--n must be >= 10 (every 10th image is held out for validation)")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="raysemiseg_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        space = write_label_space(work / "imagenet21k_space.yaml")
        photos = photo_sources()
        print(f"[scale] {len(photos)} source photos; label space {NUM_CLASSES} classes; work {work}", flush=True)
        small = run_size(args.n, work, space, photos, args)
        big = run_size(10 * args.n, work, space, photos, args)
        text = report(small, big)
        print(text)
        print(f"[scale] total {time.perf_counter() - t0:.0f} s")
        if args.json:
            Path(args.json).write_text(json.dumps({"small": small, "large": big, "table": text}, indent=2))
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
