"""Strong-weak dual-branch network (Luo & Yang, ECCV 2020) and its single-branch / Eq. 4 baselines."""

from raysemiseg.methods.dual_branch.model import (
    DualBranch,
    DualBranchParams,
    LambdaEnsemble,
    SingleBranchMixed,
    SingleBranchParams,
)

__all__ = ["DualBranch", "DualBranchParams", "LambdaEnsemble", "SingleBranchMixed", "SingleBranchParams"]
