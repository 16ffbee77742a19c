"""raysemiseg.train."""
