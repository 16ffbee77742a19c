"""raysemiseg.tune."""
