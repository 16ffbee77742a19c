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
present. Placement (:func:`plan_ops`; resources come from the recipe, never from what the
cluster holds at start, since an autoscaling cluster starts without GPU nodes):

- ``staged`` (``execution: auto`` with ``gpus_per_model_actor > 0``, and recipes without a model
  stage): a read task, then each model stage as its own autoscaling actor pool
  (``model_actors = [min, max]`` actors, ``gpus_per_model_actor`` GPUs each) and consecutive CPU
  stages fused into one task (``cpus_per_task`` CPUs each); the last task writes the shard;
- ``chain`` (``execution: auto`` with model stages on CPU): the whole chain (read, model stages,
  CPU stages, write) runs in one task per shard, each model loaded once per Ray worker process
  and cached there (keyed by the weights' SHA-256), so every core works on whole images.

A model stage's ``device: auto`` means cuda when Ray gave its actor/task a GPU
(``ray.get_gpu_ids()``), else cpu. SLIC + diffusion + CRF of one image always run back to back in
one process. Every per-image stage works on the image's present labels only (P rows), never on
the whole label space.

Sharding, writing and resume (see :mod:`raysemiseg.pseudolabel.store`): the selected rows of the
image store, in store order, are cut into shards of ``rows_per_shard`` consecutive rows: the unit
of work, of commit and of resume. A shard travels through Ray Data as **one row** (its image rows
as Arrow IPC bytes), so no operator ever holds part of a shard; the worker that finishes a shard
encodes and writes it atomically and returns only its counts, so the driver's work per shard is
O(1) and no label bytes reach it. The manifest is written at the start and the end of a run only.

The resume key (in the manifest) is the recipe's :meth:`Recipe.digest`, the planned rows'
fingerprint and the SHA-256 of every checkpoint a model stage loads (run folders resolved to their
newest checkpoint first). A rerun with the same key keeps every committed shard and runs the rest,
so a run killed part-way and rerun ends with exactly the rows of an uninterrupted run. A rerun
with another key is refused, or with ``overwrite`` starts from an empty store: labels of two models
are never mixed.

Errors: only data errors of a row (:class:`~raysemiseg.data.validate.RowError`: undecodable image,
size mismatch, ids outside the label space, missing or malformed boxes) send it to quarantine,
with the stage and the reason; rows in = rows out + quarantined, per shard and in total. Any other
exception (``RuntimeError``, ``torch.cuda.OutOfMemoryError``, a bug) fails the Ray task: Ray
retries system failures, the run raises, no shard holding the row is committed and the manifest
stays incomplete; a rerun resumes.

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

from raysemiseg.data.validate import RowError
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
    "MapOp",
    "Recipe",
    "RunResult",
    "StageSpec",
    "checkpoint_hash",
    "load_recipe",
    "plan_ops",
    "plan_shards",
    "resolve_stage_checkpoints",
    "run_pipeline",
    "run_serial",
]


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
        batch_size: images a model stage runs per call (reserved; stages run one image at a time).
        model_actors: the autoscaling actor pool of each model stage when the stages run
            ``staged``: ``[min, max]`` actors (Ray Data ``ActorPoolStrategy(min_size, max_size)``),
            or one int for a fixed size. The pool asks for ``gpus_per_model_actor`` GPUs per actor,
            so on an autoscaling cluster it brings up GPU nodes up to ``max``.
        execution: ``chain``: one Ray Data task per shard reads the rows, runs every stage of the
            recipe (models cached per worker process) and writes the shard, so images never cross
            processes; ``staged``: a read task, then one operator per fused group of CPU stages
            (tasks) and per model stage (an actor pool of ``model_actors`` actors with
            ``gpus_per_model_actor`` GPUs each), the last one writing the shard; ``auto``: chain
            for a recipe whose model stages run on CPU (``gpus_per_model_actor: 0``: a CPU model
            actor would hold a core while the CPU stages wait; cam_diffusion_crf on 2 cores ran
            1.88x serial chained vs 1.15x staged), else staged (bbox_seg: 1.54x staged vs 1.35x
            chained in the same run, ``benchmarks/pseudolabel_throughput.py``). Same output either
            way (not part of :meth:`digest`).
        gpus_per_model_actor: GPUs each model actor (staged) or each chain task (chain, recipes
            with model stages) asks Ray for. Decided by the recipe, never by the resources the
            cluster has at start (an autoscaling cluster starts with none): 0 = CPU.
        device: where a model stage runs: ``auto`` = ``cuda`` when Ray gave the actor/task a GPU
            (``ray.get_gpu_ids()`` inside it), else ``cpu``; ``cpu``; ``cuda`` (fails without one).
        cpus_per_task: CPUs reserved by each CPU-stage task (and each model actor).
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
    model_actors: int | tuple[int, int] = (1, 4)
    execution: Literal["auto", "chain", "staged"] = "auto"
    gpus_per_model_actor: float = Field(0.0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
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
        lo, hi = self.actor_pool
        if not 1 <= lo <= hi:
            raise ValueError(f"model_actors must be N >= 1 or [min, max] with 1 <= min <= max, got {self.model_actors}")
        return self

    @property
    def actor_pool(self) -> tuple[int, int]:
        """``(min, max)`` actors of each model stage's pool (``model_actors``)."""
        m = self.model_actors
        return (m, m) if isinstance(m, int) else (int(m[0]), int(m[1]))

    @property
    def staged(self) -> bool:
        """Whether the run uses the staged graph (see ``execution``)."""
        if self.execution != "auto":
            return self.execution == "staged"
        return not self.needs_model or self.gpus_per_model_actor > 0

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
    ("height", pa.int32()), ("width", pa.int32()),
    ("state", pa.binary()), ("timings", pa.string()), ("q_stage", pa.string()), ("q_reason", pa.string()),
])
#: what flows between Ray Data operators: one row per shard (a shard is never split across blocks,
#: so the operator that finishes it holds all its rows and writes it)
_SHARD_SCHEMA = pa.schema([("shard", pa.int64()), ("image_ids", pa.list_(pa.string())), ("rows", pa.large_binary())])
#: what the last operator returns to the driver per committed shard: counts only
_DONE_SCHEMA = pa.schema([("shard", pa.int64()), ("written", pa.int64()), ("quarantined", pa.int64()),
                          ("timings", pa.string())])
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


def _rows_to_bytes(rows: list[dict[str, Any]]) -> bytes:
    """A shard's flow rows -> Arrow IPC bytes (one cell of ``_SHARD_SCHEMA.rows``)."""
    sink = pa.BufferOutputStream()
    t = pa.Table.from_pylist(rows, schema=_FLOW_SCHEMA)
    with pa.ipc.new_stream(sink, t.schema) as w:
        w.write_table(t)
    return sink.getvalue().to_pybytes()


def _rows_from_bytes(data: bytes) -> list[dict[str, Any]]:
    with pa.ipc.open_stream(pa.py_buffer(data)) as r:
        return r.read_all().to_pylist()


@dataclass
class _Ctx:
    """What every stage of a run knows about the label space: background id and size."""

    background_id: int
    num_classes: int


def _fg_ids(row: dict[str, Any], ctx: _Ctx) -> np.ndarray:
    """Sorted foreground ids of the row's image-level labels.

    Raises:
        RowError: an id outside the label space (data error: the row is quarantined).
    """
    ids = np.asarray(sorted(set(row["labels"] or [])), dtype=np.int64)
    ids = ids[ids != ctx.background_id]
    if ids.size and (ids.min() < 0 or ids.max() >= ctx.num_classes):
        raise RowError(f"class id outside label space: image-level label ids {ids.tolist()} outside "
                       f"0..{ctx.num_classes - 1}")
    return ids


def _check_boxes(row: dict[str, Any]) -> None:
    """Raises RowError (data error) when the row's boxes are malformed."""
    from raysemiseg.pseudolabel.bbox import boxes_array

    try:
        boxes_array(row["boxes"])
    except (ValueError, TypeError) as e:
        raise RowError(f"corrupt boxes: {e}") from None


def _decode_row(row: dict[str, Any]) -> np.ndarray:
    """The row's image as (H, W, 3) uint8.

    Raises:
        RowError: undecodable bytes ("corrupt image") or a size other than the store's ("size mismatch").
    """
    from PIL import Image

    try:
        img = decode_image(row["image"])
    except (OSError, ValueError, SyntaxError, EOFError, TypeError, Image.DecompressionBombError) as e:
        raise RowError(f"corrupt image: {type(e).__name__}: {e}") from None
    if img.shape[:2] != (row["height"], row["width"]):
        raise RowError(f"size mismatch: decoded image is {img.shape[:2]}, the store says "
                       f"{(row['height'], row['width'])}")
    return img


def _softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=0, keepdims=True)
    e = np.exp(x - m)
    return (e / e.sum(axis=0, keepdims=True)).astype(np.float32)


def _box_class_regions(row: dict[str, Any], ids: np.ndarray, h: int, w: int) -> np.ndarray:
    """(P, H, W) bool: row r is inside the image's boxes of class ids[r]."""
    from raysemiseg.pseudolabel.bbox import _pixel_rect, boxes_array

    _check_boxes(row)
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
    """Apply one CPU stage to one image, updating its state in place.

    Raises:
        RowError: a data problem of this row (no boxes, malformed boxes, ids outside the space).
        anything else: a bug or a runtime failure (the run fails; never quarantined).
    """
    h, w = int(row["height"]), int(row["width"])
    bg = ctx.background_id
    if name in ("bbox_rect", "bbox_seg"):
        from raysemiseg.pseudolabel.bbox import bbox_rect, bbox_seg

        if not row["boxes"] and _fg_ids(row, ctx).size:
            raise RowError(f"missing boxes: image has labels {list(row['labels'])} but no boxes; box recipes "
                           f"need boxes (select supervision: [box] or [pixel, box] rows)")
        _check_boxes(row)
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


def _fail(row: dict[str, Any], stage: str, err: RowError) -> None:
    row["q_stage"] = stage
    row["q_reason"] = err.reason
    row["state"] = None


def _stage_list(stages: Sequence[tuple[str, dict[str, Any]]]) -> list[tuple[str, BaseModel]]:
    return [(n, STAGES[n].params()(**p)) for n, p in stages]


def _step_row(row: dict[str, Any], stages: Sequence[tuple[str, Callable[..., None]]]) -> None:
    """The one per-image skeleton of every step: skip a quarantined row, decode, run ``stages``
    (``fn(row, img, state)`` each, timed), pack the state.

    Only :class:`~raysemiseg.data.validate.RowError` (a data problem of this row) quarantines the
    row, naming the stage; any other exception (``RuntimeError``, ``torch.cuda.OutOfMemoryError``, a
    bug) propagates, so the Ray task fails and no shard holding the row is committed.
    """
    if row["q_reason"]:
        return
    timings = json.loads(row["timings"] or "{}")
    stage = "decode"
    try:
        t0 = time.perf_counter()
        img = _decode_row(row)
        timings["decode"] = timings.get("decode", 0.0) + time.perf_counter() - t0
        st = _unpack(row["state"])
        for stage, fn in stages:
            t0 = time.perf_counter()
            fn(row, img, st)
            timings[stage] = time.perf_counter() - t0
    except RowError as e:
        _fail(row, stage, e)
        return
    row["state"] = _pack(st)
    row["timings"] = json.dumps(timings)


def _cpu_row(row: dict[str, Any], built: list[tuple[str, BaseModel]], ctx: _Ctx) -> None:
    """Run a fused group of CPU stages on one row (see :func:`_step_row`)."""
    _step_row(row, [(name, functools.partial(_cpu_fn, name, params, ctx)) for name, params in built])


def _cpu_fn(name: str, params: BaseModel, ctx: _Ctx, row: dict[str, Any], img: np.ndarray,
            st: dict[str, np.ndarray]) -> None:
    _run_cpu_stage(name, params, row, img, st, ctx)


def _finalize(rows: list[dict[str, Any]], save_confidence: bool) -> list[dict[str, Any]]:
    """Encode each row's label (PNG) and confidence (8-bit PNG).

    Returns:
        ``[{image_id, source, mask, confidence, timings, q_stage, q_reason}]`` in row order.

    Raises:
        RuntimeError: a stage gave a label map of another size than the image (a bug, not data).
    """
    from PIL import Image

    out = []
    for row in rows:
        rec = {k: row[k] for k in ("image_id", "source", "timings", "q_stage", "q_reason")}
        rec["mask"] = rec["confidence"] = None
        if not row["q_reason"]:
            st = _unpack(row["state"])
            lab = st["label"]
            if lab.shape != (row["height"], row["width"]):
                raise RuntimeError(f"image {row['image_id']}: label map is {lab.shape}, image is "
                                   f"{(row['height'], row['width'])}")
            rec["mask"] = encode_mask(lab)
            if save_confidence and "conf" in st:
                buf = io.BytesIO()
                c8 = np.clip(np.rint(st["conf"] * 255.0), 0, 255).astype(np.uint8)
                Image.fromarray(c8, mode="L").save(buf, format="PNG")
                rec["confidence"] = buf.getvalue()
        out.append(rec)
    return out


def _stage_device(device: str):
    """The torch device of a model stage: ``auto`` = cuda when Ray gave this actor/task a GPU."""
    import torch

    if device == "auto":
        gpus: list[Any] = []
        try:
            import ray

            if ray.is_initialized():
                gpus = list(ray.get_gpu_ids())
        except Exception:  # noqa: BLE001 - not inside Ray
            gpus = []
        device = "cuda" if gpus and torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda, but torch sees no CUDA device here")
    return torch.device(device)


class _ModelStage:
    """A model stage (``cam``, ``scores`` or ``lnet_map``): one model, built once per actor / worker.

    Args:
        name: the stage.
        params: its parameters.
        checkpoint: the checkpoint directory this stage loads (the resolved one of the run); None =
            the stage's own ``checkpoint`` parameter.
        ctx: label-space facts.
        device: ``auto`` (cuda when Ray gave this process a GPU), ``cpu`` or ``cuda``.
        use_gpu: deprecated alias: True = ``cuda``, False = ``cpu``.

    Raises:
        ValueError: no checkpoint, or a checkpoint of the wrong method for the stage.
    """

    def __init__(self, name: str, params: dict[str, Any], checkpoint: str | None, ctx: _Ctx,
                 use_gpu: bool | None = None, device: str = "auto") -> None:
        from raysemiseg.train.checkpoint import load_method, resolve_checkpoint

        if use_gpu is not None:
            device = "cuda" if use_gpu else "cpu"
        self.name = name
        self.params = STAGES[name].params()(**params)
        self.ctx = ctx
        self.device = _stage_device(device)
        checkpoint = getattr(self.params, "checkpoint", None) or checkpoint
        if not checkpoint:
            raise ValueError(f"model stage {name!r} has no checkpoint (pass --checkpoint or the stage's checkpoint)")
        checkpoint = str(resolve_checkpoint(checkpoint))
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
        """Ray Data actor call: shard records (``_SHARD_SCHEMA``) in, the same shards out."""
        return _map_shards(batch, lambda rows: [self.run_row(r) for r in rows])

    def run_row(self, row: dict[str, Any]) -> None:
        """Run the model on one row (see :func:`_step_row`: only data errors quarantine)."""
        _step_row(row, [(self.name, self._infer)])

    def _infer(self, row: dict[str, Any], img: np.ndarray, st: dict[str, np.ndarray]) -> None:
        import torch
        import torch.nn.functional as F

        h, w = img.shape[:2]
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


# ------------------------------------------------------------------------------------------
# one executor of a recipe's steps (serial, chain and staged all run these)
Step = tuple[str, Any]       # ("model", _ModelStage) | ("cpu", [(name, params model)])


def _run_rows(rows: list[dict[str, Any]], steps: Sequence[Step], ctx: _Ctx) -> None:
    """Run ``steps`` in order on every row, in place (quarantined rows are skipped by later steps)."""
    for row in rows:
        for kind, step in steps:
            if kind == "model":
                step.run_row(row)
            else:
                _cpu_row(row, step, ctx)


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
        out.append(("cpu", []))  # the writer is a CPU group
    return out


@functools.lru_cache(maxsize=4)
def _cached_model_stage(name: str, params_json: str, checkpoint: str, sha256: str, background_id: int,
                        num_classes: int, device: str) -> _ModelStage:
    """A model stage built once per worker process and reused by later tasks (and later runs on
    the same cluster); keyed by the weights' SHA-256, so a checkpoint rewritten in place reloads."""
    return _ModelStage(name, json.loads(params_json), checkpoint, _Ctx(background_id, num_classes), device=device)


def _model_args(name: str, params: dict[str, Any], ckpts: dict[str, dict[str, str]]) -> tuple[dict[str, Any], str]:
    """``(params, checkpoint)`` for a model stage, both naming the resolved checkpoint that was hashed."""
    path = ckpts[name]["path"]
    if "checkpoint" in STAGES[name].params().model_fields:
        params = {**params, "checkpoint": path}
    return params, path


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


def _map_shards(batch: pa.Table, fn: Callable[[list[dict[str, Any]]], Any]) -> pa.Table:
    recs = []
    for rec in batch.to_pylist():
        rows = _rows_from_bytes(rec["rows"])
        fn(rows)
        recs.append({**rec, "rows": _rows_to_bytes(rows)})
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


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_hash(checkpoint: str | Path | None) -> str | None:
    """SHA-256 (hex) of a checkpoint's weights: ``model.pt`` of the concrete checkpoint that
    :func:`raysemiseg.train.checkpoint.resolve_checkpoint` finds (a run folder -> its newest one).

    Raises:
        FileNotFoundError: no checkpoint there.
    """
    if checkpoint is None:
        return None
    from raysemiseg.train.checkpoint import MODEL_FILE, resolve_checkpoint

    return _sha256_file(resolve_checkpoint(checkpoint) / MODEL_FILE)


def resolve_stage_checkpoints(recipe: Recipe, checkpoint: str | Path | None) -> dict[str, dict[str, str]]:
    """The concrete checkpoint each model stage loads, with the SHA-256 of its weights.

    A stage's own ``checkpoint`` parameter wins, else the run's ``checkpoint``; run folders resolve
    to their newest checkpoint (:func:`raysemiseg.train.checkpoint.resolve_checkpoint`, the one rule).
    This is part of the label store's resume key: another model = other labels.

    Returns:
        ``{stage name: {"path": absolute checkpoint directory, "sha256": hex of model.pt}}``.

    Raises:
        ValueError: a model stage without any checkpoint (names ``--checkpoint``).
        FileNotFoundError: a path that holds no checkpoint.
    """
    from raysemiseg.train.checkpoint import MODEL_FILE, resolve_checkpoint

    out: dict[str, dict[str, str]] = {}
    shas: dict[str, str] = {}
    for s in recipe.stages:
        if not STAGES[s.name].model:
            continue
        ck = s.params.get("checkpoint") or checkpoint
        if not ck:
            raise ValueError(f"recipe {recipe.name!r}: model stage {s.name!r} has no checkpoint; pass "
                             f"--checkpoint CHECKPOINT_DIR")
        path = str(resolve_checkpoint(Path(ck).absolute()))
        if path not in shas:
            shas[path] = _sha256_file(Path(path) / MODEL_FILE)
        out[s.name] = {"path": path, "sha256": shas[path]}
    return out


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

        ensure_ray(num_cpus=num_cpus, log_to_driver=False)
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


# ------------------------------------------------------------------------------------------
# serial (one process, no Ray): the reference and the benchmark's baseline
def run_serial(recipe: Recipe, rows: Sequence[dict[str, Any]], background_id: int, num_classes: int, *,
               checkpoint: str | None = None, stage_checkpoints: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Run the recipe's stages over image-store rows in this process (the same steps as the Ray runs).

    Args:
        recipe: the recipe.
        rows: image-store rows as dicts (``image_id, source, image, labels, boxes, height, width``).
        background_id, num_classes: of the store's label space.
        checkpoint: for model stages (a checkpoint directory or a run folder).
        stage_checkpoints: as in :func:`run_pipeline`.

    Returns:
        one dict per row: ``image_id``, ``mask`` (PNG bytes or None), ``confidence``, ``timings``
        (JSON), ``q_stage``, ``q_reason``.

    Raises:
        Exception: a stage's runtime error (only data errors quarantine a row).
    """
    ctx = _Ctx(background_id, num_classes)
    recipe = recipe.with_stage_checkpoints(stage_checkpoints)
    ckpts = resolve_stage_checkpoints(recipe, checkpoint or recipe.checkpoint)
    steps: list[Step] = []
    for kind, stages in _groups(recipe):
        if kind == "model":
            name, params = stages[0]
            params, path = _model_args(name, params, ckpts)
            steps.append(("model", _ModelStage(name, params, path, ctx, device=recipe.device)))
        elif stages:
            steps.append(("cpu", _stage_list(stages)))
    cols = ("image_id", "source", "image", "labels", "boxes", "height", "width")
    flow = [dict({c: r.get(c) for c in cols}, state=None, timings="{}", q_stage="", q_reason="") for r in rows]
    _run_rows(flow, steps, ctx)
    return _finalize(flow, recipe.save_confidence)
