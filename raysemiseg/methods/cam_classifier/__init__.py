"""cam_classifier: multi-label image classifier whose class activation maps seed pseudo labels."""

from raysemiseg.methods.cam_classifier.model import CamClassifier, CamClassifierParams, CandidateLogits

__all__ = ["CamClassifier", "CamClassifierParams", "CandidateLogits"]
