"""Dropout that can stay on at inference time.

Some defenses (and the attacks that must see through them, e.g. EOT) rely on a network whose
dropout keeps sampling masks in eval mode. ``model.train()`` is the wrong switch for that
because it also changes batch-norm statistics, so the zoo uses :class:`InferenceDropout`, whose
``always_on`` flag keeps only the dropout active.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class InferenceDropout(nn.Dropout):
    """``nn.Dropout`` that also drops in eval mode while ``always_on`` is True.

    With ``always_on=False`` (the default) it behaves exactly like ``nn.Dropout``. It has no
    parameters or buffers, so inserting it (even with ``p=0``, where it is the identity) never
    changes a state_dict.
    """

    def __init__(self, p: float = 0.5, inplace: bool = False, *, always_on: bool = False) -> None:
        super().__init__(p=p, inplace=inplace)
        self.always_on = always_on

    @property
    def active(self) -> bool:
        """Whether the next forward pass samples a dropout mask."""
        return self.p > 0 and (self.training or self.always_on)

    def forward(self, input: Tensor) -> Tensor:
        return F.dropout(input, self.p, self.training or self.always_on, self.inplace)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, always_on={self.always_on}"


def set_inference_dropout(model: nn.Module, enabled: bool) -> int:
    """Keep every :class:`InferenceDropout` in ``model`` active at inference (or stop doing so).

    Returns the number of :class:`InferenceDropout` layers whose flag was set (layers with
    ``p=0`` are counted but stay the identity; check ``Classifier.stochastic`` to know whether
    the model is now random). Plain ``nn.Dropout`` modules are left alone.
    """
    switched = 0
    for module in model.modules():
        if isinstance(module, InferenceDropout):
            module.always_on = bool(enabled)
            switched += 1
    return switched


def has_active_inference_dropout(model: nn.Module) -> bool:
    """True iff some :class:`InferenceDropout` with ``p > 0`` is kept on at inference."""
    return any(isinstance(m, InferenceDropout) and m.p > 0 and m.always_on for m in model.modules())
