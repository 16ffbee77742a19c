"""raysemiseg.models: backbones (feature extractors with a registry) and segmentation heads."""

from raysemiseg.models.backbones import BACKBONES, Backbone, MissingWeightsError, build_backbone, normalize
from raysemiseg.models.heads import LargeFOVHead

__all__ = ["BACKBONES", "Backbone", "LargeFOVHead", "MissingWeightsError", "build_backbone", "normalize"]
