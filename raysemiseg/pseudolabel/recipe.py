"""Pseudo-label recipes: the schema (:class:`Recipe`), the stage registry (:data:`STAGES`), and the
checkpoints a recipe's model stages load (resolved and hashed: part of a label store's resume key).

See :mod:`raysemiseg.pseudolabel.pipeline` for the stages and how a recipe runs.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from raysemiseg.runtime import CpuNeed

__all__ = ["STAGES", "CamStageParams", "LNetMapStageParams", "NoParams", "Recipe", "ScoresStageParams", "StageDef",
           "StageSpec", "checkpoint_hash", "load_recipe", "resolve_stage_checkpoints"]


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
    from raysemiseg.storage import is_uri
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
        path = str(resolve_checkpoint(ck if is_uri(str(ck)) else Path(ck).absolute()))  # a URI -> a local copy
        if path not in shas:
            shas[path] = _sha256_file(Path(path) / MODEL_FILE)
        out[s.name] = {"path": path, "sha256": shas[path]}
    return out


def recipe_cpu_need(recipe: Recipe) -> CpuNeed:
    """Logical CPUs a run of ``recipe`` needs at once: one task or model actor of
    ``cpus_per_task`` CPUs must fit on a node, or the pipeline waits forever."""
    return CpuNeed(held=0.0, data=recipe.cpus_per_task, per_node=recipe.cpus_per_task,
                   what=f"pseudo-label recipe {recipe.name!r}", knobs="the recipe's cpus_per_task")
