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

from raysemiseg.pseudolabel.engine import (  # noqa: F401
    MapOp,
    RunResult,
    ShardPlan,
    _Writer,
    plan_ops,
    plan_shards,
    run_pipeline,
)
from raysemiseg.pseudolabel.recipe import (  # noqa: F401
    STAGES,
    LNetMapStageParams,
    Recipe,
    StageSpec,
    _groups,
    checkpoint_hash,
    load_recipe,
    recipe_cpu_need,
    resolve_stage_checkpoints,
)
from raysemiseg.pseudolabel.stages import (  # noqa: F401
    _Ctx,
    _fg_ids,
    _ModelStage,
    _run_cpu_stage,
    _unpack,
    run_serial,
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
    "recipe_cpu_need",
    "resolve_stage_checkpoints",
    "run_pipeline",
    "run_serial",
]
