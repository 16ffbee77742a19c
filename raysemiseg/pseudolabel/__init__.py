"""The pseudo-label engine: pure per-image stages and their Ray Data pipeline.

Modules (each stage a pure function with its paper and equation in the docstring):

* :mod:`~raysemiseg.pseudolabel.em` - the one E-step (Papandreou et al. 2015): EM-Fixed, EM-Adapt,
  Bbox-EM-Fixed regions; torch, used offline here and online by ``methods/wssl``.
* :mod:`~raysemiseg.pseudolabel.crf` - label-restricted dense CRF (Krahenbuhl & Koltun 2011).
* :mod:`~raysemiseg.pseudolabel.superpixels` - SLIC + self-diffusion (Xiao et al. 2018, Eq. 2).
* :mod:`~raysemiseg.pseudolabel.bbox` - Bbox-Rect and Bbox-Seg (Papandreou et al. 2015, Sec. 4.2).
* :mod:`~raysemiseg.pseudolabel.cam` - class activation maps (Zhou et al. 2016) of present labels.
* :mod:`~raysemiseg.pseudolabel.pipeline` - recipes -> Ray Data chain -> sharded, resumable label store.
* :mod:`~raysemiseg.pseudolabel.store` - the label store layout, atomic shard commits, read API.
* :mod:`~raysemiseg.pseudolabel.report` - mIoU of label stores against ground truth, overlays, MLflow.
* :mod:`~raysemiseg.pseudolabel.commands` - ``raysemiseg pseudolabel`` CLI.

Submodules are imported on use (this package import stays light).
"""

__all__ = ["bbox", "cam", "commands", "crf", "em", "pipeline", "report", "store", "superpixels"]
