"""Dropout as a defense: regularisation at training time, or kept on at inference (randomised).

``mode=train_only`` is ordinary dropout. ``mode=inference`` keeps it sampling at test time and
averages the prediction over ``n_samples`` draws: a randomised defense whose single-sample
gradients are noisy, so naive attacks overstate its robustness (Athalye et al. 2018). The battery
detects the randomness and adds EOT attacks; the report shows naive and EOT numbers side by side.
"""

from __future__ import annotations

from typing import Any

from robustcnn.config import config_int, show
from robustcnn.defenses.base import Defense, register_defense
from robustcnn.errors import ConfigError
from robustcnn.models import Classifier, set_inference_dropout

MODES = ("train_only", "inference")


@register_defense("dropout")
class DropoutDefense(Defense):
    inference_settings = ("mode", "n_samples")

    def __init__(
        self, *, rate: float = 0.5, mode: str = "train_only", n_samples: int = 10, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= float(rate) < 1.0:
            raise ConfigError(
                f"defense.rate={show(rate)} must be in [0, 1) (the probability of dropping a unit)"
            )
        if mode not in MODES:
            raise ConfigError(f"defense.mode={show(mode)} is unknown; choose one of {', '.join(MODES)}")
        self.n_samples = config_int(
            n_samples, "defense.n_samples", minimum=1, hint=" (draws averaged per prediction)"
        )
        self.rate = float(rate)
        self.mode = mode

    def params(self) -> dict[str, Any]:
        return {**super().params(), "rate": self.rate, "mode": self.mode, "n_samples": self.n_samples}

    def model_overrides(self) -> dict[str, Any]:
        return {"dropout": self.rate}

    def finalize(self, model: Classifier) -> None:
        if self.mode == "inference":
            set_inference_dropout(model, True)
            model.inference_samples = self.n_samples
