"""WSSL (Papandreou et al., ICCV 2015): online EM-Fixed / EM-Adapt / Bbox-EM-Fixed, semi and cross-dataset."""

from raysemiseg.methods.wssl.cross import load_cross_pretrain, union_label_space, write_label_space_yaml
from raysemiseg.methods.wssl.model import WsslEM, WsslParams

__all__ = ["WsslEM", "WsslParams", "load_cross_pretrain", "union_label_space", "write_label_space_yaml"]
