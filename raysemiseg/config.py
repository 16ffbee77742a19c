"""Typed, validated run configuration: YAML in, YAML out, errors before any work starts.

One :class:`TrainConfig` describes a training run of any method. Unknown keys, wrong types and
unknown method/backbone names fail at load time, naming the key and the valid choices. Method
knobs live under ``method.params`` and are validated by the method's own ``Params`` model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are errors; instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(StrictModel):
    """Where rows come from and how they are augmented."""

    store: str = Field(description="image store directory (Parquet), see raysemiseg.data.store")
    split_file: str | None = Field(None, description="Parquet split file (image_id -> role); None = store's own split column")
    train_split: str = "train"
    val_split: str = "val"
    label_store: str | None = Field(None, description="pseudo-label store for weak rows (raysemiseg pseudolabel)")
    label_recipe: str | None = Field(None, description="recipe to use when the label store holds several")
    shuffle_buffer: int = Field(64, ge=0, description="worker-side local shuffle buffer, rows (0 = store order)")
    cache_rows: bool = Field(
        True, description="materialize the selected rows' encoded bytes once in the Ray object store (on the "
                          "cluster, never the driver; block order reshuffled every pass): for stores that fit in "
                          "it (it spills to disk beyond); False = stream them from Parquet every pass, file order "
                          "reshuffled (stores larger than the object store, e.g. ImageNet-21k)")
    local_read_mb: float = Field(
        256.0, ge=0.0, description="with cache_rows, a selection of rows up to this size (MB of encoded rows, "
                                   "estimated from the Parquet footers) is read by the driver in one pyarrow scan and "
                                   "put into the object store; larger ones are read by Ray Data tasks (0 = always)")
    broadcast_join_mb: float = Field(
        64.0, ge=0.0, description="split file + label store up to this size on disk (MB) are broadcast to the "
                                  "read tasks; larger ones are joined with Ray Data's hash join (0 = always)")
    augment_in: Literal["ray_data", "worker"] = Field(
        "ray_data", description="where the training rows are decoded and augmented (random rescale, crop, flip): "
                                "'ray_data' = Ray Data tasks on the cluster's CPUs, streamed to the workers (GPU "
                                "workers, CPU nodes beside them); 'worker' = in the Train worker itself, between its "
                                "steps (CPU-only training: the same s/step, no Ray Data map tasks to start per run "
                                "and pass; benchmarks/augment_in.py)")
    crop_size: int = Field(256, ge=32, description="square training crop side, pixels")
    scale_range: tuple[float, float] = (0.5, 1.5)
    flip: bool = True
    batch_size: int = Field(8, ge=1, description="rows per worker per step")
    strong_fraction: float | None = Field(
        None, ge=0.0, le=1.0,
        description="fixed fraction of strong rows per mini-batch (WSSL Sec. 3.4, dual-branch k/2k); None = as sampled")
    val_size: int | None = Field(None, ge=32, description="resize val images' long side (None = as stored)")
    max_train_rows: int | None = Field(None, ge=1, description="cap on train rows (smoke runs)")
    max_val_rows: int | None = Field(None, ge=1)


class ModelConfig(StrictModel):
    backbone: str = "efficientnet_lite0"
    pretrained: bool = True
    weights_path: str | None = Field(None, description="explicit backbone weights file (torch.load weights_only)")
    output_stride: Literal[8, 16, 32] = 8
    freeze_bn: bool = Field(
        False, description="backbone BatchNorm in eval mode with fixed affine parameters (small CPU batches want it)")
    freeze_at: int = Field(
        0, ge=0, description="freeze the backbone's first N stages, stem = 1 (eval mode, no gradient; Detectron's "
                             "FREEZE_AT); 0 = train every stage")

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, v: str) -> str:
        from raysemiseg.models.backbones import BACKBONES

        if v not in BACKBONES:
            raise ValueError(f"unknown backbone {v!r}; valid: {sorted(BACKBONES)}")
        return v


class MethodConfig(StrictModel):
    name: str = "strong_only"
    stage: str = "default"
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _valid_params(self) -> "MethodConfig":
        from raysemiseg.methods.base import get_method

        try:
            cls = get_method(self.name)
        except KeyError as e:
            raise ValueError(str(e.args[0])) from None
        try:
            cls.Params(**self.params)
        except ValidationError as e:
            raise ValueError(f"method {self.name!r} params: {e}") from None
        return self

    def build_params(self):
        """The method's validated ``Params`` instance."""
        from raysemiseg.methods.base import get_method

        return get_method(self.name).Params(**self.params)


class OptimConfig(StrictModel):
    optimizer: Literal["sgd", "adam", "adamw"] = Field(
        "sgd", description="sgd (momentum, coupled L2) | adam (coupled L2) | adamw (decoupled weight decay)")
    lr: float = Field(1e-3, gt=0)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    epochs: int = Field(4, ge=1)
    steps_per_epoch: int | None = Field(None, ge=1, description="None = one pass over the train rows")
    amp: bool = Field(True, description="mixed precision (GPU only; ignored on CPU)")
    grad_clip: float | None = None


class ScalingConfig(StrictModel):
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement of the worker group (SPREAD = one worker per node when possible)")
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="extra custom Ray resources per worker, e.g. {worker_node: 1}")


class RunConfig(StrictModel):
    name: str = "run"
    storage_path: str = "runs"
    num_to_keep: int = Field(2, ge=1)
    checkpoint_select: Literal["auto", "best", "latest"] = Field(
        "auto", description="checkpoint a run hands on and is evaluated with: best val mIoU, the latest, or auto "
                            "(latest for a method's auxiliary stages, else best). Per-epoch validation scores the "
                            "val split, so 'best' selects on it: experiments that report on val use 'latest'")
    max_failures: int = Field(2, ge=0)
    seed: int = 0
    inject_fault_at_step: int | None = Field(
        None, ge=1, description="TEST ONLY: rank 0 exits (os._exit) at this global step on the run's first attempt")


class TrackingConfig(StrictModel):
    tracking_uri: str | None = Field(None, description="None = $MLFLOW_TRACKING_URI, else sqlite:///<run.storage_path>/mlflow.db")
    experiment: str = "raysemiseg"
    enabled: bool = True


class EvalConfig(StrictModel):
    crf: bool = False
    num_overlays: int = Field(6, ge=0)


class TrainConfig(StrictModel):
    """A complete training run (``raysemiseg train CONFIG.yaml``)."""

    label_space: str = "voc21"
    data: DataConfig
    model: ModelConfig = ModelConfig()
    method: MethodConfig = MethodConfig()
    optim: OptimConfig = OptimConfig()
    scaling: ScalingConfig = ScalingConfig()
    run: RunConfig = RunConfig()
    tracking: TrackingConfig = TrackingConfig()
    eval: EvalConfig = EvalConfig()

    @field_validator("label_space")
    @classmethod
    def _known_space(cls, v: str) -> str:
        from raysemiseg.labels import BUILTIN_NAMES

        if v not in BUILTIN_NAMES and not Path(v).is_file():
            raise ValueError(f"label_space {v!r} is neither a built-in {list(BUILTIN_NAMES)} nor a YAML file")
        return v


class ConfigError(ValueError):
    """A config file failed validation; the message names the file, the key and the choices."""


def _format(e: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid config"]
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "<root>"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def load_config(path_or_dict: str | Path | dict, model: type[StrictModel] = TrainConfig,
                overrides: dict[str, Any] | None = None) -> Any:
    """Load and validate a config.

    Args:
        path_or_dict: YAML file path or an already-parsed dict.
        model: the config class (default :class:`TrainConfig`).
        overrides: dotted-key overrides applied before validation, e.g. ``{"optim.lr": 0.01}``.

    Raises:
        ConfigError: naming the file, each offending key and the reason (unknown key, wrong type,
            unknown method/backbone with the valid names).
        FileNotFoundError: the file does not exist.
    """
    if isinstance(path_or_dict, dict):
        raw, source = dict(path_or_dict), "<dict>"
    else:
        p = Path(path_or_dict)
        if not p.is_file():
            raise FileNotFoundError(f"config file {p} does not exist")
        raw, source = yaml.safe_load(p.read_text()) or {}, str(p)
    for key, value in (overrides or {}).items():
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format(e, source)) from None


def dotted(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested and dotted mappings as flat dotted keys: ``{"optim": {"lr": 1}, "run.seed": 0}
    -> {"optim.lr": 1, "run.seed": 0}`` (an empty mapping stays a value). The override form of
    :func:`load_config`, and MLflow's flat params."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(dotted(v, key + "."))
        else:
            out[key] = v
    return out


def dump_config(cfg: BaseModel, path: str | Path | None = None) -> str:
    """YAML text of ``cfg`` (round-trips through :func:`load_config`); written to ``path`` if given."""
    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    if path is not None:
        Path(path).write_text(text)
    return text
