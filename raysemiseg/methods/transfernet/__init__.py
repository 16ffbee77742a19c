"""TransferNet (Hong et al., CVPR 2016): method ``"transfernet"``."""

from raysemiseg.methods.transfernet.model import (
    TransferNet,
    TransferNetParams,
    attended_feature,
    attention_weights,
    densified_attention,
)

__all__ = ["TransferNet", "TransferNetParams", "attended_feature", "attention_weights", "densified_attention"]
