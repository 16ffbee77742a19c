"""raysemiseg: semi- and weakly-supervised semantic segmentation at cluster scale."""

__version__ = "0.1.0"
