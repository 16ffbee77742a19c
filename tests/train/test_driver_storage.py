"""Storage URIs end to end (a 2-worker run whose run.storage_path is a file:// URI: its checkpoints
keep the URI, eval and pseudo-labelling read them back, MLflow holds every epoch, a no-op rerun
reads the checkpoint's meta through the URI) and the run-config guard of a rerun."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from raysemiseg.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]


def test_file_uri_storage_end_to_end(ray_session, sample_store, tmp_path, make_config, monkeypatch, capsys) -> None:
    from raysemiseg.cli import main as cli_main
    from raysemiseg.eval.predict import evaluate_checkpoint
    from raysemiseg.pseudolabel.store import open_label_store
    from raysemiseg.train.checkpoint import local_checkpoint, read_meta
    from raysemiseg.train.driver import train

    monkeypatch.setenv("RAYSEMISEG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runs = tmp_path / "runs"
    root = runs.as_uri()                                     # file:///.../runs
    cfg = load_config(make_config(sample_store, runs, "uri", scaling={"num_workers": 2, "cpus_per_worker": 1},
                                  run={"storage_path": root}, tracking={"enabled": True}))
    res = train(cfg)

    # every location keeps the URI (a str with the scheme), not a scheme-less Path
    assert res.run_dir == f"{root}/uri"
    for loc in (res.best_checkpoint, res.latest_checkpoint, res.checkpoint):
        assert isinstance(loc, str) and loc.startswith(f"{root}/uri/checkpoint_"), loc
    assert res.metrics["num_workers"] == 2 and res.metrics["epoch"] == 2
    assert read_meta(res.latest_checkpoint)["epoch"] == 2                 # meta.json read through the URI
    best_local = runs / "uri" / res.best_checkpoint.rsplit("/", 1)[1]
    assert (best_local / "model.pt").is_file()

    # MLflow (the embedded store under the URI's folder): one entry per epoch, for every curve
    assert res.tracking_uri == f"sqlite:///{runs.resolve() / 'mlflow.db'}"
    client = MlflowClient(res.tracking_uri)
    for key in ("val_miou", "train/loss"):
        assert sorted(m.step for m in client.get_metric_history(res.mlflow_run_id, key)) == [1, 2], key
    assert client.get_run(res.mlflow_run_id).data.tags["raysemiseg.checkpoint.best"] == res.best_checkpoint

    # the URI is copied once into the cache; a run-folder URI names its newest checkpoint
    copy = local_checkpoint(res.best_checkpoint)
    assert copy.parent == tmp_path / "cache" / "checkpoints" and copy != best_local
    assert (copy / "model.pt").read_bytes() == (best_local / "model.pt").read_bytes()
    assert local_checkpoint(res.best_checkpoint) == copy
    newest = local_checkpoint(res.run_dir)
    assert json.loads((newest / ".source.json").read_text())["uri"] == max(
        f"{root}/uri/{p.name}" for p in (runs / "uri").glob("checkpoint_*") if p.is_dir())

    # raysemiseg eval --checkpoint <URI>: the same scores as the local directory
    assert cli_main(["eval", "--checkpoint", res.best_checkpoint, "--store", str(sample_store), "--split", "val",
                     "--max-rows", "4", "--num-overlays", "1", "--out", str(tmp_path / "eval"), "--device", "cpu"]) == 0
    by_uri = json.loads((tmp_path / "eval" / "metrics.json").read_text())["miou"]
    direct = evaluate_checkpoint(best_local, sample_store, "val", num_samples=0, max_rows=4, device="cpu",
                                 progress=False)
    assert by_uri == pytest.approx(direct.metrics.miou)

    # raysemiseg pseudolabel --checkpoint <URI> (EM-Fixed on the checkpoint's scores, 4 rows)
    assert cli_main(["pseudolabel", str(ROOT / "configs" / "pseudolabel" / "em_fixed.yaml"), "--store",
                     str(sample_store), "--out", str(tmp_path / "labels"), "--checkpoint", res.best_checkpoint,
                     "--max-rows", "4", "--rows-per-shard", "2", "--no-progress"]) == 0
    rows = open_label_store(tmp_path / "labels").read_table().to_pylist()
    assert len(rows) == 4 and all(r["mask"] is not None for r in rows)
    want = hashlib.sha256((best_local / "model.pt").read_bytes()).hexdigest()
    assert {json.loads(r["provenance"])["checkpoint_sha256"] for r in rows} == {want}

    # rerun of the finished run: answered from the checkpoints' meta (through the URI), no Ray Train run started
    import raysemiseg.train.driver as driver

    def no_trainer(*a, **k):
        raise AssertionError("a finished run must not start Ray Train again")

    monkeypatch.setattr(driver, "build_trainer", no_trainer)
    again = train(cfg)
    assert (again.best_checkpoint, again.latest_checkpoint) == (res.best_checkpoint, res.latest_checkpoint)
    assert again.checkpoint == res.checkpoint and again.run_dir == res.run_dir
    assert again.metrics == read_meta(res.latest_checkpoint)["metrics"] and again.metrics["epoch"] == 2
    assert again.mlflow_run_id == res.mlflow_run_id
    # one more epoch is not finished: Ray Train is asked for it
    longer = load_config(make_config(sample_store, runs, "uri", scaling={"num_workers": 2, "cpus_per_worker": 1},
                                     run={"storage_path": root}, tracking={"enabled": True}, optim={"epochs": 3}))
    with pytest.raises(AssertionError, match="must not start Ray Train"):
        train(longer)
    capsys.readouterr()


def test_rerun_under_a_changed_config_is_refused(tmp_path, make_config) -> None:
    """S2.19: the run folder records its config; a rerun that changes what is trained is refused
    (naming the key), one that changes only where/how it runs (workers, tracking, epochs) resumes."""
    from raysemiseg.train.driver import RUN_FILE, check_run_config

    runs = tmp_path / "runs"
    cfg = load_config(make_config(tmp_path / "store", runs, "r"))
    digest = check_run_config(cfg)
    recorded = json.loads((runs / "r" / RUN_FILE).read_text())
    assert recorded["digest"] == digest and recorded["config"]["optim.lr"] == "0.01"
    assert check_run_config(cfg) == digest                                            # same config: resumes
    resumable = load_config(make_config(tmp_path / "store", runs, "r", optim={"epochs": 5},
                                        scaling={"num_workers": 2}, tracking={"enabled": True}))
    assert check_run_config(resumable) == digest
    for section, change, key in (("optim", {"lr": 0.1}, "optim.lr: 0.01 -> 0.1"),
                                 ("method", {"name": "dual_branch", "params": {}}, "method.name")):
        changed = load_config(make_config(tmp_path / "store", runs, "r", **{section: change}))
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as e:
            check_run_config(changed)
        assert "new run.name" in str(e.value)
    # a URI storage path keeps the record under the URI
    uri_cfg = load_config(make_config(tmp_path / "store", runs, "u", run={"storage_path": runs.as_uri()}))
    check_run_config(uri_cfg)
    assert (runs / "u" / RUN_FILE).is_file()
