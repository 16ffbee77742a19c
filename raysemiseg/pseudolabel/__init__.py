"""raysemiseg.pseudolabel."""
