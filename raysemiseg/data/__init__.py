"""raysemiseg.data."""
