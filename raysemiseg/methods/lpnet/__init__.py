"""L-Net / P-Net (Xiao et al., AAAI 2018): methods ``"lnet"`` and ``"lnet_pnet"``."""

from raysemiseg.methods.lpnet.model import (
    LNet,
    LNetMapStage,
    LNetParams,
    LNetPNet,
    LNetPNetParams,
    PNet,
    c3s_miou,
    class_agnostic_target,
    lnet_map,
)

__all__ = ["LNet", "LNetMapStage", "LNetPNet", "LNetPNetParams", "LNetParams", "PNet", "c3s_miou", "class_agnostic_target", "lnet_map"]
