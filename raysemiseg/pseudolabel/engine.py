"""Ray Data execution of a recipe: shard planning, the operator plan (:func:`plan_ops`), workers
that write their shards, resume by content, the manifest. See :mod:`raysemiseg.pseudolabel.pipeline`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from raysemiseg.data.schema import IMAGE_STORE_SCHEMA, LABEL_STORE_SCHEMA, QUARANTINE_SCHEMA
from raysemiseg.pseudolabel.recipe import Recipe, _groups, recipe_cpu_need, resolve_stage_checkpoints
from raysemiseg.pseudolabel.stages import (
    _READ_COLUMNS,
    _SHARD_SCHEMA,
    Step,
    _Ctx,
    _finalize,
    _map_shards,
    _model_args,
    _ModelStage,
    _rows_from_bytes,
    _rows_to_bytes,
    _run_rows,
    _stage_list,
)

__all__ = ["MapOp", "RunResult", "ShardPlan", "plan_ops", "plan_shards", "run_pipeline"]

#: what the last operator returns to the driver per committed shard: counts only
_DONE_SCHEMA = pa.schema([("shard", pa.int64()), ("written", pa.int64()), ("quarantined", pa.int64()),
                          ("timings", pa.string())])


@functools.lru_cache(maxsize=4)
def _cached_model_stage(name: str, params_json: str, checkpoint: str, sha256: str, background_id: int,
                        num_classes: int, device: str) -> _ModelStage:
    """A model stage built once per worker process and reused by later tasks (and later runs on
    the same cluster); keyed by the weights' SHA-256, so a checkpoint rewritten in place reloads."""
    return _ModelStage(name, json.loads(params_json), checkpoint, _Ctx(background_id, num_classes), device=device)


def _build_steps(groups: list[tuple[str, list[tuple[str, dict[str, Any]]]]], ckpts: dict[str, dict[str, str]],
                 ctx: _Ctx, device: str) -> list[Step]:
    steps: list[Step] = []
    for kind, stages in groups:
        if kind == "model":
            name, params = stages[0]
            params, path = _model_args(name, params, ckpts)
            steps.append(("model", _cached_model_stage(name, json.dumps(params, sort_keys=True), path,
                                                       ckpts[name]["sha256"], ctx.background_id, ctx.num_classes,
                                                       device)))
        elif stages:
            steps.append(("cpu", _stage_list(stages)))
    return steps


# ------------------------------------------------------------------------------------------
# Ray Data callables: every one maps shard records (one row per shard) to shard records; the last
# one writes the shard from the worker and returns its counts (_DONE_SCHEMA)
@functools.lru_cache(maxsize=2)
def _store_file_table(path: str, mtime_ns: int, size: int) -> pa.Table:
    """The image columns of one image-store Parquet file, cached per worker process (the last two
    files; keyed by path, mtime and size, so a rewritten file is read again)."""
    return pq.read_table(path, columns=_READ_COLUMNS, schema=IMAGE_STORE_SCHEMA)


def _read_item(item: dict[str, Any], store_files: list[str]) -> list[dict[str, Any]]:
    """One shard item (``file_idx``, ``row_idx``) -> its image rows as flow rows, in plan order."""
    by_file: dict[int, list[tuple[int, int]]] = {}
    for pos, (f, r) in enumerate(zip(item["file_idx"], item["row_idx"])):
        by_file.setdefault(f, []).append((pos, r))
    out: list[dict[str, Any] | None] = [None] * len(item["row_idx"])
    for f, pr in sorted(by_file.items()):
        st = os.stat(store_files[f])
        t = _store_file_table(store_files[f], st.st_mtime_ns, st.st_size).take([r for _, r in pr])
        for (pos, _), row in zip(pr, t.to_pylist()):
            row.update(state=None, timings="{}", q_stage="", q_reason="")
            out[pos] = row
    rows = [r for r in out if r is not None]
    if [r["image_id"] for r in rows] != list(item["image_ids"]):
        raise RuntimeError(f"shard {item['shard']}: the store's rows changed since planning "
                           f"(expected {list(item['image_ids'])[:3]}...)")
    return rows


def _read_task(items: pa.Table, store_files: list[str]) -> pa.Table:
    """Shard items -> shard records (the staged graph's first operator)."""
    recs = []
    for item in items.to_pylist():
        recs.append({"shard": item["shard"], "image_ids": item["image_ids"],
                     "rows": _rows_to_bytes(_read_item(item, store_files))})
    return pa.Table.from_pylist(recs, schema=_SHARD_SCHEMA)


@dataclass(frozen=True)
class _Writer:
    """Where and how the last operator commits a shard (see :func:`_commit_shard`)."""

    out: str
    recipe: str
    prov_json: str
    save_confidence: bool


def _commit_shard(k: int, image_ids: Sequence[str], rows: list[dict[str, Any]], w: _Writer) -> dict[str, Any]:
    """Encode and atomically write shard ``k`` from the worker (:func:`store.write_shard`).

    Returns:
        ``{"shard", "written", "quarantined", "timings"}`` (``timings``: JSON of the per-stage
        seconds summed over the shard's rows): all the driver receives.

    Raises:
        RuntimeError: the rows are not exactly the shard's planned rows (in order).
    """
    from raysemiseg.pseudolabel.store import write_shard

    if [r["image_id"] for r in rows] != list(image_ids):
        raise RuntimeError(f"shard {k}: rows {list(image_ids)} expected, got {[r['image_id'] for r in rows]}")
    recs = _finalize(rows, w.save_confidence)
    good = [r for r in recs if not r["q_reason"]]
    bad = [r for r in recs if r["q_reason"]]
    labels = pa.Table.from_pylist([{"image_id": r["image_id"], "recipe": w.recipe, "mask": r["mask"],
                                    "confidence": r["confidence"], "provenance": w.prov_json,
                                    "timings": r["timings"]} for r in good], schema=LABEL_STORE_SCHEMA)
    quar = pa.Table.from_pylist([{"image_id": r["image_id"], "source": r["source"] or "", "path": "",
                                  "stage": f"pseudolabel:{r['q_stage']}", "reason": r["q_reason"]} for r in bad],
                                schema=QUARANTINE_SCHEMA)
    write_shard(w.out, k, labels, quar)
    tsum: dict[str, float] = {}
    for r in recs:
        for s, v in json.loads(r["timings"] or "{}").items():
            tsum[s] = tsum.get(s, 0.0) + v
    return {"shard": k, "written": len(good), "quarantined": len(bad), "timings": json.dumps(tsum)}


def _chain_task(items: pa.Table, groups: list[tuple[str, list[tuple[str, dict[str, Any]]]]],
                ckpts: dict[str, dict[str, str]], ctx: _Ctx, device: str, store_files: list[str],
                writer: _Writer) -> pa.Table:
    """Ray Data task (``execution: chain``): read one shard, run every step (models cached per
    worker process), write the shard; returns its counts."""
    steps = _build_steps(groups, ckpts, ctx, device)
    done = []
    for item in items.to_pylist():
        rows = _read_item(item, store_files)
        _run_rows(rows, steps, ctx)
        done.append(_commit_shard(item["shard"], item["image_ids"], rows, writer))
    return pa.Table.from_pylist(done, schema=_DONE_SCHEMA)


def _cpu_task(batch: pa.Table, stages: list[tuple[str, dict[str, Any]]], ctx: _Ctx,
              writer: _Writer | None) -> pa.Table:
    """Ray Data task (staged): a fused group of CPU stages on shard records; with ``writer`` (the
    last group) the shards are then written and their counts returned."""
    steps: list[Step] = [("cpu", _stage_list(stages))] if stages else []
    if writer is None:
        return _map_shards(batch, lambda rows: _run_rows(rows, steps, ctx))
    done = []
    for rec in batch.to_pylist():
        rows = _rows_from_bytes(rec["rows"])
        _run_rows(rows, steps, ctx)
        done.append(_commit_shard(rec["shard"], rec["image_ids"], rows, writer))
    return pa.Table.from_pylist(done, schema=_DONE_SCHEMA)


@dataclass(frozen=True)
class MapOp:
    """One Ray Data operator of a run's plan: ``ds.map_batches(fn, **kwargs)``."""

    name: str
    fn: Any
    kwargs: dict[str, Any]


def plan_ops(recipe: Recipe, ckpts: dict[str, dict[str, str]], ctx: _Ctx, store_files: list[str],
             writer: _Writer) -> list[MapOp]:
    """The Ray Data operators of a run, in order (each input row is one shard item).

    Resources come from the recipe only (never from what the cluster has at start): a model stage
    asks for ``gpus_per_model_actor`` GPUs per actor in an autoscaling pool of
    ``model_actors = (min, max)`` actors (staged), or per chain task (chain).

    Args:
        recipe: the recipe.
        ckpts: ``{model stage: {"path", "sha256"}}`` (:func:`resolve_stage_checkpoints`).
        ctx: label-space facts.
        store_files: the image store's Parquet files (plan order).
        writer: where the last operator writes shards.

    Returns:
        the operators; apply them with ``ds = ds.map_batches(op.fn, **op.kwargs)``.
    """
    from ray.data import ActorPoolStrategy

    groups = _groups(recipe)
    base = {"batch_size": 1, "batch_format": "pyarrow", "num_cpus": recipe.cpus_per_task}
    gpus = recipe.gpus_per_model_actor
    if not recipe.staged:
        kw = dict(base, fn_kwargs={"groups": groups, "ckpts": ckpts, "ctx": ctx, "device": recipe.device,
                                   "store_files": store_files, "writer": writer})
        if recipe.needs_model and gpus > 0:
            kw["num_gpus"] = gpus
        return [MapOp("chain", _chain_task, kw)]
    ops = [MapOp("read", _read_task, dict(base, fn_kwargs={"store_files": store_files}))]
    lo, hi = recipe.actor_pool
    for gi, (kind, stages) in enumerate(groups):
        last = gi == len(groups) - 1
        if kind == "cpu":
            ops.append(MapOp("+".join(n for n, _ in stages) or "write", _cpu_task,
                             dict(base, fn_kwargs={"stages": stages, "ctx": ctx, "writer": writer if last else None})))
        else:
            name, params = stages[0]
            params, path = _model_args(name, params, ckpts)
            kw = dict(base, compute=ActorPoolStrategy(min_size=lo, max_size=hi),
                      fn_constructor_kwargs={"name": name, "params": params, "checkpoint": path,
                                             "ctx": ctx, "device": recipe.device})
            if gpus > 0:
                kw["num_gpus"] = gpus
            ops.append(MapOp(name, _ModelStage, kw))
    return ops


# ------------------------------------------------------------------------------------------
# planning
@dataclass
class ShardPlan:
    """Deterministic sharding of the selected rows of an image store.

    Attributes:
        files: the store's Parquet files (absolute paths, store order).
        shards: per shard, the (file index, row index) of its rows, in store order.
        image_ids: per shard, the image ids (for checks).
    """

    files: list[str]
    shards: list[list[tuple[int, int]]]
    image_ids: list[list[str]]

    @property
    def num_rows(self) -> int:
        return sum(len(s) for s in self.shards)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for ids in self.image_ids:
            h.update(("\n".join(ids) + "\x00").encode())
        return h.hexdigest()[:16]

    def items(self, pending: Sequence[int]) -> list[dict[str, Any]]:
        """One Ray Data input row per pending shard: ``{"shard", "file_idx", "row_idx", "image_ids"}``."""
        return [{"shard": k, "file_idx": [f for f, _ in self.shards[k]], "row_idx": [r for _, r in self.shards[k]],
                 "image_ids": self.image_ids[k]} for k in pending]


def plan_shards(store: Any, recipe: Recipe) -> ShardPlan:
    """Select the recipe's rows (splits, supervision) in store order and cut them into shards.

    Reads only the ``image_id``, ``split`` and ``supervision`` columns.
    """
    files = [str(p.resolve()) for p in store.files]
    sel: list[tuple[int, int, str]] = []
    splits = set(recipe.splits) if recipe.splits else None
    sup = set(recipe.supervision) if recipe.supervision else None
    for fi, f in enumerate(files):
        t = pq.read_table(f, columns=["image_id", "split", "supervision"])
        for ri, (iid, sp, su) in enumerate(zip(*(t.column(c).to_pylist() for c in ("image_id", "split", "supervision")))):
            if (splits is None or sp in splits) and (sup is None or su in sup):
                sel.append((fi, ri, iid))
    if recipe.max_rows is not None:
        sel = sel[:recipe.max_rows]
    r = recipe.rows_per_shard
    shards = [sel[i:i + r] for i in range(0, len(sel), r)]
    return ShardPlan(files, [[(f, i) for f, i, _ in s] for s in shards], [[x for _, _, x in s] for s in shards])


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("raysemiseg")
    except Exception:  # noqa: BLE001
        return "unknown"


def _provenance(recipe: Recipe, ckpts: dict[str, dict[str, str]], space: Any, store_path: Path) -> dict[str, Any]:
    own = recipe.stage_checkpoints()
    run = [c for n, c in ckpts.items() if n not in own]
    return {
        "recipe": recipe.name,
        "recipe_hash": recipe.digest(),
        "stages": [{"name": s.name, "params": s.build_params().model_dump(mode="json")} for s in recipe.stages],
        "checkpoint": run[0]["path"] if run else None,
        "checkpoint_sha256": run[0]["sha256"] if run else None,
        "stage_checkpoints": {n: ckpts[n] for n in sorted(own) if n in ckpts},
        "package_version": _package_version(),
        "label_space": space.name,
        "image_store": str(store_path),
    }


# ------------------------------------------------------------------------------------------
# running
@dataclass
class RunResult:
    """What a pipeline run did.

    Attributes:
        out: the label store folder.
        rows_in: selected image rows (all shards).
        written, quarantined: label rows and quarantined rows (all committed shards).
        shards_total, shards_run, shards_skipped: shard counts (skipped = already committed).
        seconds: wall time of this run.
        stage_seconds: per-stage total seconds over the rows processed in this run.
    """

    out: Path
    rows_in: int
    written: int
    quarantined: int
    shards_total: int
    shards_run: int
    shards_skipped: int
    seconds: float
    stage_seconds: dict[str, float] = field(default_factory=dict)


def _resume_key(recipe: Recipe, plan: ShardPlan, ckpts: dict[str, dict[str, str]]) -> dict[str, Any]:
    """What must match for committed shards to be kept: recipe content, planned rows, and the
    content (SHA-256) of every checkpoint a model stage loads."""
    return {"recipe_hash": recipe.digest(), "fingerprint": plan.fingerprint(),
            "checkpoints": {n: c["sha256"] for n, c in sorted(ckpts.items())}}


def _differences(old: dict[str, Any], key: dict[str, Any], ckpts: dict[str, dict[str, str]]) -> list[str]:
    old_key = old.get("resume_key")
    if not isinstance(old_key, dict):
        return ["it was written without a resume key (an older version)"]
    diff = []
    if old_key.get("recipe_hash") != key["recipe_hash"]:
        diff.append(f"recipe {old.get('recipe', {}).get('name')!r} hash {old_key.get('recipe_hash')} vs "
                    f"this run's {key['recipe_hash']}")
    if old_key.get("fingerprint") != key["fingerprint"]:
        diff.append("another selection of image-store rows")
    old_ck = old_key.get("checkpoints", {})
    old_paths = old.get("checkpoints", {})
    for n in sorted(set(old_ck) | set(key["checkpoints"])):
        if old_ck.get(n) != key["checkpoints"].get(n):
            was = old_paths.get(n, {})
            now = ckpts.get(n, {})
            diff.append(f"stage {n!r} checkpoint {was.get('path')} (sha256 {str(old_ck.get(n))[:12]}) vs this run's "
                        f"{now.get('path')} (sha256 {str(key['checkpoints'].get(n))[:12]})")
    return diff


def _prepare_out(out: Path, key: dict[str, Any], ckpts: dict[str, dict[str, str]], overwrite: bool) -> None:
    """Keep ``out`` when it holds (part of) the same labels; else refuse, or with ``overwrite``
    empty it. ``overwrite`` replaces only what differs: the same resume key keeps every committed shard.

    Raises:
        ValueError: ``out`` holds other labels (naming each difference) and ``overwrite`` is False,
            or ``out`` is a non-empty folder that is not a label store.
    """
    import shutil

    from raysemiseg.pseudolabel.store import MANIFEST

    if out.exists() and any(out.iterdir()):
        mf = out / MANIFEST
        if not mf.is_file():
            raise ValueError(f"--out {out} is a non-empty folder without {MANIFEST}; choose an empty or new folder")
        diff = _differences(json.loads(mf.read_text()), key, ckpts)
        if diff:
            if not overwrite:
                raise ValueError(f"--out {out} holds other labels than this run would write: {'; '.join(diff)}. "
                                 f"Mixing them is refused; pass --overwrite to relabel everything, or choose "
                                 f"another --out")
            for sub in ("shards", "quarantine"):
                shutil.rmtree(out / sub, ignore_errors=True)
            mf.unlink()
    out.mkdir(parents=True, exist_ok=True)


def run_pipeline(recipe: Recipe, store_path: str | Path, out: str | Path, *, checkpoint: str | None = None,
                 overwrite: bool = False, num_cpus: int | None = None, progress: bool = True,
                 stage_checkpoints: dict[str, str] | None = None,
                 on_shard: Callable[[int], None] | None = None) -> RunResult:
    """Run ``recipe`` over the image store at ``store_path`` on Ray Data, writing the label store ``out``.

    Resumable: committed shards of an earlier run with the same resume key (recipe content, planned
    rows, SHA-256 of every checkpoint a model stage loads) are kept and skipped. Workers write the
    shards (atomically); the driver receives only per-shard counts.

    Args:
        recipe: a validated :class:`Recipe`.
        store_path: image store folder.
        out: label store folder (created).
        checkpoint: checkpoint directory, or training run folder (its newest checkpoint), for model
            stages (overrides ``recipe.checkpoint``).
        overwrite: when ``out`` holds labels of another resume key (recipe, rows or checkpoints),
            delete them and relabel everything (without it, such a run is refused). Labels of the
            same key are kept either way.
        num_cpus: CPUs of the local Ray instance when this call starts one (None = all).
        progress: tqdm bar over the rows.
        stage_checkpoints: ``{stage: checkpoint}`` for stages with their own checkpoint (e.g.
            ``{"lnet_map": LNET_DIR}``); overrides the recipe's stage parameter (and so enters the
            recipe hash and provenance).
        on_shard: called on the driver with each shard index once that shard is committed.

    Returns:
        :class:`RunResult`.

    Raises:
        FileNotFoundError: store or checkpoint missing.
        ValueError: a model stage without checkpoint, a label space without background, ``out``
            holding other labels (without ``overwrite``), or rows in != written + quarantined.
        Exception: a stage's runtime error (not a data error), e.g. ``RuntimeError`` or
            ``torch.cuda.OutOfMemoryError`` (wrapped by Ray); committed shards stay, the
            manifest is not complete, and a rerun resumes.
    """
    import ray
    from ray.data import DataContext
    from tqdm import tqdm

    from raysemiseg.data.store import open_store
    from raysemiseg.pseudolabel.store import clean_partial, committed_shards, write_manifest

    t_start = time.perf_counter()
    recipe = recipe.with_stage_checkpoints(stage_checkpoints)
    store = open_store(store_path)
    space = store.label_space
    if space.background_id is None:
        raise ValueError(f"label space {space.name!r} has no background class; pseudo-label recipes need one")
    ckpts = resolve_stage_checkpoints(recipe, checkpoint or recipe.checkpoint)
    out = Path(out)
    plan = plan_shards(store, recipe)
    key = _resume_key(recipe, plan, ckpts)
    _prepare_out(out, key, ckpts, overwrite)
    clean_partial(out)
    prov = _provenance(recipe, ckpts, space, Path(store_path))
    done = committed_shards(out)
    pending = [k for k in range(len(plan.shards)) if k not in done]
    manifest = _manifest(recipe, plan, prov, space, key, ckpts)
    old_mf = out / "manifest.json"
    if old_mf.is_file():  # keep the timings of earlier (resumed) runs
        manifest["timings"] = json.loads(old_mf.read_text()).get("timings", {})
    write_manifest(out, manifest)
    ctx = _Ctx(background_id=int(space.background_id), num_classes=space.num_classes)
    stage_sum: dict[str, float] = {}
    if pending:
        from raysemiseg.runtime import ensure_ray

        ensure_ray(num_cpus=num_cpus, log_to_driver=False, need=recipe_cpu_need(recipe))
        dctx = DataContext.get_current()
        old_bars = dctx.enable_progress_bars
        dctx.enable_progress_bars = False
        try:
            writer = _Writer(str(out.absolute()), recipe.name, json.dumps(prov, sort_keys=True),
                             recipe.save_confidence)
            items = plan.items(pending)
            ds = ray.data.from_items(items, override_num_blocks=len(items))
            for op in plan_ops(recipe, ckpts, ctx, plan.files, writer):
                ds = ds.map_batches(op.fn, **op.kwargs)
            left = set(pending)
            bar = tqdm(total=sum(len(plan.shards[k]) for k in pending), desc=f"pseudolabel {recipe.name}",
                       unit="img", disable=not progress)
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):   # O(1) per shard
                for k, w, q, tj in zip(*(batch.column(c).to_pylist() for c in _DONE_SCHEMA.names)):
                    left.discard(k)
                    bar.update(w + q)
                    for s, v in json.loads(tj).items():
                        stage_sum[s] = stage_sum.get(s, 0.0) + v
                    if on_shard is not None:
                        on_shard(k)
            bar.close()
            if left:
                raise RuntimeError(f"shards {sorted(left)} were not committed")
        finally:
            dctx.enable_progress_bars = old_bars
    result = _finish(out, plan, manifest, stage_sum, len(done), len(pending), t_start)
    write_manifest(out, manifest)
    return result


def _manifest(recipe: Recipe, plan: ShardPlan, prov: dict[str, Any], space: Any, key: dict[str, Any],
              ckpts: dict[str, dict[str, str]]) -> dict[str, Any]:
    """The manifest (no per-shard entries: the committed shard files are the truth)."""
    from raysemiseg.pseudolabel.store import LABEL_STORE_VERSION

    return {
        "schema_version": LABEL_STORE_VERSION,
        "recipe": {"name": recipe.name, "hash": recipe.digest(), "config": recipe.model_dump(mode="json")},
        "resume_key": key,
        "checkpoints": ckpts,
        "provenance": prov,
        "label_space": {"name": space.name, "num_classes": space.num_classes},
        "sharding": {"rows_per_shard": recipe.rows_per_shard, "num_shards": len(plan.shards),
                     "rows": plan.num_rows, "fingerprint": plan.fingerprint()},
        "complete": False,
    }


def _finish(out: Path, plan: ShardPlan, manifest: dict[str, Any], stage_sum: dict[str, float],
            skipped: int, ran: int, t_start: float) -> RunResult:
    from raysemiseg.pseudolabel.store import committed_shards, open_label_store

    ls = open_label_store(out)
    written, quarantined = len(ls), ls.read_quarantine().num_rows
    done = committed_shards(out)
    complete = len(done) == len(plan.shards)
    rows_in = plan.num_rows
    if complete and rows_in != written + quarantined:
        raise ValueError(f"label store {out}: rows in {rows_in} != written {written} + quarantined {quarantined}")
    n_proc = max(1, sum(len(plan.shards[k]) for k in done))
    prev = manifest.get("timings", {}).get("total_seconds", {})
    totals = {s: prev.get(s, 0.0) + v for s, v in stage_sum.items()} if ran else dict(prev)
    manifest.update(
        complete=complete,
        counts={"in": rows_in, "written": written, "quarantined": quarantined},
        timings={"total_seconds": totals, "mean_seconds_per_image": {s: v / n_proc for s, v in totals.items()},
                 "last_run_wall_seconds": time.perf_counter() - t_start},
    )
    return RunResult(out, rows_in, written, quarantined, len(plan.shards), ran, skipped,
                     time.perf_counter() - t_start, stage_sum)
