"""The MLflow adapter against a real `mlflow server` on 127.0.0.1, and the embedded default store."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from raysemiseg.config import load_config
from raysemiseg.eval.metrics import compute_metrics
from raysemiseg.eval.predict import EvalResult, Sample
from raysemiseg.eval.report import write_report
from raysemiseg.labels import builtin
from raysemiseg.tune.tracking import MLflowCallback, Tracker, flatten, resolve_tracking_uri


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def mlflow_server(tmp_path):
    """A real MLflow tracking server (SQLite backend, local artifact root) bound to 127.0.0.1."""
    port = _free_port()
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen(
        [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {proc.stderr.read()[-2000:]}")
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("mlflow server did not come up in 120 s")
    yield url
    proc.terminate()  # the server's graceful shutdown waits ~6 s for idle connections: not worth the suite's time
    try:
        proc.wait(timeout=2)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the server and its worker processes
        proc.wait(timeout=20)


def _cfg(tmp_path: Path, uri: str | None = None):
    return load_config({"data": {"store": "s"}, "model": {"backbone": "tiny"},
                        "run": {"name": "r1", "storage_path": str(tmp_path / "runs")},
                        "tracking": {"tracking_uri": uri, "experiment": "exp"}})


def _eval_result() -> EvalResult:
    space = builtin("voc21")
    conf = np.zeros((21, 21), np.int64)
    conf[0, 0], conf[15, 15], conf[15, 0] = 30, 6, 2    # IoU: bg 30/32, person 6/8
    img = np.zeros((8, 8, 3), np.uint8)
    m = np.zeros((8, 8), np.int64)
    return EvalResult(compute_metrics(conf), space, 1, 0.1, False, [Sample("a", img, m, m)])


def test_tracker_logs_to_real_server(mlflow_server, tmp_path) -> None:
    tr = Tracker.for_run(_cfg(tmp_path, mlflow_server))
    assert tr.tracking_uri == mlflow_server and tr.artifact_location is None
    run_id = tr.start()
    # per-epoch metrics as the Ray Train controller callback logs them (rank-0 report)
    cb = tr.callback()
    assert isinstance(cb, MLflowCallback)
    for epoch in (1, 2):
        cb.after_report(None, [{"epoch": epoch, "val_miou": 0.1 * epoch, "train/ce": 1.0 / epoch, "note": "x",
                                "nan": float("nan")}], None)
    report = write_report(_eval_result(), tmp_path / "eval")
    tr.log_eval(report, prefix="eval_val")
    tr.log_checkpoint(tmp_path / "ckpt_best", tmp_path / "ckpt_last")
    tr.end("FINISHED")

    c = MlflowClient(mlflow_server)
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.backbone"] == "tiny" and run.data.params["run.name"] == "r1"
    assert [m.value for m in sorted(c.get_metric_history(run_id, "val_miou"), key=lambda m: m.step)] == [0.1, 0.2]
    assert "nan" not in run.data.metrics and "note" not in run.data.metrics
    assert run.data.metrics["eval_val/miou"] == pytest.approx((30 / 32 + 6 / 8) / 2)
    assert run.data.metrics["eval_val/iou/person"] == pytest.approx(0.75)
    assert run.data.tags["raysemiseg.checkpoint.best"] == str(tmp_path / "ckpt_best")
    arts = {a.path for a in c.list_artifacts(run_id, "eval_val")}
    assert {"eval_val/overlays.png", "eval_val/iou_bar.png", "eval_val/iou_table.txt"} <= arts
    assert "config.yaml" in {a.path for a in c.list_artifacts(run_id)}

    # same run name again: the same MLflow run is reopened (resume)
    tr2 = Tracker.for_run(_cfg(tmp_path, mlflow_server))
    assert tr2.start() == run_id
    assert c.get_run(run_id).data.tags["raysemiseg.resumed"] == "true"


def test_default_store_is_embedded_sqlite_and_env_overrides(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri, art = resolve_tracking_uri(None, str(tmp_path / "runs"))
    assert uri == f"sqlite:///{(tmp_path / 'runs' / 'mlflow.db').resolve()}"
    assert art == (tmp_path / "runs" / "mlartifacts").resolve().as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert resolve_tracking_uri(None, str(tmp_path))[0] == "http://127.0.0.1:1"
    assert resolve_tracking_uri("sqlite:///x.db", str(tmp_path))[0] == "sqlite:///x.db"
    with pytest.raises(ValueError, match="tracking_uri"):
        monkeypatch.delenv("MLFLOW_TRACKING_URI")
        resolve_tracking_uri(None, "s3://bucket/runs")
    assert flatten({"a": {"b": 1, "c": {}}, "d": [1]}) == {"a.b": "1", "a.c": "{}", "d": "[1]"}


def test_a_metric_that_cannot_be_logged_is_an_error(tmp_path) -> None:
    """The controller callback raises (Ray Train then fails the run with ControllerError) instead of
    logging a warning and leaving a gap in the curves: here the run does not exist in the store."""
    from mlflow.exceptions import MlflowException

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()                      # creates the (empty) store
    cb = MLflowCallback(uri, "0" * 32)
    with pytest.raises(MlflowException):
        cb.after_report(None, [{"epoch": 1, "val_miou": 0.5}], None)
