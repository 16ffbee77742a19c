"""The pseudolabel CLI's per-stage checkpoint flag."""

import pytest

from raysemiseg.cli import build_parser
from raysemiseg.pseudolabel.commands import parse_stage_checkpoints


def test_stage_checkpoint_flag_parses_repeated_values():
    args = build_parser().parse_args([
        "pseudolabel", "r.yaml", "--store", "S", "--out", "L",
        "--stage-checkpoint", "lnet_map=runs/lnet/ck", "--stage-checkpoint", "cam=runs/cam/ck",
    ])
    assert parse_stage_checkpoints(args.stage_checkpoint) == {"lnet_map": "runs/lnet/ck", "cam": "runs/cam/ck"}


@pytest.mark.parametrize("bad", ["lnet_map", "=dir", "lnet_map="])
def test_stage_checkpoint_malformed_is_named(bad):
    with pytest.raises(ValueError, match="STAGE=DIR"):
        parse_stage_checkpoints([bad])


def test_stage_checkpoint_twice_is_an_error():
    with pytest.raises(ValueError, match="given twice"):
        parse_stage_checkpoints(["cam=a", "cam=b"])
