"""The pseudo-label engine: a recipe of stages run over an image store on Ray Data -> a label store.

A **recipe** (YAML in ``configs/pseudolabel/``) chains stages; each stage is a pure function of
:mod:`raysemiseg.pseudolabel` wrapped for one image::

    stage        needs            gives                      function
    ----------   --------------   ------------------------   ---------------------------------------
    bbox_rect    boxes            label                      bbox.bbox_rect
    bbox_seg     boxes            label, confidence          bbox.bbox_seg (clamped dense CRF)
    cam     [M]  image labels     cams, probs, label         cam.class_activation_maps (cam_classifier)
    lnet_map [M] (none)           agnostic                   lpnet.model.lnet_map (L-Net checkpoint)
    diffusion    cams [agnostic]  probs, label               superpixels.self_diffusion
    scores  [M]  image labels     scores                     a segmentation checkpoint's logits
    em           scores           probs, label               em.e_step_present (EM-Fixed / EM-Adapt)
    crf          probs            label, confidence          crf.crf_labels (background + present only)

``[M]`` stages hold a model: they run as callable classes in a Ray Data ``ActorPoolStrategy`` pool,
built once per actor from a training checkpoint (:func:`raysemiseg.train.checkpoint.load_method`):
the run's ``--checkpoint``, or, for ``lnet_map``, the stage's own ``checkpoint`` parameter (an
``lnet``/``lnet_pnet`` checkpoint next to the ``cam_classifier`` one of the ``cam`` stage).
``lnet_map`` gives the class-agnostic map M of Xiao et al. 2018 (Sec. 3.1); a later ``diffusion``
stage uses it as the extra feature of Eq. 2 (``DiffusionParams.agnostic_weight``) whenever it is
present. Placement:

- with GPUs: each model stage is its own pool of ``model_actors`` actors (``num_gpus`` each);
  consecutive CPU stages are fused into one ``map_batches`` task (task pool, ``cpus_per_task``
  CPUs each);
- CPU only: the whole chain (read, model stages, CPU stages, encoding) runs in one task per input
  item (:func:`_chain_task`, ``cpus_per_task`` CPUs each), each model loaded once per Ray worker
  process and cached there (reused by later tasks and later runs on the same cluster), so every
  core works on whole images instead of one core holding the single model actor and the others
  waiting on it;
- recipes without a model stage: read + fused CPU stages in one task pool.

SLIC + diffusion + CRF of one image always run back to back in one process while the images are
spread over all cores. Every per-image stage works on the image's present labels only (P rows),
never on the whole label space.

Sharding and resume (see :mod:`raysemiseg.pseudolabel.store`): the selected rows of the image store,
in store order, are cut into shards of ``rows_per_shard`` consecutive rows: the **commit unit**
(resume granularity, one file on disk). Independently, each pending shard is cut into input items
of ``rows_per_task`` rows (default :func:`auto_rows_per_task`, about 4 per CPU): the **task unit**.
Each item is one Ray Data block (Ray Data never splits a block across tasks, so one block per shard
capped the parallelism at the number of shards); its rows are read from the store's Parquet files on
the worker (each file once per worker). The driver collects finished rows per shard and commits a
shard atomically once all its rows arrived (written or quarantined), in store order. A rerun skips
committed shards, so a run killed part-way and rerun ends with exactly the rows of an uninterrupted
run, whatever the task unit. A per-image failure in any stage sends the image to quarantine with
the stage and the reason; rows in = rows out + quarantined, per shard and in total.

Provenance (every row and the manifest): recipe name and hash, each stage's parameters, checkpoint
path and SHA-256 of its weights, package version, label space; per-stage timings (seconds) per row,
summed and averaged in the manifest.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from raysemiseg.data.schema import (
    BOX_TYPE,
    IMAGE_STORE_SCHEMA,
    LABEL_STORE_SCHEMA,
    QUARANTINE_SCHEMA,
    decode_image,
    encode_mask,
)

__all__ = [
    "STAGES",
    "LNetMapStageParams",
    "Recipe",
    "RunResult",
    "StageSpec",
    "auto_rows_per_task",
    "load_recipe",
    "plan_shards",
    "run_pipeline",
    "run_serial",
    "task_items",
]

#: set to N to SIGKILL the driver right after the N-th shard of a run is committed (tests only)
FAULT_ENV = "RAYSEMISEG_FAULT_KILL_AFTER_SHARDS"


# ------------------------------------------------------------------------------------------
# recipe
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NoParams(_Strict):
    """A stage without parameters."""


class CamStageParams(_Strict):
    """``cam`` stage.

    Attributes:
        bg_score: constant background score next to the [0, 1] CAMs: a pixel is background where
            every present class's CAM is below it (CAM-alone labels), and the CRF unary of the
            background is ``bg_score`` before normalisation.
        input_scale: the image is resized by this factor before the classifier (CAMs are returned
            at full resolution).
    """

    bg_score: float = Field(0.25, ge=0.0, le=1.0)
    input_scale: float = Field(1.0, gt=0.0, le=2.0)


class LNetMapStageParams(_Strict):
    """``lnet_map`` stage: the L-Net class-agnostic map M = sigmoid(L-Net(x)) in [0, 1], (H, W).

    Attributes:
        checkpoint: checkpoint directory of an ``lnet`` / ``lnet_pnet`` method; None = the run's
            ``--checkpoint`` (also settable per run with ``run_pipeline(stage_checkpoints=...)``).
        input_scale: the image is resized by this factor before L-Net (M is returned at full
            resolution, bilinear).
    """

    checkpoint: str | None = None
    input_scale: float = Field(1.0, gt=0.0, le=2.0)


class ScoresStageParams(_Strict):
    """``scores`` stage: ``input_scale`` resizes the image before the network."""

    input_scale: float = Field(1.0, gt=0.0, le=2.0)


@functools.cache
def _em_params_model() -> type[BaseModel]:
    from raysemiseg.pseudolabel.em import EStepParams

    class EmStageParams(EStepParams):
        """``em`` stage: :class:`~raysemiseg.pseudolabel.em.EStepParams` + ``use_boxes``
        (Bbox-EM-Fixed: foreground biases only inside the image's boxes of that class)."""

        use_boxes: bool = False

    return EmStageParams


@dataclass(frozen=True)
class StageDef:
    """A registered stage: its parameter model, whether it holds a model, what it needs/gives."""

    name: str
    params: Callable[[], type[BaseModel]]
    model: bool
    needs: frozenset[str]
    gives: frozenset[str]


def _lazy(module: str, attr: str) -> Callable[[], type[BaseModel]]:
    def get() -> type[BaseModel]:
        import importlib

        return getattr(importlib.import_module(module), attr)

    return get


STAGES: dict[str, StageDef] = {s.name: s for s in (
    StageDef("bbox_rect", lambda: NoParams, False, frozenset(), frozenset({"label"})),
    StageDef("bbox_seg", _lazy("raysemiseg.pseudolabel.bbox", "BboxSegParams"), False, frozenset(),
             frozenset({"label", "conf"})),
    StageDef("cam", lambda: CamStageParams, True, frozenset(), frozenset({"cams", "probs", "label"})),
    StageDef("lnet_map", lambda: LNetMapStageParams, True, frozenset(), frozenset({"agnostic"})),
    StageDef("diffusion", _lazy("raysemiseg.pseudolabel.superpixels", "DiffusionParams"), False,
             frozenset({"cams"}), frozenset({"probs", "label"})),
    StageDef("scores", lambda: ScoresStageParams, True, frozenset(), frozenset({"scores"})),
    StageDef("em", _em_params_model, False, frozenset({"scores"}), frozenset({"probs", "label"})),
    StageDef("crf", _lazy("raysemiseg.pseudolabel.crf", "CRFParams"), False, frozenset({"probs"}),
             frozenset({"label", "conf"})),
)}


class StageSpec(_Strict):
    """One stage of a recipe: ``name`` (a key of :data:`STAGES`) and its ``params``."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known(self) -> StageSpec:
        if self.name not in STAGES:
            raise ValueError(f"unknown stage {self.name!r}; valid: {sorted(STAGES)}")
        try:
            STAGES[self.name].params()(**self.params)
        except ValidationError as e:
            raise ValueError(f"stage {self.name!r} params: {e}") from None
        return self

    def build_params(self) -> BaseModel:
        return STAGES[self.name].params()(**self.params)


class Recipe(_Strict):
    """A pseudo-label recipe (``configs/pseudolabel/<name>.yaml``).

    Attributes:
        name: recipe name, written to every row's ``recipe`` column.
        description: free text.
        stages: the chain, in order (checked: each stage's inputs are given by an earlier one, and
            the chain ends with a label).
        checkpoint: training checkpoint directory for model stages (``--checkpoint`` overrides).
        splits: only rows of these image-store splits (None = all).
        supervision: only rows with these supervision kinds (None = all).
        max_rows: keep only the first this many selected rows (smoke runs; None = all).
        rows_per_shard: rows per committed shard (resume granularity).
        batch_size: rows per ``map_batches`` call.
        rows_per_task: rows per Ray Data input block (the task unit; never spans two shards);
            None = :func:`auto_rows_per_task` (about 4 blocks per CPU). Does not change the output
            (not part of :meth:`digest`), so it may differ between a run and its resume.
        model_actors: actors in each model stage's pool when the stages run ``staged``.
        execution: ``chain``: one Ray Data task per input item reads the rows and runs every stage
            of the recipe (models cached per worker process), so images never cross processes;
            ``staged``: a read task, then one operator per fused group of CPU stages (tasks) and
            per model stage (an actor pool, with ``gpus_per_model_actor``); ``auto``: chain for a
            recipe with model stages on a CPU-only cluster (a CPU model actor would hold a core
            while the CPU stages wait: cam_diffusion_crf on 2 cores ran 1.88x serial chained vs
            1.15x staged), else staged (bbox_seg: 1.54x staged vs 1.35x chained in the same run,
            ``benchmarks/pseudolabel_throughput.py``). Same output either way (not part of
            :meth:`digest`).
        gpus_per_model_actor: GPUs per model actor; None = 1 when the cluster has GPUs, else 0.
        cpus_per_task: CPUs reserved by each CPU-stage task.
        save_confidence: write the ``confidence`` column when a stage gives one.
    """

    name: str
    description: str = ""
    stages: list[StageSpec]
    checkpoint: str | None = None
    splits: list[str] | None = None
    supervision: list[str] | None = None
    max_rows: int | None = Field(None, ge=1)
    rows_per_shard: int = Field(32, ge=1)
    batch_size: int = Field(4, ge=1)
    rows_per_task: int | None = Field(None, ge=1)
    model_actors: int = Field(1, ge=1)
    execution: Literal["auto", "chain", "staged"] = "auto"
    gpus_per_model_actor: float | None = Field(None, ge=0)
    cpus_per_task: float = Field(1.0, gt=0)
    save_confidence: bool = True

    @model_validator(mode="after")
    def _chain(self) -> Recipe:
        if not self.stages:
            raise ValueError("a recipe needs at least one stage")
        have: set[str] = set()
        for s in self.stages:
            d = STAGES[s.name]
            missing = d.needs - have
            if missing:
                givers = sorted(n for n, x in STAGES.items() if x.gives & missing)
                raise ValueError(f"stage {s.name!r} needs {sorted(missing)} from an earlier stage (one of {givers})")
            have |= d.gives
        if "label" not in have:
            raise ValueError("the recipe's stages never produce a label; end with e.g. 'em', 'crf' or 'bbox_rect'")
        return self

    @property
    def needs_model(self) -> bool:
        return any(STAGES[s.name].model for s in self.stages)

    @property
    def needs_run_checkpoint(self) -> bool:
        """Some model stage loads the run's checkpoint (not its own ``checkpoint`` parameter)."""
        return any(STAGES[s.name].model and not s.params.get("checkpoint") for s in self.stages)

    def stage_checkpoints(self) -> dict[str, str]:
        """``{stage name: checkpoint}`` of the stages that name their own checkpoint."""
        return {s.name: str(s.params["checkpoint"]) for s in self.stages if s.params.get("checkpoint")}

    def with_stage_checkpoints(self, stage_checkpoints: dict[str, str] | None) -> Recipe:
        """A copy with ``checkpoint`` set in the params of the named stages.

        Raises:
            ValueError: a named stage is not in the recipe or takes no checkpoint.
        """
        if not stage_checkpoints:
            return self
        names = {s.name for s in self.stages}
        for n in stage_checkpoints:
            if n not in names or "checkpoint" not in STAGES[n].params().model_fields:
                raise ValueError(f"recipe {self.name!r}: stage_checkpoints names {n!r}, which is not a stage of the "
                                 f"recipe taking a checkpoint")
        stages = [StageSpec(name=s.name, params={**s.params, "checkpoint": str(stage_checkpoints[s.name])})
                  if s.name in stage_checkpoints else s for s in self.stages]
        return Recipe.model_validate({**self.model_dump(), "stages": [s.model_dump() for s in stages]})

    def digest(self) -> str:
        """SHA-256 (first 16 hex) of the recipe's content (name, stages, selection, sharding)."""
        d = self.model_dump(mode="json", include={"name", "stages", "splits", "supervision", "max_rows", "rows_per_shard"})
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def load_recipe(path_or_dict: str | Path | dict[str, Any], overrides: dict[str, Any] | None = None) -> Recipe:
    """Load and validate a recipe.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: naming the file and the offending key/stage.
    """
    if isinstance(path_or_dict, dict):
        raw, src = dict(path_or_dict), "<dict>"
    else:
        p = Path(path_or_dict)
        if not p.is_file():
            raise FileNotFoundError(f"recipe file {p} does not exist")
        raw, src = yaml.safe_load(p.read_text()) or {}, str(p)
    raw.update(overrides or {})
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        msgs = "; ".join(f"{'.'.join(map(str, er['loc'])) or '<root>'}: "
                         f"{'unknown key' if er['type'] == 'extra_forbid' else er['msg']}" for er in e.errors())
        raise ValueError(f"{src}: invalid recipe: {msgs}") from None


# ------------------------------------------------------------------------------------------
# per-image state
_FLOW_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("source", pa.string()), ("image", pa.binary()),
    ("labels", pa.list_(pa.int32())), ("boxes", pa.list_(BOX_TYPE)),
    ("height", pa.int32()), ("width", pa.int32()), ("shard", pa.int64()),
    ("state", pa.binary()), ("timings", pa.string()), ("q_stage", pa.string()), ("q_reason", pa.string()),
])
_OUT_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("source", pa.string()), ("shard", pa.int64()),
    ("mask", pa.binary()), ("confidence", pa.binary()), ("timings", pa.string()),
    ("q_stage", pa.string()), ("q_reason", pa.string()),
])
_READ_COLUMNS = ["image_id", "source", "image", "labels", "boxes", "height", "width"]


def _pack(state: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **state)
    return buf.getvalue()


def _unpack(data: bytes | None) -> dict[str, np.ndarray]:
    if not data:
        return {}
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@dataclass
class _Ctx:
    """What every stage of a run knows: background id, label-space size, recipe knobs."""

    background_id: int
    num_classes: int


def _fg_ids(row: dict[str, Any], ctx: _Ctx) -> np.ndarray:
    ids = np.asarray(sorted(set(row["labels"] or [])), dtype=np.int64)
    ids = ids[ids != ctx.background_id]
    if ids.size and (ids.min() < 0 or ids.max() >= ctx.num_classes):
        raise ValueError(f"image-level label ids {ids.tolist()} outside the label space 0..{ctx.num_classes - 1}")
    return ids


def _softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=0, keepdims=True)
    e = np.exp(x - m)
    return (e / e.sum(axis=0, keepdims=True)).astype(np.float32)


def _box_class_regions(row: dict[str, Any], ids: np.ndarray, h: int, w: int) -> np.ndarray:
    """(P, H, W) bool: row r is inside the image's boxes of class ids[r]."""
    from raysemiseg.pseudolabel.bbox import _pixel_rect, boxes_array

    b = boxes_array(row["boxes"])
    reg = np.zeros((len(ids), h, w), dtype=bool)
    pos = {int(c): i for i, c in enumerate(ids)}
    for bx in b:
        i = pos.get(int(bx[0]))
        if i is not None:
            r0, r1, c0, c1 = _pixel_rect(bx, h, w)
            reg[i, r0:r1, c0:c1] = True
    return reg


def _run_cpu_stage(name: str, params: BaseModel, row: dict[str, Any], img: np.ndarray,
                   st: dict[str, np.ndarray], ctx: _Ctx) -> None:
    """Apply one CPU stage to one image, updating its state in place."""
    h, w = int(row["height"]), int(row["width"])
    bg = ctx.background_id
    if name in ("bbox_rect", "bbox_seg"):
        from raysemiseg.pseudolabel.bbox import bbox_rect, bbox_seg

        if not row["boxes"] and _fg_ids(row, ctx).size:
            raise ValueError(f"image has labels {list(row['labels'])} but no boxes; box recipes need boxes "
                             f"(select supervision: [box] or [pixel, box] rows)")
        if name == "bbox_rect":
            st["label"] = bbox_rect(row["boxes"], h, w, bg)
            st.pop("conf", None)
        else:
            st["label"], st["conf"] = bbox_seg(img, row["boxes"], params, bg)  # type: ignore[arg-type]
    elif name == "diffusion":
        from raysemiseg.pseudolabel.superpixels import self_diffusion

        lab, q = self_diffusion(img, st["cams"], st["fg_ids"], bg, params,  # type: ignore[arg-type]
                                agnostic=st.get("agnostic"))
        st["label"] = lab
        st["probs"] = (q / np.maximum(q.sum(axis=0, keepdims=True), 1e-8)).astype(np.float32)
        st["ids"] = np.r_[bg, st["fg_ids"]].astype(np.int64)
    elif name == "em":
        from raysemiseg.pseudolabel.em import e_step_present

        p = params
        region = _box_class_regions(row, st["ids"], h, w) if getattr(p, "use_boxes", False) else None
        e_params = _strip_boxes(p)
        lab, fhat = e_step_present(st["scores"], st["ids"], e_params, background_id=bg, region=region,
                                   return_scores=True)
        st["label"] = lab
        st["probs"] = _softmax(fhat)
    elif name == "crf":
        from raysemiseg.pseudolabel.crf import crf_labels

        st["label"], st["conf"] = crf_labels(img, st["probs"], st["ids"], params)  # type: ignore[arg-type]
    else:  # pragma: no cover - guarded by the recipe validator
        raise ValueError(f"{name!r} is not a CPU stage")


def _strip_boxes(p: BaseModel) -> BaseModel:
    from raysemiseg.pseudolabel.em import EStepParams

    return EStepParams(**p.model_dump(exclude={"use_boxes"}))


def _fail(row: dict[str, Any], stage: str, err: BaseException) -> None:
    row["q_stage"] = stage
    row["q_reason"] = f"{type(err).__name__}: {err}"
    row["state"] = None


def _stage_list(stages: Sequence[tuple[str, dict[str, Any]]]) -> list[tuple[str, BaseModel]]:
    return [(n, STAGES[n].params()(**p)) for n, p in stages]


# ------------------------------------------------------------------------------------------
# Ray Data stage callables
@functools.lru_cache(maxsize=2)
def _store_file_table(path: str, mtime_ns: int, size: int) -> pa.Table:
    """The image columns of one image-store Parquet file, cached per worker process (the last two
    files; keyed by path, mtime and size, so a rewritten file is read again)."""
    return pq.read_table(path, columns=_READ_COLUMNS, schema=IMAGE_STORE_SCHEMA)


def _read_chunks(batch: pa.Table, store_files: list[str]) -> pa.Table:
    """Task items (``shard``, ``file_idx``, ``row_idx`` lists: a chunk of one shard's rows) -> those
    image rows, each tagged with its shard. A worker reads each store file once and keeps it (see
    :func:`_store_file_table`), so many small chunks of the same file cost one read."""
    out = []
    for item in batch.to_pylist():
        by_file: dict[int, list[int]] = {}
        for f, r in zip(item["file_idx"], item["row_idx"]):
            by_file.setdefault(f, []).append(r)
        for f, rows in sorted(by_file.items()):
            st = os.stat(store_files[f])
            t = _store_file_table(store_files[f], st.st_mtime_ns, st.st_size).take(rows)
            for r in t.to_pylist():
                r.update(shard=item["shard"], state=None, timings="{}", q_stage="", q_reason="")
                out.append(r)
    return pa.Table.from_pylist(out, schema=_FLOW_SCHEMA)


def task_items(plan: ShardPlan, pending: Sequence[int], rows_per_task: int) -> list[dict[str, Any]]:
    """Cut the pending shards into Ray Data input items of at most ``rows_per_task`` rows.

    The shard is the commit unit (resume granularity, one file on disk); the item is the task unit
    (one input block: Ray Data never splits a block across tasks, so the number of items bounds the
    parallelism and sets the tail). Items never span two shards.

    Returns:
        ``[{"shard": k, "file_idx": [...], "row_idx": [...]}]`` in shard order.
    """
    if rows_per_task < 1:
        raise ValueError(f"rows_per_task must be >= 1, got {rows_per_task}")
    items = []
    for k in pending:
        rows = plan.shards[k]
        for i in range(0, len(rows), rows_per_task):
            chunk = rows[i:i + rows_per_task]
            items.append({"shard": k, "file_idx": [f for f, _ in chunk], "row_idx": [r for _, r in chunk]})
    return items


def auto_rows_per_task(recipe: Recipe, rows: int, cpus: float, blocks_per_cpu: int = 4) -> int:
    """Default task unit: about ``blocks_per_cpu`` input blocks per CPU, so the last blocks are
    short (small tail) while each task still carries several images (Ray Data's per-task cost).

    Returns:
        ``ceil(rows / (blocks_per_cpu * cpus))`` rounded up to a multiple of ``recipe.batch_size``,
        clamped to ``[batch_size, rows_per_shard]`` (>= 1).
    """
    per = -(-max(rows, 1) // max(1, int(blocks_per_cpu * max(cpus, 1.0))))
    per = -(-per // recipe.batch_size) * recipe.batch_size
    return max(1, min(max(per, recipe.batch_size), recipe.rows_per_shard))


def _weights_stamp(checkpoint: str | None) -> tuple[int, int]:
    """(mtime ns, size) of a checkpoint's weights file; (0, 0) when there is none."""
    if not checkpoint:
        return (0, 0)
    p = Path(checkpoint)
    f = p / "model.pt" if p.is_dir() else p
    try:
        st = f.stat()
    except OSError:
        return (0, 0)
    return (st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=4)
def _cached_model_stage(name: str, params_json: str, checkpoint: str | None, background_id: int, num_classes: int,
                        stamp: tuple[int, int]) -> _ModelStage:
    """A CPU model stage built once per worker process and reused by later tasks (and later runs on
    the same cluster); keyed by the weights file's (mtime, size) so a rewritten checkpoint reloads."""
    return _ModelStage(name, json.loads(params_json), checkpoint, _Ctx(background_id, num_classes), use_gpu=False)


def _chain_task(items: pa.Table, groups: list[tuple[str, list[tuple[str, dict[str, Any]]]]], checkpoint: str | None,
                ctx: _Ctx, save_confidence: bool, store_files: list[str]) -> pa.Table:
    """Ray Data task: the whole chain on one item (see :class:`_Chain`); models cached per worker."""
    return _Chain(groups, checkpoint, ctx, save_confidence, store_files)(items)


class _Chain:
    """The whole recipe in one Ray Data actor (CPU-only clusters): every model stage loaded once per
    actor; each input item (a chunk of one shard, see :func:`task_items`) is read from the store,
    run through the model and CPU groups in recipe order, and finalised (encoded). No task outside
    the actor pool, so the pool may hold every CPU."""

    def __init__(self, groups: list[tuple[str, list[tuple[str, dict[str, Any]]]]], checkpoint: str | None,
                 ctx: _Ctx, save_confidence: bool, store_files: list[str]) -> None:
        self.store_files = store_files
        self.ctx = ctx
        self.save_confidence = save_confidence
        self.steps: list[tuple[str, Any]] = []
        for kind, stages in groups:
            if kind == "model":
                name, params = stages[0]
                ck = params.get("checkpoint") or checkpoint
                stamp = _weights_stamp(ck)
                self.steps.append(("model", _cached_model_stage(name, json.dumps(params, sort_keys=True), checkpoint,
                                                                ctx.background_id, ctx.num_classes, stamp)))
            else:
                self.steps.append(("cpu", _stage_list(stages)))

    def __call__(self, items: pa.Table) -> pa.Table:
        rows = _read_chunks(items, self.store_files).to_pylist()
        for row in rows:
            for kind, step in self.steps:
                if kind == "model":
                    step.run_row(row)
                else:
                    _cpu_row(row, step, self.ctx)
        return _finalize(rows, self.save_confidence)


def _cpu_group(batch: pa.Table, stages: list[tuple[str, dict[str, Any]]], ctx: _Ctx,
               finalize: bool, save_confidence: bool) -> pa.Table:
    """Run a fused group of CPU stages (then optionally encode the outputs) on a batch of rows."""
    built = _stage_list(stages)
    rows = batch.to_pylist()
    for row in rows:
        _cpu_row(row, built, ctx)
    if finalize:
        return _finalize(rows, save_confidence)
    return pa.Table.from_pylist(rows, schema=_FLOW_SCHEMA)


def _cpu_row(row: dict[str, Any], built: list[tuple[str, BaseModel]], ctx: _Ctx) -> None:
    if row["q_reason"]:
        return
    timings = json.loads(row["timings"] or "{}")
    try:
        t0 = time.perf_counter()
        img = decode_image(row["image"])
        if img.shape[:2] != (row["height"], row["width"]):
            raise ValueError(f"decoded image is {img.shape[:2]}, the store says {(row['height'], row['width'])}")
        timings["decode"] = timings.get("decode", 0.0) + time.perf_counter() - t0
        st = _unpack(row["state"])
    except Exception as e:  # noqa: BLE001 - any per-image failure is quarantined
        _fail(row, "decode", e)
        return
    for name, params in built:
        t0 = time.perf_counter()
        try:
            _run_cpu_stage(name, params, row, img, st, ctx)
        except Exception as e:  # noqa: BLE001
            _fail(row, name, e)
            return
        timings[name] = time.perf_counter() - t0
    row["state"] = _pack(st)
    row["timings"] = json.dumps(timings)


def _finalize(rows: list[dict[str, Any]], save_confidence: bool) -> pa.Table:
    from PIL import Image

    out = []
    for row in rows:
        rec = {k: row[k] for k in ("image_id", "source", "shard", "timings", "q_stage", "q_reason")}
        rec["mask"] = rec["confidence"] = None
        if not row["q_reason"]:
            try:
                st = _unpack(row["state"])
                lab = st["label"]
                if lab.shape != (row["height"], row["width"]):
                    raise ValueError(f"label map is {lab.shape}, image is {(row['height'], row['width'])}")
                rec["mask"] = encode_mask(lab)
                if save_confidence and "conf" in st:
                    buf = io.BytesIO()
                    c8 = np.clip(np.rint(st["conf"] * 255.0), 0, 255).astype(np.uint8)
                    Image.fromarray(c8, mode="L").save(buf, format="PNG")
                    rec["confidence"] = buf.getvalue()
            except Exception as e:  # noqa: BLE001
                rec["q_stage"], rec["q_reason"] = "encode", f"{type(e).__name__}: {e}"
        out.append(rec)
    return pa.Table.from_pylist(out, schema=_OUT_SCHEMA)


class _ModelStage:
    """A model stage (``cam``, ``scores`` or ``lnet_map``) as a Ray Data callable class (one model per actor)."""

    def __init__(self, name: str, params: dict[str, Any], checkpoint: str | None, ctx: _Ctx, use_gpu: bool) -> None:
        import torch

        from raysemiseg.train.checkpoint import load_method

        self.name = name
        self.params = STAGES[name].params()(**params)
        self.ctx = ctx
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        checkpoint = getattr(self.params, "checkpoint", None) or checkpoint
        if not checkpoint:
            raise ValueError(f"model stage {name!r} has no checkpoint (pass --checkpoint or the stage's checkpoint)")
        self.method, _, _ = load_method(checkpoint, device=self.device)
        self._backbone = self.method.backbone if hasattr(self.method, "backbone") else None
        if name == "cam" and not hasattr(self.method, "cams"):
            raise ValueError(f"checkpoint {checkpoint} holds method {self.method.name!r}; the cam stage "
                             f"needs a 'cam_classifier' checkpoint")
        if name == "lnet_map":
            from raysemiseg.methods.lpnet.model import LNet

            if not isinstance(self.method, LNet):
                raise ValueError(f"checkpoint {checkpoint} holds method {self.method.name!r}, which has no L-Net; "
                                 f"the lnet_map stage needs an 'lnet' or 'lnet_pnet' checkpoint")
            self._backbone = self.method.lnet_backbone

    def _tensor(self, img: np.ndarray):
        import torch
        import torch.nn.functional as F

        from raysemiseg.models.backbones import normalize

        x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float().div_(255.0).to(self.device)
        s = float(self.params.input_scale)  # type: ignore[attr-defined]
        if s != 1.0:
            x = F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
        return normalize(x, self._backbone)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        for row in rows:
            self.run_row(row)
        return pa.Table.from_pylist(rows, schema=_FLOW_SCHEMA)

    def run_row(self, row: dict[str, Any]) -> None:
        import torch
        import torch.nn.functional as F

        if row["q_reason"]:
            return
        timings = json.loads(row["timings"] or "{}")
        t0 = time.perf_counter()
        try:
            img = decode_image(row["image"])
            h, w = img.shape[:2]
            st = _unpack(row["state"])
            fg = _fg_ids(row, self.ctx)
            bg = self.ctx.background_id
            with torch.inference_mode():
                x = self._tensor(img)
                if self.name == "cam":
                    cams = self.method.cams(x, [fg.tolist()], out_size=(h, w))[0].float().cpu().numpy()
                    st["cams"], st["fg_ids"] = cams, fg
                    score = np.concatenate([np.full((1, h, w), self.params.bg_score, np.float32), cams])  # type: ignore[attr-defined]
                    st["ids"] = np.r_[bg, fg].astype(np.int64)
                    st["probs"] = score / np.maximum(score.sum(axis=0, keepdims=True), 1e-8)
                    st["label"] = st["ids"][score.argmax(axis=0)]
                elif self.name == "lnet_map":
                    from raysemiseg.methods.lpnet.model import lnet_map

                    m = lnet_map(self.method, x)[:, None]                                     # (1, 1, h', w')
                    if m.shape[-2:] != (h, w):
                        m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
                    st["agnostic"] = m[0, 0].clamp(0, 1).cpu().numpy().astype(np.float32)
                else:
                    ids = np.r_[bg, fg].astype(np.int64)
                    rows_t = torch.as_tensor(ids, device=self.device)
                    low = self.method.logits(x) if hasattr(self.method, "logits") else self.method.predict(x)
                    sel = low[:, rows_t]                      # present rows only, before upsampling
                    sc = F.interpolate(sel.float(), size=(h, w), mode="bilinear", align_corners=False)[0]
                    st["scores"], st["ids"] = sc.cpu().numpy(), ids
        except Exception as e:  # noqa: BLE001
            _fail(row, self.name, e)
            return
        timings[self.name] = time.perf_counter() - t0
        row["state"] = _pack(st)
        row["timings"] = json.dumps(timings)


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


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_hash(checkpoint: str | None) -> str | None:
    """SHA-256 of a checkpoint's weights (``model.pt`` in a checkpoint directory, or the file)."""
    if checkpoint is None:
        return None
    p = Path(checkpoint)
    f = p / "model.pt" if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint}: no weights file {f}")
    return _sha256_file(f)


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("raysemiseg")
    except Exception:  # noqa: BLE001
        return "unknown"


def _provenance(recipe: Recipe, checkpoint: str | None, space: Any, store_path: Path) -> dict[str, Any]:
    own = recipe.stage_checkpoints()
    return {
        "recipe": recipe.name,
        "recipe_hash": recipe.digest(),
        "stages": [{"name": s.name, "params": s.build_params().model_dump(mode="json")} for s in recipe.stages],
        "checkpoint": str(checkpoint) if checkpoint else None,
        "checkpoint_sha256": checkpoint_hash(checkpoint) if recipe.needs_run_checkpoint else None,
        "stage_checkpoints": {n: {"path": c, "sha256": checkpoint_hash(c)} for n, c in sorted(own.items())},
        "package_version": _package_version(),
        "label_space": space.name,
        "image_store": str(store_path),
    }


def _groups(recipe: Recipe) -> list[tuple[str, list[tuple[str, dict[str, Any]]]]]:
    """Consecutive CPU stages fused; each model stage alone. [("cpu"|"model", [(name, params)])]."""
    out: list[tuple[str, list[tuple[str, dict[str, Any]]]]] = []
    for s in recipe.stages:
        kind = "model" if STAGES[s.name].model else "cpu"
        if kind == "cpu" and out and out[-1][0] == "cpu":
            out[-1][1].append((s.name, dict(s.params)))
        else:
            out.append((kind, [(s.name, dict(s.params))]))
    if out[-1][0] != "cpu":
        out.append(("cpu", []))  # finalize needs a CPU group
    return out


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


def _prepare_out(out: Path, recipe: Recipe, plan: ShardPlan, overwrite: bool) -> None:
    import shutil

    from raysemiseg.pseudolabel.store import MANIFEST

    if out.exists() and any(out.iterdir()):
        mf = out / MANIFEST
        if not mf.is_file():
            raise ValueError(f"--out {out} is a non-empty folder without {MANIFEST}; choose an empty or new folder")
        old = json.loads(mf.read_text())
        same = (old.get("recipe", {}).get("hash") == recipe.digest()
                and old.get("sharding", {}).get("fingerprint") == plan.fingerprint())
        if overwrite or not same:
            if not overwrite:
                raise ValueError(f"--out {out} holds labels of another recipe or store state "
                                 f"(recipe {old.get('recipe', {}).get('name')!r}); pass --overwrite to replace them")
            for sub in ("shards", "quarantine"):
                shutil.rmtree(out / sub, ignore_errors=True)
            mf.unlink()
    out.mkdir(parents=True, exist_ok=True)


def run_pipeline(recipe: Recipe, store_path: str | Path, out: str | Path, *, checkpoint: str | None = None,
                 overwrite: bool = False, num_cpus: int | None = None, progress: bool = True,
                 stage_checkpoints: dict[str, str] | None = None) -> RunResult:
    """Run ``recipe`` over the image store at ``store_path`` on Ray Data, writing the label store ``out``.

    Resumable: committed shards of an earlier run of the same recipe on the same rows are skipped.

    Args:
        recipe: a validated :class:`Recipe`.
        store_path: image store folder.
        out: label store folder (created).
        checkpoint: checkpoint directory for model stages (overrides ``recipe.checkpoint``).
        overwrite: replace an existing label store of another recipe / store state.
        num_cpus: CPUs of the local Ray instance when this call starts one (None = all).
        progress: tqdm bar over the rows.
        stage_checkpoints: ``{stage: checkpoint}`` for stages with their own checkpoint (e.g.
            ``{"lnet_map": LNET_DIR}``); overrides the recipe's stage parameter (and so enters the
            recipe hash and provenance).

    Returns:
        :class:`RunResult`.

    Raises:
        FileNotFoundError: store or checkpoint missing.
        ValueError: a model stage without checkpoint, a label space without background, ``out`` of
            another recipe (without ``overwrite``), or the rows-in = out + quarantined check failing.
    """
    import ray
    from ray.data import ActorPoolStrategy, DataContext
    from tqdm import tqdm

    from raysemiseg.data.store import open_store
    from raysemiseg.pseudolabel.store import clean_partial, committed_shards, write_manifest, write_shard

    t_start = time.perf_counter()
    recipe = recipe.with_stage_checkpoints(stage_checkpoints)
    store = open_store(store_path)
    space = store.label_space
    if space.background_id is None:
        raise ValueError(f"label space {space.name!r} has no background class; pseudo-label recipes need one")
    checkpoint = checkpoint or recipe.checkpoint
    if recipe.needs_run_checkpoint and not checkpoint:
        raise ValueError(f"recipe {recipe.name!r} has a model stage; pass --checkpoint CHECKPOINT_DIR")
    if recipe.needs_run_checkpoint:  # a checkpoint dir, a run folder (its newest) or a URI -> a local dir
        from raysemiseg.train.checkpoint import local_checkpoint

        checkpoint = str(local_checkpoint(checkpoint))
    out = Path(out)
    plan = plan_shards(store, recipe)
    _prepare_out(out, recipe, plan, overwrite)
    clean_partial(out)
    prov = _provenance(recipe, checkpoint, space, Path(store_path))
    prov_json = json.dumps(prov, sort_keys=True)
    done = committed_shards(out)
    pending = [k for k in range(len(plan.shards)) if k not in done]
    manifest = _manifest(out, recipe, plan, prov, space)
    old_mf = out / "manifest.json"
    if old_mf.is_file():  # keep the timings of earlier (resumed) runs
        manifest["timings"] = json.loads(old_mf.read_text()).get("timings", {})
    write_manifest(out, manifest)
    ctx = _Ctx(background_id=int(space.background_id), num_classes=space.num_classes)
    fault_after = int(os.environ.get(FAULT_ENV, "0") or 0)
    stage_sum: dict[str, float] = {}
    if pending:
        from raysemiseg.runtime import ensure_ray

        ensure_ray(num_cpus=num_cpus, log_to_driver=False)
        dctx = DataContext.get_current()
        old_bars = dctx.enable_progress_bars
        dctx.enable_progress_bars = False
        try:
            use_gpu = (recipe.gpus_per_model_actor or 0) > 0 or (
                recipe.gpus_per_model_actor is None and ray.cluster_resources().get("GPU", 0) > 0)
            gpus = (recipe.gpus_per_model_actor if recipe.gpus_per_model_actor is not None else 1.0) if use_gpu else 0
            cpus = float(ray.cluster_resources().get("CPU", 1.0))
            rpt = recipe.rows_per_task or auto_rows_per_task(recipe, sum(len(plan.shards[k]) for k in pending), cpus)
            items = task_items(plan, pending, rpt)
            ds = ray.data.from_items(items, override_num_blocks=len(items))
            read_kw = {"batch_size": 1, "batch_format": "pyarrow", "fn_kwargs": {"store_files": plan.files}}
            groups = _groups(recipe)
            ckpt_s = str(checkpoint) if checkpoint else None
            if recipe.execution == "chain" or (recipe.execution == "auto" and recipe.needs_model and not use_gpu):
                # one task per item runs read + every stage of the chain (models cached per worker
                # process): every CPU works on whole images and no image or state crosses processes
                ds = ds.map_batches(_chain_task, batch_size=1, batch_format="pyarrow", num_cpus=recipe.cpus_per_task,
                                    fn_kwargs={"groups": groups, "checkpoint": ckpt_s, "ctx": ctx,
                                               "save_confidence": recipe.save_confidence, "store_files": plan.files})
            else:
                ds = ds.map_batches(_read_chunks, num_cpus=recipe.cpus_per_task, **read_kw)
                for gi, (kind, stages) in enumerate(groups):
                    last = gi == len(groups) - 1
                    if kind == "cpu":
                        ds = ds.map_batches(_cpu_group, batch_size=recipe.batch_size, batch_format="pyarrow",
                                            num_cpus=recipe.cpus_per_task,
                                            fn_kwargs={"stages": stages, "ctx": ctx, "finalize": last,
                                                       "save_confidence": recipe.save_confidence})
                    else:
                        name, params = stages[0]
                        ds = ds.map_batches(_ModelStage, batch_size=recipe.batch_size, batch_format="pyarrow",
                                            compute=ActorPoolStrategy(size=recipe.model_actors),
                                            num_gpus=gpus, num_cpus=recipe.cpus_per_task,
                                            fn_constructor_kwargs={"name": name, "params": params,
                                                                   "checkpoint": ckpt_s, "ctx": ctx,
                                                                   "use_gpu": use_gpu})
            expected = {k: len(plan.shards[k]) for k in pending}
            buf: dict[int, list[dict[str, Any]]] = {k: [] for k in pending}
            committed = 0
            bar = tqdm(total=sum(expected.values()), desc=f"pseudolabel {recipe.name}", unit="img", disable=not progress)
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                for row in batch.to_pylist():
                    k = int(row["shard"])
                    buf[k].append(row)
                    bar.update(1)
                    for s, v in json.loads(row["timings"] or "{}").items():
                        stage_sum[s] = stage_sum.get(s, 0.0) + v
                    if len(buf[k]) == expected[k]:
                        _commit(out, k, buf.pop(k), plan, recipe, prov_json, write_shard)
                        committed += 1
                        manifest["shards"][str(k)] = True
                        write_manifest(out, manifest)
                        if fault_after and committed >= fault_after:
                            os.kill(os.getpid(), signal.SIGKILL)
            bar.close()
            if buf:
                raise RuntimeError(f"shards {sorted(buf)} did not receive all their rows")
        finally:
            dctx.enable_progress_bars = old_bars
    result = _finish(out, recipe, plan, manifest, stage_sum, len(done), len(pending), t_start)
    write_manifest(out, manifest)
    return result


def _commit(out: Path, k: int, rows: list[dict[str, Any]], plan: ShardPlan, recipe: Recipe, prov_json: str,
            write_shard: Callable[..., None]) -> None:
    order = {iid: i for i, iid in enumerate(plan.image_ids[k])}
    got = sorted(rows, key=lambda r: order[r["image_id"]])
    if [r["image_id"] for r in got] != plan.image_ids[k]:
        raise RuntimeError(f"shard {k}: rows {sorted(order)} expected, got {[r['image_id'] for r in rows]}")
    good = [r for r in got if not r["q_reason"]]
    bad = [r for r in got if r["q_reason"]]
    labels = pa.Table.from_pylist([{"image_id": r["image_id"], "recipe": recipe.name, "mask": r["mask"],
                                    "confidence": r["confidence"], "provenance": prov_json,
                                    "timings": r["timings"]} for r in good], schema=LABEL_STORE_SCHEMA)
    quar = pa.Table.from_pylist([{"image_id": r["image_id"], "source": r["source"] or "", "path": "",
                                  "stage": f"pseudolabel:{r['q_stage']}", "reason": r["q_reason"]} for r in bad],
                                schema=QUARANTINE_SCHEMA)
    write_shard(out, k, labels, quar)


def _manifest(out: Path, recipe: Recipe, plan: ShardPlan, prov: dict[str, Any], space: Any) -> dict[str, Any]:
    from raysemiseg.pseudolabel.store import LABEL_STORE_VERSION, committed_shards

    done = committed_shards(out)
    return {
        "schema_version": LABEL_STORE_VERSION,
        "recipe": {"name": recipe.name, "hash": recipe.digest(), "config": recipe.model_dump(mode="json")},
        "provenance": prov,
        "label_space": {"name": space.name, "num_classes": space.num_classes},
        "sharding": {"rows_per_shard": recipe.rows_per_shard, "num_shards": len(plan.shards),
                     "rows": plan.num_rows, "fingerprint": plan.fingerprint()},
        "shards": {str(k): (k in done) for k in range(len(plan.shards))},
        "complete": False,
    }


def _finish(out: Path, recipe: Recipe, plan: ShardPlan, manifest: dict[str, Any], stage_sum: dict[str, float],
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


# ------------------------------------------------------------------------------------------
# serial (one process, no Ray): the reference and the benchmark's baseline
def run_serial(recipe: Recipe, rows: Sequence[dict[str, Any]], background_id: int, num_classes: int, *,
               checkpoint: str | None = None, stage_checkpoints: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Run the recipe's stages over image-store rows in this process, one after the other.

    Args:
        recipe: the recipe.
        rows: image-store rows as dicts (``image_id, source, image, labels, boxes, height, width``).
        background_id, num_classes: of the store's label space.
        checkpoint: for model stages.
        stage_checkpoints: as in :func:`run_pipeline`.

    Returns:
        one dict per row: ``image_id``, ``mask`` (PNG bytes or None), ``confidence``, ``timings``
        (JSON), ``q_stage``, ``q_reason``.
    """
    ctx = _Ctx(background_id, num_classes)
    recipe = recipe.with_stage_checkpoints(stage_checkpoints)
    ckpt = checkpoint or recipe.checkpoint
    models = {}
    for kind, stages in _groups(recipe):
        if kind == "model":
            name, params = stages[0]
            models[name] = _ModelStage(name, params, str(ckpt) if ckpt else None, ctx, use_gpu=False)
    flow = [dict(r, shard=0, state=None, timings="{}", q_stage="", q_reason="") for r in rows]
    for kind, stages in _groups(recipe):
        if kind == "model":
            for r in flow:
                models[stages[0][0]].run_row(r)
        else:
            built = _stage_list(stages)
            for r in flow:
                _cpu_row(r, built, ctx)
    return _finalize(flow, recipe.save_confidence).to_pylist()

