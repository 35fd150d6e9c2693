"""Transfer attack: PGD on a surrogate model (same data, trained independently), applied to the target.

The black-box baseline of Carlini et al.'s checklist: if examples crafted on another network
fool the target more than white-box PGD on the target itself, the target's gradients are masked.
The runner trains (or loads from the cache) the surrogate and binds it with :meth:`bind`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

from robustcnn.attacks.context import PerturbContext
from robustcnn.attacks.contract import attack_mode
from robustcnn.attacks.gradient import GradientAttack, GradientOptions
from robustcnn.attacks.pgd import PGD
from robustcnn.attacks.result import SettingValue
from robustcnn.errors import ConfigError
from robustcnn.threat import ThreatModel

if TYPE_CHECKING:
    from typing import Unpack  # Python 3.11+; only the type checker reads it


class Transfer(GradientAttack):
    name = "transfer"
    uses_gradients = False  # no gradient of the *target* is used

    def __init__(
        self,
        *,
        surrogate: str = "madry_cnn",
        steps: int = 40,
        rel_step_size: float = 2.5,
        random_start: bool = True,
        **kwargs: Unpack[GradientOptions],
    ) -> None:
        super().__init__(**kwargs)
        if int(steps) < 1:
            raise ConfigError(f"attack.transfer.steps={steps} must be >= 1")
        if not rel_step_size > 0:
            raise ConfigError(f"attack.transfer.rel_step_size={rel_step_size} must be > 0")
        from robustcnn.models import available_models  # the zoo, imported only when a transfer is built

        if surrogate not in available_models():
            raise ConfigError(
                f"attack.transfer.surrogate={surrogate!r} is not a zoo model; choose one of "
                f"{', '.join(available_models())}"
            )
        self.surrogate = str(surrogate)
        self.steps = int(steps)
        self.rel_step_size = float(rel_step_size)
        self.random_start = bool(random_start)
        self.surrogate_model: nn.Module | None = None

    def params(self) -> dict[str, SettingValue]:
        return {
            **super().params(),
            "surrogate": self.surrogate,
            "steps": self.steps,
            "rel_step_size": self.rel_step_size,
            "random_start": self.random_start,
        }

    def bind(self, surrogate_model: nn.Module) -> Transfer:
        """Attach the trained surrogate (same input space and classes as the target)."""
        self.surrogate_model = surrogate_model
        return self

    def perturb(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        eps: float,
        threat: ThreatModel,
        targets: Tensor | None,
        ctx: PerturbContext,
    ) -> Tensor:
        if self.surrogate_model is None:
            raise ConfigError(
                "the transfer attack has no surrogate model bound; run it through the battery "
                "(robustcnn run attack=[pgd,transfer]) or call .bind(model) first"
            )
        pgd = PGD(
            steps=self.steps,
            rel_step_size=self.rel_step_size,
            random_start=self.random_start,
            loss=self.loss,
            return_last=True,
        )
        with attack_mode(self.surrogate_model):
            # all steps on the surrogate (no early stop: fooling the surrogate is not the goal)
            return pgd.ascend(self.surrogate_model, x, y, eps, threat.norm, targets, ctx, pgd.alpha(eps))


__all__ = ["Transfer"]
