"""raysemiseg.models."""
