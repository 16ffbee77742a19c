"""Segmentation heads on top of a :class:`raysemiseg.models.backbones.Backbone`."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["LargeFOVHead"]


class LargeFOVHead(nn.Module):
    """DeepLab-LargeFOV classifier (Chen et al. 2015, Sec. 4.1 "DeepLab-LargeFOV"):
    fc6 = 3x3 conv with dilation 12 (padding 12) -> ReLU -> dropout -> fc7 = 1x1 conv -> ReLU ->
    dropout -> fc8 = 1x1 conv to ``num_classes`` logits. The paper uses ``hidden=1024`` and
    dropout 0.5; CPU configs use ``hidden=256``.

    fc8 is initialised N(0, 0.01) with zero bias (DeepLab's ``fc8`` filler); fc6/fc7 use
    PyTorch's default (Kaiming-uniform) init.

    Args:
        in_channels: backbone channels (``Backbone.out_channels``).
        num_classes: K, the label space's class count.
        hidden: width of fc6 and fc7.
        dilation: fc6 dilation (12 = LargeFOV's field of view at output stride 8).
        dropout: per-element drop probability after fc6 and fc7 (``nn.Dropout``, as Caffe's
            dropout layers in the DeepLab prototxt).

    Raises:
        ValueError: non-positive sizes or dropout outside [0, 1).

    Shapes: (N, in_channels, h, w) -> (N, num_classes, h, w).
    """

    def __init__(self, in_channels: int, num_classes: int, hidden: int = 1024, dilation: int = 12,
                 dropout: float = 0.5) -> None:
        super().__init__()
        if in_channels < 1 or num_classes < 1 or hidden < 1 or dilation < 1:
            raise ValueError(
                f"LargeFOVHead: in_channels={in_channels}, num_classes={num_classes}, hidden={hidden}, "
                f"dilation={dilation} must all be >= 1"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LargeFOVHead: dropout {dropout} must be in [0, 1)")
        self.fc6 = nn.Conv2d(in_channels, hidden, 3, padding=dilation, dilation=dilation)
        self.fc7 = nn.Conv2d(hidden, hidden, 1)
        self.fc8 = nn.Conv2d(hidden, num_classes, 1)
        self.relu = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(dropout)
        nn.init.normal_(self.fc8.weight, std=0.01)
        nn.init.zeros_(self.fc8.bias)

    def features(self, x: Tensor) -> Tensor:
        """fc7 activations (N, hidden, h, w), e.g. for CAMs or a second classifier."""
        return self.drop(self.relu(self.fc7(self.drop(self.relu(self.fc6(x))))))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc8(self.features(x))
