"""strong_only: the fully supervised baseline (DeepLab-LargeFOV on pixel-labelled rows only)."""

from raysemiseg.methods.strong_only.model import StrongOnly, StrongOnlyParams

__all__ = ["StrongOnly", "StrongOnlyParams"]
