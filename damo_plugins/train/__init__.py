"""Training DAMO-YOLO models: ZeroHead/GFL losses, AlignedOTA assignment, the training loop.

See :mod:`damo_plugins.train.loop` for the loop and :mod:`damo_plugins.training` for the
``damo-opt train`` command.
"""

from damo_plugins.train.assigner import AlignedOTA
from damo_plugins.train.losses import DetectionLoss

__all__ = ["AlignedOTA", "DetectionLoss"]
