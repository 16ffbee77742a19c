"""The multi-node checks of raysemiseg.storage on node lists as ray.nodes() gives them (plain dicts),
and the URI file helpers on real file:// URIs."""

from __future__ import annotations

import pytest

from raysemiseg import storage

ONE = [{"NodeManagerAddress": "10.0.0.1", "Alive": True}]
TWO_RAYLETS_ONE_HOST = [{"NodeManagerAddress": "10.0.0.1", "Alive": True},
                        {"NodeManagerAddress": "10.0.0.1", "Alive": True}]
TWO_HOSTS = [{"NodeManagerAddress": "10.0.0.1", "Alive": True}, {"NodeManagerAddress": "10.0.0.2", "Alive": True}]
MOUNTS = storage.read_mounts("overlay / overlay rw 0 0\n"
                             "tmpfs /tmp tmpfs rw 0 0\n"
                             "fs-1.efs.us-west-2.amazonaws.com:/ /mnt/shared nfs4 rw 0 0\n"
                             "s3fs /mnt/bucket fuse.s3fs rw 0 0\n")


def test_mount_table_and_fs_type() -> None:
    assert MOUNTS[2] == ("/mnt/shared", "nfs4")
    assert storage.fs_type("/mnt/shared/runs", MOUNTS) == "nfs4"
    assert storage.fs_type("/mnt/sharedx/runs", MOUNTS) == "overlay"        # a prefix of the name is not the mount
    assert storage.fs_type("/tmp/a", MOUNTS) == "tmpfs" and storage.fs_type("/home/u", MOUNTS) == "overlay"


def test_relative_paths_refused_on_more_than_one_node() -> None:
    paths = {"data.store": "runs/store", "run.storage_path": "/tmp/runs", "data.label_store": None}
    storage.check_shared_paths(paths, ONE, mounts=MOUNTS)               # one node: anything goes
    with pytest.raises(ValueError) as e:                                 # 2 raylets on one host: relative only
        storage.check_shared_paths(paths, TWO_RAYLETS_ONE_HOST, mounts=MOUNTS, what="job x")
    msg = str(e.value)
    assert "job x runs on a cluster of 2 nodes (1 hosts)" in msg and "data.store='runs/store' is relative" in msg
    assert "run.storage_path='" not in msg and "s3://" in msg and "shared filesystem" in msg


def test_node_local_absolute_paths_refused_across_hosts(monkeypatch) -> None:
    monkeypatch.delenv(storage.SHARED_PATHS_ENV, raising=False)
    ok = {"data.store": "/mnt/shared/stores/voc", "run.storage_path": "s3://bucket/runs",
          "data.label_store": "/mnt/bucket/labels", "data.split_file": "file:///anything"}
    storage.check_shared_paths(ok, TWO_HOSTS, mounts=MOUNTS)
    with pytest.raises(ValueError, match=r"run\.storage_path='/tmp/runs' is on a node-local filesystem \(tmpfs\)"):
        storage.check_shared_paths({**ok, "run.storage_path": "/tmp/runs"}, TWO_HOSTS, mounts=MOUNTS)
    storage.check_shared_paths({"x": "/tmp/runs"}, TWO_RAYLETS_ONE_HOST, mounts=MOUNTS)   # one host shares /tmp
    # a shared mount the check cannot recognise, vouched for by the operator
    storage.check_shared_paths({"x": "/data/runs"}, TWO_HOSTS, mounts=MOUNTS, shared_prefixes=["/data"])
    monkeypatch.setenv(storage.SHARED_PATHS_ENV, "/other:/data")
    storage.check_shared_paths({"x": "/data/runs"}, TWO_HOSTS, mounts=MOUNTS)
    with pytest.raises(ValueError, match="/database"):
        storage.check_shared_paths({"x": "/database"}, TWO_HOSTS, mounts=MOUNTS)


def test_file_backed_mlflow_store_refused_across_hosts() -> None:
    storage.check_tracking_store("sqlite:////tmp/runs/mlflow.db", TWO_RAYLETS_ONE_HOST)
    storage.check_tracking_store("http://10.0.0.1:5000", TWO_HOSTS)
    for uri in ("sqlite:////mnt/shared/mlflow.db", "file:///mnt/shared/mlruns", "/mnt/shared/mlruns"):
        with pytest.raises(ValueError, match="MLflow server"):
            storage.check_tracking_store(uri, TWO_HOSTS)


def test_uri_file_helpers(tmp_path) -> None:
    uri = (tmp_path / "a").as_uri()
    assert storage.is_uri(uri) and not storage.is_uri(str(tmp_path))
    assert storage.join("s3://b/runs/", "x", "/y") == "s3://b/runs/x/y"
    storage.write_text(storage.join(uri, "sub", "f.txt"), "hello")
    assert (tmp_path / "a" / "sub" / "f.txt").read_text() == "hello"
    assert storage.read_text(storage.join(uri, "sub", "f.txt")) == "hello"
    assert storage.exists(storage.join(uri, "sub"), "dir") and not storage.exists(storage.join(uri, "sub"), "file")
    with pytest.raises(FileNotFoundError, match="nope"):
        storage.read_text(storage.join(uri, "nope"))
