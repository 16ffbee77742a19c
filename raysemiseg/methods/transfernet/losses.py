"""TransferNet's losses: e_cls (Eq. 6, softmax cross-entropy of f_cls(z_l) against l) and e_seg
(Eq. 8, 2-class cross-entropy of the decoder's figure-ground map) combined as Eq. 9,
e = e_cls + lambda * e_seg (lambda on the segmentation term), inside :meth:`TransferNet.compute_losses`. The figure-ground pieces
are shared with DecoupledNet and live in :mod:`raysemiseg.methods.decoupled.losses`."""

from raysemiseg.methods.decoupled.losses import binary_targets, combine_binary_maps, masked_cross_entropy

__all__ = ["binary_targets", "combine_binary_maps", "masked_cross_entropy"]
