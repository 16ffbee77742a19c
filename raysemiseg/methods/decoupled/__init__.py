"""DecoupledNet (Hong, Noh & Han, NeurIPS 2015): method ``"decoupled"``."""

from raysemiseg.methods.decoupled.model import DecoupledNet, DecoupledParams, class_saliency

__all__ = ["DecoupledNet", "DecoupledParams", "class_saliency"]
