"""local_checkpoint: the one reader of checkpoint references (dir, run folder, URI) on real files."""

from __future__ import annotations

import json
import os

import pytest

from raysemiseg.train.checkpoint import find_checkpoint, local_checkpoint, read_meta


def _fake_checkpoint(d, epoch: int, weights: bytes = b"w") -> None:
    d.mkdir(parents=True)
    (d / "model.pt").write_bytes(weights)
    (d / "meta.json").write_text(json.dumps({"epoch": epoch}))


def test_local_paths_are_used_in_place(tmp_path) -> None:
    run = tmp_path / "run"
    _fake_checkpoint(run / "checkpoint_2026-01-01_00-00-01.000001", 1)
    _fake_checkpoint(run / "checkpoint_2026-01-01_00-00-09.000001", 2)
    (run / "checkpoint_2026-01-01_00-00-10.000001").mkdir()          # no model.pt (a partial write): skipped
    assert local_checkpoint(run) == run / "checkpoint_2026-01-01_00-00-09.000001"
    assert local_checkpoint(run / "checkpoint_2026-01-01_00-00-01.000001") == run / "checkpoint_2026-01-01_00-00-01.000001"
    with pytest.raises(FileNotFoundError, match="neither a checkpoint"):
        local_checkpoint(tmp_path / "missing")


def test_uris_are_copied_once_and_again_when_they_change(tmp_path) -> None:
    run = tmp_path / "run"
    ck = run / "checkpoint_2026-01-01_00-00-01.000001"
    _fake_checkpoint(ck, 1, b"first")
    cache = tmp_path / "cache"
    uri = run.as_uri()
    assert find_checkpoint(uri) == f"{uri}/{ck.name}"                   # a run-folder URI names its newest
    assert read_meta(f"{uri}/{ck.name}") == {"epoch": 1}                 # read in place
    got = local_checkpoint(uri, cache)
    assert got.parent == cache and (got / "model.pt").read_bytes() == b"first"
    assert (got / "meta.json").is_file() and json.loads((got / ".source.json").read_text())["uri"] == f"{uri}/{ck.name}"
    (got / "marker").write_text("x")                                     # reused while the source is unchanged
    assert local_checkpoint(uri, cache) == got and (got / "marker").is_file()
    (ck / "model.pt").write_bytes(b"second!")                            # rewritten at the same URI
    os.utime(ck / "model.pt", ns=(1, 1))
    again = local_checkpoint(uri, cache)
    assert again == got and (again / "model.pt").read_bytes() == b"second!" and not (again / "marker").exists()
    with pytest.raises(FileNotFoundError, match="nowhere"):
        local_checkpoint((tmp_path / "nowhere").as_uri(), cache)
