"""raysemiseg.eval."""
