"""The one MLflow adapter: every MLflow call of raysemiseg goes through this module.

Logging happens on the driver (run start, params, resolved config, eval tables and figures,
checkpoint location) and on the Ray Train controller (per-epoch metrics, through
:class:`MLflowCallback`, a ``ray.train.UserCallback`` that sees the rank-0 report); never on the
training workers.

Tracking store, in order: ``tracking.tracking_uri`` from the config, ``$MLFLOW_TRACKING_URI``,
else an embedded SQLite store ``sqlite:///<run.storage_path>/mlflow.db`` with artifacts in
``<run.storage_path>/mlartifacts`` (MLflow 3.x refuses the old ``./mlruns`` file store unless
``MLFLOW_ALLOW_FILE_STORE`` is set; SQLite needs no server). Open it with
``mlflow ui --backend-store-uri sqlite:///<run.storage_path>/mlflow.db``.

Resume: the MLflow run is keyed by the tag ``raysemiseg.run_key`` (the absolute run folder), so
rerunning the same ``run.name`` continues the same MLflow run.

Failures: a metric the controller callback cannot log is an error (the Train run fails with it,
``ray.train.ControllerError``), never a warning: a curve with silently missing epochs is worse
than a failed run. One writer per host: a Tune sweep on a cluster spanning several hosts needs an
MLflow server (:func:`raysemiseg.storage.check_tracking_store`), since its trials log from
whichever node they run on and SQLite cannot take writers from several hosts.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RUN_KEY_TAG = "raysemiseg.run_key"


def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def resolve_tracking_uri(tracking_uri: str | None, storage_path: str) -> tuple[str, str | None]:
    """(tracking URI, artifact location for new experiments or None = the server's default).

    Order: explicit ``tracking_uri``; ``$MLFLOW_TRACKING_URI``; embedded SQLite under
    ``storage_path`` (local paths only; a remote ``storage_path`` needs a tracking server).
    """
    if tracking_uri:
        return tracking_uri, None
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env, None
    if "://" in storage_path and not storage_path.startswith("file://"):
        raise ValueError(f"run.storage_path {storage_path!r} is remote: set tracking.tracking_uri or "
                         "MLFLOW_TRACKING_URI to an MLflow server")
    root = Path(storage_path.removeprefix("file://")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}", (root / "mlartifacts").as_uri()


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}} -> {"a.b": "1"}`` (MLflow params are strings; values cut to 500 chars)."""
    from raysemiseg.config import dotted

    return {k: str(v)[:500] for k, v in dotted(d, prefix).items()}


def _finite_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if v == v and abs(v) != float("inf"):
            out[k] = float(v)
    return out


def log_metrics(client: Any, run_id: str, metrics: dict[str, Any], step: int) -> None:
    """Log the finite numeric entries of ``metrics`` in one batch at ``step``."""
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    items = [Metric(k, v, ts, step) for k, v in _finite_metrics(metrics).items()]
    for i in range(0, len(items), 900):  # MLflow's batch limit is 1000 metrics
        client.log_batch(run_id, metrics=items[i:i + 900])


@dataclass
class Tracker:
    """A tracked MLflow run (driver side).

    Attributes:
        tracking_uri: where runs are stored.
        experiment: experiment name.
        run_name: the MLflow run name (the Ray run name).
        run_key: resume key (absolute run folder), stored as tag ``raysemiseg.run_key``.
        artifact_location: artifact root for a new experiment (None = server default).
        parent_run_id: nest this run under a parent (Tune sweeps).
        run_id: set by :meth:`start`.
    """

    tracking_uri: str
    experiment: str
    run_name: str
    run_key: str
    artifact_location: str | None = None
    parent_run_id: str | None = None
    run_id: str | None = None
    config: Any = None

    @classmethod
    def for_run(cls, cfg: Any, parent_run_id: str | None = None) -> "Tracker":
        """The tracker of a :class:`~raysemiseg.config.TrainConfig` run."""
        uri, art = resolve_tracking_uri(cfg.tracking.tracking_uri, cfg.run.storage_path)
        sp = cfg.run.storage_path
        key = sp.rstrip("/") + "/" + cfg.run.name if "://" in sp else str(Path(sp).resolve() / cfg.run.name)
        return cls(uri, cfg.tracking.experiment, cfg.run.name, key, art, parent_run_id, config=cfg)

    @property
    def client(self) -> Any:
        return _client(self.tracking_uri)

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        c = self.client
        exp = c.get_experiment_by_name(self.experiment)
        if exp is not None:
            return exp.experiment_id
        try:
            return c.create_experiment(self.experiment, artifact_location=self.artifact_location)
        except MlflowException:  # created concurrently
            return c.get_experiment_by_name(self.experiment).experiment_id

    def start(self) -> str:
        """Create the MLflow run, or reopen the one with the same run key (resume); log the
        resolved config (params + ``config.yaml``). Returns the run id."""
        from mlflow.exceptions import MlflowException

        c = self.client
        exp_id = self._experiment_id()
        found = c.search_runs([exp_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{self.run_key}'", max_results=1)
        if found:
            self.run_id = found[0].info.run_id
            c.update_run(self.run_id, status="RUNNING")
            c.set_tag(self.run_id, "raysemiseg.resumed", "true")
        else:
            tags = {RUN_KEY_TAG: self.run_key}
            if self.parent_run_id:
                tags["mlflow.parentRunId"] = self.parent_run_id
            self.run_id = c.create_run(exp_id, run_name=self.run_name, tags=tags).info.run_id
        if self.config is not None:
            from mlflow.entities import Param

            from raysemiseg.config import dump_config

            params = flatten(self.config.model_dump(mode="json"))
            try:
                items = [Param(k, v) for k, v in params.items()]
                for i in range(0, len(items), 90):
                    c.log_batch(self.run_id, params=items[i:i + 90])
            except MlflowException as e:  # a resumed run whose config changed: keep the first values
                log.warning("MLflow params not updated on resume: %s", e)
                c.set_tag(self.run_id, "raysemiseg.config_changed_on_resume", "true")
            c.log_text(self.run_id, dump_config(self.config), "config.yaml")
        return self.run_id

    def callback(self) -> "MLflowCallback":
        """The Ray Train controller callback that logs each epoch's rank-0 metrics to this run."""
        if self.run_id is None:
            raise RuntimeError("Tracker.start() first")
        return MLflowCallback(self.tracking_uri, self.run_id)

    def log_metrics(self, metrics: dict[str, Any], step: int = 0) -> None:
        """Numeric metrics at ``step`` (non-finite and non-numeric values are skipped)."""
        log_metrics(self.client, self.run_id, metrics, step)

    def log_params(self, params: dict[str, Any]) -> None:
        for k, v in flatten(params).items():
            self.client.log_param(self.run_id, k, v)

    def set_tags(self, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file (or every file of a folder) under ``artifact_path``."""
        p = Path(path)
        if p.is_dir():
            self.client.log_artifacts(self.run_id, str(p), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(p), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_eval(self, report: Any, prefix: str = "eval") -> None:
        """An :class:`raysemiseg.eval.report.EvalReport`: mIoU, per-class IoU metrics, the IoU
        table as text, and its figures (overlays, bar chart) as artifacts under ``prefix/``."""
        m = report.result.metrics
        names = report.result.label_space.names
        metrics = {f"{prefix}/miou": m.miou, f"{prefix}/pixel_acc": m.pixel_acc, f"{prefix}/mean_acc": m.mean_acc}
        metrics.update({f"{prefix}/iou/{names[k]}": float(v) for k, v in enumerate(m.iou)})
        self.log_metrics(metrics)
        self.log_text(report.table, f"{prefix}/iou_table.txt")
        for f in report.files:
            self.log_artifact(f, prefix)

    def log_checkpoint(self, best: str | Path | None, latest: str | Path | None) -> None:
        """Record where the checkpoints are (tags; the files stay in Ray Train's storage)."""
        self.set_tags({"raysemiseg.checkpoint.best": best, "raysemiseg.checkpoint.latest": latest})

    def end(self, status: str = "FINISHED") -> None:
        """Close the run with ``status`` (FINISHED | FAILED | KILLED)."""
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)

    def ui_command(self) -> str:
        """The shell command that opens this store in the MLflow UI (127.0.0.1)."""
        if self.tracking_uri.startswith(("http://", "https://")):
            return f"open {self.tracking_uri}"
        return f"mlflow ui --backend-store-uri {self.tracking_uri} --host 127.0.0.1 --port 5000"


def _log_per_class_table(client: Any, run_id: str, checkpoint: Any, epoch: int) -> None:
    """The checkpoint's per-class CSV (``val_per_class.csv``, written by the training loop) as the
    artifact ``per_class/epoch_<epoch>.csv``: per-class figures travel as one table, not one
    metric key per class (21,841 keys at ImageNet-21k). Read through the checkpoint's own
    filesystem (local or remote storage), without downloading the checkpoint."""
    from raysemiseg.train.loop import PER_CLASS_TABLE

    path = f"{checkpoint.path.rstrip('/')}/{PER_CLASS_TABLE}"
    if checkpoint.filesystem.get_file_info(path).type.name != "File":
        return
    with checkpoint.filesystem.open_input_stream(path) as f:
        text = f.read().decode()
    client.log_text(run_id, text, f"per_class/epoch_{epoch:04d}.csv")


def _user_callback_base() -> type:
    from ray.train import UserCallback

    return UserCallback


class MLflowCallback(_user_callback_base()):  # type: ignore[misc]
    """``ray.train.UserCallback`` (runs on the Train controller): log each report's rank-0
    metrics to ``run_id`` with ``step = metrics["epoch"]``.

    Raises (from ``after_report``, which fails the Train run): whatever MLflow raises (an
    unreachable server, a locked or read-only store...)."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if not metrics:
            return
        m = metrics[0]
        client = _client(self.tracking_uri)
        log_metrics(client, self.run_id, m, int(m.get("epoch", 0)))
        if checkpoint is not None:
            client.set_tag(self.run_id, "raysemiseg.checkpoint.latest", checkpoint.path)
            _log_per_class_table(client, self.run_id, checkpoint, int(m.get("epoch", 0)))
