"""Pseudo-label engine throughput, printed side by side (not a test).

Figures (issue 4, item 6), on the bundled real sample (COCO images as stored, long side <= 320 px) and
on 640x480 copies of them:

1. images/s of each stage, run serially in this process;
2. the CPU chain SLIC + self-diffusion + dense CRF at 640x480: images/s on one core (goal >= 2);
3. a recipe run serially in one process vs through the Ray Data pipeline on all cores (goal >= 1.7x);
4. dense CRF restricted to background + present labels vs all 21 labels (goal >= 2x);
5. per-image time and peak memory of the stages with a 21-class vs a 21,841-class label space
   (goal within 1.2x).

The CAM stage uses a cam_classifier checkpoint made here from the ImageNet EfficientNet-Lite0
backbone with an untrained 1x1 classifier: its CAMs are meaningless but cost the same as trained
ones. Usage::

    .venv/bin/python benchmarks/pseudolabel_throughput.py [--images 24] [--num-cpus 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def _timeit(fn: Callable[[], Any], repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _peak_mem(fn: Callable[[], Any]) -> tuple[float, int]:
    gc.collect()
    tracemalloc.start()
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return dt, peak


def _spin(_: int = 0) -> float:
    t0 = time.perf_counter()
    s = 0
    for i in range(5_000_000):
        s += i
    return time.perf_counter() - t0


def machine_parallel_capacity(nproc: int) -> float:
    """Speed-up of ``nproc`` concurrent CPU-bound processes over one (nproc on an idle machine):
    calibrates the serial-vs-Ray ratio on a shared machine."""
    from multiprocessing import get_context

    one = min(_spin() for _ in range(3))
    with get_context("spawn").Pool(nproc) as pool:
        pool.map(_spin, range(nproc))                    # warm the pool
        many = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            pool.map(_spin, range(nproc))
            many = min(many, time.perf_counter() - t0)
    return nproc * one / many


def _resize(img: np.ndarray, w: int, h: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))


def _cam_checkpoint(root: Path, space_name: str = "voc21", space: Any = None) -> Path:
    import torch

    from raysemiseg.config import DataConfig, MethodConfig, ModelConfig, TrainConfig
    from raysemiseg.labels import builtin
    from raysemiseg.methods.base import get_method
    from raysemiseg.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    space = space or builtin(space_name)
    cfg = TrainConfig(data=DataConfig(store=str(root)), model=ModelConfig(backbone="efficientnet_lite0", pretrained=True),
                      method=MethodConfig(name="cam_classifier"))
    m = get_method("cam_classifier")(space, cfg.model, cfg.method.build_params())
    return save_checkpoint(root / f"cam_{space.name}", m, cfg, space)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", default=None, help="image store (default: build the bundled sample into a temp dir)")
    ap.add_argument("--images", type=int, default=24, help="images per measurement")
    ap.add_argument("--ray-images", type=int, default=None,
                    help="images for the serial-vs-Ray Data section (default: --images); more images dilute "
                         "Ray Data's fixed start-up (~1 s per dataset run) in the ratio")
    ap.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray instance")
    ap.add_argument("--json", default=None, help="also write the figures here")
    a = ap.parse_args()

    import ray
    import torch

    from raysemiseg.data.schema import decode_image
    from raysemiseg.data.store import Source, build_store, open_store
    from raysemiseg.labels import LabelSpace
    from raysemiseg.pseudolabel.bbox import bbox_rect, bbox_seg
    from raysemiseg.pseudolabel.crf import CRFParams, crf_labels, dense_crf
    from raysemiseg.pseudolabel.em import EStepParams, e_step_present
    from raysemiseg.pseudolabel.pipeline import _Ctx, _ModelStage, load_recipe, run_pipeline, run_serial
    from raysemiseg.pseudolabel.superpixels import DiffusionParams, self_diffusion, slic_superpixels

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="pl_bench_"))
    ray.init(address="local", num_cpus=a.num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False,
             _node_ip_address="127.0.0.1")
    if a.store is None:
        from raysemiseg.data.sample import sample_sources

        a.store = str(tmp / "store")
        build_store([Source("coco", (str(x), str(y))) for x, y in sample_sources()], "voc21", a.store, progress=False)
    store = open_store(a.store)
    space = store.label_space
    rows = store.read_table(["image_id", "source", "image", "labels", "boxes", "height", "width"]).slice(0, a.images).to_pylist()
    imgs = [decode_image(r["image"]) for r in rows]
    n = len(rows)
    fig: dict[str, Any] = {"images": n, "num_cpus": a.num_cpus, "mean_size": [float(np.mean([i.shape[0] for i in imgs])),
                                                                              float(np.mean([i.shape[1] for i in imgs]))]}
    ckpt = _cam_checkpoint(tmp)
    ctx = _Ctx(space.background_id, space.num_classes)

    # -- 1. per-stage images/s (serial) ---------------------------------------------------
    def fg(r: dict) -> np.ndarray:
        return np.asarray(sorted(set(r["labels"]) - {0}), np.int64)

    cam_stage = _ModelStage("cam", {}, str(ckpt), ctx, use_gpu=False)
    cams = []
    stage_t: dict[str, float] = {}
    stage_t["decode"] = _timeit(lambda: [decode_image(r["image"]) for r in rows])
    stage_t["bbox_rect"] = _timeit(lambda: [bbox_rect(r["boxes"], r["height"], r["width"]) for r in rows])
    stage_t["bbox_seg"] = _timeit(lambda: [bbox_seg(i, r["boxes"]) for i, r in zip(imgs, rows)])

    def run_cams() -> None:
        cams.clear()
        with torch.inference_mode():
            for i, r in zip(imgs, rows):
                x = cam_stage._tensor(i)
                cams.append(cam_stage.method.cams(x, [fg(r).tolist()], out_size=i.shape[:2])[0].numpy())

    stage_t["cam (efficientnet_lite0, CPU)"] = _timeit(run_cams)
    segs = []
    stage_t["slic"] = _timeit(lambda: segs.extend(slic_superpixels(i, 300, 10.0, 0.5) for i in imgs))
    probs: list[np.ndarray] = []

    def diffuse() -> None:
        probs.clear()
        for i, r, c, s in zip(imgs, rows, cams, segs):
            _, q = self_diffusion(i, c, fg(r), 0, DiffusionParams(), segments=s)
            probs.append(q / q.sum(0, keepdims=True))

    stage_t["diffusion (on SLIC)"] = _timeit(diffuse)
    stage_t["crf (bg + present)"] = _timeit(lambda: [crf_labels(i, p, np.r_[0, fg(r)]) for i, r, p in zip(imgs, rows, probs)])

    def full21(p: np.ndarray, ids: np.ndarray) -> np.ndarray:
        f = np.full((space.num_classes,) + p.shape[1:], 1e-4, np.float32)
        f[ids] = p
        return f / f.sum(0, keepdims=True)

    full = [full21(p, np.r_[0, fg(r)]) for p, r in zip(probs, rows)]
    stage_t["crf (all 21 labels)"] = _timeit(lambda: [dense_crf(i, f) for i, f in zip(imgs, full)])
    scores = [np.log(np.clip(p, 1e-6, 1)) for p in probs]
    stage_t["em-adapt E-step"] = _timeit(lambda: [e_step_present(s, np.r_[0, fg(r)], EStepParams(mode="adapt"))
                                                  for s, r in zip(scores, rows)])
    fig["stage_images_per_s"] = {k: n / v for k, v in stage_t.items()}
    fig["crf_restricted_vs_21_speedup"] = stage_t["crf (all 21 labels)"] / stage_t["crf (bg + present)"]
    fig["mean_present_labels_incl_bg"] = float(np.mean([1 + len(fg(r)) for r in rows]))

    # -- 2. CPU chain at 640x480 on one core -------------------------------------------------
    big = [_resize(i, 640, 480) for i in imgs]
    big_cams = [np.stack([_resize((c * 255).astype(np.uint8), 640, 480) for c in cs]).astype(np.float32) / 255
                if len(cs) else np.zeros((0, 480, 640), np.float32) for cs in cams]
    chain: dict[str, float] = {}
    for scale in (1.0, 0.5):
        def run_chain(scale: float = scale) -> None:
            for i, r, c in zip(big, rows, big_cams):
                _, q = self_diffusion(i, c, fg(r), 0, DiffusionParams())
                crf_labels(i, q / q.sum(0, keepdims=True), np.r_[0, fg(r)], CRFParams(scale=scale))
        chain[f"crf scale {scale}"] = n / _timeit(run_chain)
    fig["chain_640x480_images_per_s_one_core"] = chain

    # -- 3. serial vs Ray Data -----------------------------------------------------------
    ray_vs: dict[str, dict[str, float]] = {}
    n_ray = a.ray_images or n
    ray_rows = rows if n_ray == n else store.read_table(
        ["image_id", "source", "image", "labels", "boxes", "height", "width"]).slice(0, n_ray).to_pylist()
    n_ray = len(ray_rows)
    fig["ray_images"] = n_ray
    for name in ("bbox_seg", "cam_diffusion_crf"):
        path = Path(__file__).resolve().parents[1] / "configs/pseudolabel" / f"{name}.yaml"
        rec = load_recipe(path, {"max_rows": n_ray})   # the recipe's own shards, batch size and (auto) task unit
        t_ser = _timeit(lambda rec=rec: run_serial(rec, ray_rows, space.background_id, space.num_classes, checkpoint=str(ckpt)))
        for execution in ("chain", "staged"):   # auto: chain for model recipes on CPU-only clusters, else staged
            r = load_recipe(path, {"max_rows": n_ray, "execution": execution})
            out = tmp / f"labels_{name}_{execution}"

            def go(r: Any = r, out: Path = out) -> None:
                shutil.rmtree(out, ignore_errors=True)   # a fresh store each time (a rerun would skip its shards)
                run_pipeline(r, a.store, out, checkpoint=str(ckpt), progress=False)

            # best of 2: the first run also pays Ray's worker start-up and imports (reported separately)
            t_cold = _timeit(go)
            t_ray = min(t_cold, _timeit(go))
            ray_vs[f"{name} ({execution})"] = {"serial_images_per_s": n_ray / t_ser, "ray_images_per_s": n_ray / t_ray,
                                               "ratio": t_ser / t_ray, "ray_first_run_images_per_s": n_ray / t_cold}
    fig["serial_vs_ray_data"] = ray_vs
    fig["machine_parallel_capacity"] = machine_parallel_capacity(a.num_cpus)

    # -- 4/5. label-space size: 21 vs 21,841 classes ------------------------------------------
    big_space = LabelSpace("in21k", tuple(["background"] + [f"c{i}" for i in range(1, 21841)]),
                           np.zeros((21841, 3), np.uint8), ignore_index=65535)
    remap = {c: c * 1000 + 840 for c in range(1, 21)}          # VOC ids -> ids spread over 1..20840

    def per_image(space_ids: Callable[[np.ndarray], np.ndarray], num_classes: int) -> None:
        from raysemiseg.data.schema import encode_mask
        from raysemiseg.pseudolabel.pipeline import _fg_ids

        c = _Ctx(0, num_classes)
        for i, r, p, s in zip(imgs, rows, probs, scores):
            ids = np.r_[0, space_ids(fg(r))]
            _fg_ids({"labels": ids[1:].tolist()}, c)
            lab = e_step_present(s, ids, EStepParams(mode="adapt"))
            lab, _ = crf_labels(i, p, ids)
            encode_mask(lab)
            b = [dict(bx, class_id=int(space_ids(np.array([bx["class_id"]]))[0])) for bx in r["boxes"]]
            bbox_rect(b, r["height"], r["width"])

    small_t, small_m = _peak_mem(lambda: per_image(lambda x: x, 21))
    big_t, big_m = _peak_mem(lambda: per_image(lambda x: np.array([remap[int(v)] for v in x], np.int64), 21841))
    ckpt_big = _cam_checkpoint(tmp, space=big_space)
    cam_big = _ModelStage("cam", {}, str(ckpt_big), _Ctx(0, 21841), use_gpu=False)

    def cam_time(stage: _ModelStage, f: Callable[[np.ndarray], np.ndarray]) -> float:
        def go() -> None:
            with torch.inference_mode():
                for i, r in zip(imgs, rows):
                    stage.method.cams(stage._tensor(i), [f(fg(r)).tolist()], out_size=i.shape[:2])
        return _timeit(go)

    cam_small = cam_time(cam_stage, lambda x: x)
    cam_bigt = cam_time(cam_big, lambda x: np.array([remap[int(v)] for v in x], np.int64))
    fig["label_space_21_vs_21841"] = {
        "cpu_stages_ms_per_image": [1000 * small_t / n, 1000 * big_t / n], "time_ratio": big_t / small_t,
        "cpu_stages_peak_mib": [small_m / 2**20, big_m / 2**20], "memory_ratio": big_m / max(small_m, 1),
        "cam_ms_per_image": [1000 * cam_small / n, 1000 * cam_bigt / n], "cam_time_ratio": cam_bigt / cam_small,
    }
    _print(fig, stage_t)
    if a.json:
        Path(a.json).write_text(json.dumps(fig, indent=1))
    ray.shutdown()


def _print(fig: dict[str, Any], stage_t: dict[str, float]) -> None:
    n = fig["images"]
    h, w = fig["mean_size"]
    print(f"\npseudo-label throughput: {n} real sample images (mean {h:.0f}x{w:.0f} px), "
          f"{fig['num_cpus']} CPUs, mean present labels incl. background {fig['mean_present_labels_incl_bg']:.2f}\n")
    print(f"{'stage (serial, one process)':<34} {'images/s':>9} {'ms/image':>9}")
    for k, v in fig["stage_images_per_s"].items():
        print(f"{k:<34} {v:9.2f} {1000 / v:9.1f}")
    print(f"\n{'CPU chain SLIC+diffusion+CRF 640x480':<44} {'images/s/core':>13}   goal >= 2")
    for k, v in fig["chain_640x480_images_per_s_one_core"].items():
        print(f"  {k:<42} {v:13.2f}")
    print(f"\nserial vs Ray Data pipeline on {fig.get('ray_images', n)} images (the pipeline reads, shards, writes Parquet)")
    print(f"{'recipe (execution)':<28} {'serial img/s':>12} {'Ray Data img/s':>15} {'ratio':>7} {'(1st run img/s)':>16}   goal >= 1.7x")
    for k, v in fig["serial_vs_ray_data"].items():
        print(f"{k:<28} {v['serial_images_per_s']:12.2f} {v['ray_images_per_s']:15.2f} {v['ratio']:7.2f}x "
              f"{v['ray_first_run_images_per_s']:16.2f}")
    print(f"(this machine's own speed-up of {fig['num_cpus']} concurrent CPU-bound processes over one, measured "
          f"now: {fig['machine_parallel_capacity']:.2f}x; ideal {fig['num_cpus']}x)")
    print(f"\ndense CRF bg+present vs all 21 labels: {fig['crf_restricted_vs_21_speedup']:.2f}x faster   goal >= 2x")
    ls = fig["label_space_21_vs_21841"]
    print(f"\n{'label space':<36} {'21':>10} {'21,841':>10} {'ratio':>7}   goal <= 1.2x")
    print(f"{'CPU stages ms/image':<36} {ls['cpu_stages_ms_per_image'][0]:10.1f} {ls['cpu_stages_ms_per_image'][1]:10.1f} {ls['time_ratio']:7.2f}")
    print(f"{'CPU stages peak MiB (tracemalloc)':<36} {ls['cpu_stages_peak_mib'][0]:10.1f} {ls['cpu_stages_peak_mib'][1]:10.1f} {ls['memory_ratio']:7.2f}")
    print(f"{'CAM stage ms/image':<36} {ls['cam_ms_per_image'][0]:10.1f} {ls['cam_ms_per_image'][1]:10.1f} {ls['cam_time_ratio']:7.2f}")


if __name__ == "__main__":
    main()
