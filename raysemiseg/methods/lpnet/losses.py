"""L-Net / P-Net losses (Xiao et al. 2018): Eq. 1 (:func:`binary_loss` on
:func:`class_agnostic_target`), the segmentation CE on L_s and L_w
(:func:`raysemiseg.methods.decoupled.losses.masked_cross_entropy`) and the adversarial pair
Eq. 3-5 (inside :meth:`LNetPNet.compute_losses`)."""

from raysemiseg.methods.decoupled.losses import masked_cross_entropy
from raysemiseg.methods.lpnet.model import binary_loss, class_agnostic_target

__all__ = ["binary_loss", "class_agnostic_target", "masked_cross_entropy"]
