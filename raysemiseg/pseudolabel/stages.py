"""Per-image stage logic: one row's state through CAM / L-Net / scores models and the CPU stages
(pure functions of :mod:`raysemiseg.pseudolabel`), the one executor of a recipe's steps
(:func:`_run_rows`, used by the serial, chain and staged runs), and the serial reference
:func:`run_serial`. Only :class:`~raysemiseg.data.validate.RowError` quarantines a row.
"""

from __future__ import annotations

import functools
import io
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import BaseModel

from raysemiseg.data.schema import BOX_TYPE, decode_image, encode_mask
from raysemiseg.data.validate import RowError
from raysemiseg.pseudolabel.recipe import STAGES, Recipe, _groups, resolve_stage_checkpoints

__all__ = ["run_serial"]


_FLOW_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("source", pa.string()), ("image", pa.binary()),
    ("labels", pa.list_(pa.int32())), ("boxes", pa.list_(BOX_TYPE)),
    ("height", pa.int32()), ("width", pa.int32()),
    ("state", pa.binary()), ("timings", pa.string()), ("q_stage", pa.string()), ("q_reason", pa.string()),
])
#: what flows between Ray Data operators: one row per shard (a shard is never split across blocks,
#: so the operator that finishes it holds all its rows and writes it)
_SHARD_SCHEMA = pa.schema([("shard", pa.int64()), ("image_ids", pa.list_(pa.string())), ("rows", pa.large_binary())])
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


def _model_args(name: str, params: dict[str, Any], ckpts: dict[str, dict[str, str]]) -> tuple[dict[str, Any], str]:
    """``(params, checkpoint)`` for a model stage, both naming the resolved checkpoint that was hashed."""
    path = ckpts[name]["path"]
    if "checkpoint" in STAGES[name].params().model_fields:
        params = {**params, "checkpoint": path}
    return params, path


def _map_shards(batch: pa.Table, fn: Callable[[list[dict[str, Any]]], Any]) -> pa.Table:
    """Apply ``fn`` to the rows of each shard record (``_SHARD_SCHEMA``), in place, and re-pack them."""
    recs = []
    for rec in batch.to_pylist():
        rows = _rows_from_bytes(rec["rows"])
        fn(rows)
        recs.append({**rec, "rows": _rows_to_bytes(rows)})
    return pa.Table.from_pylist(recs, schema=_SHARD_SCHEMA)


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
