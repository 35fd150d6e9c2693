"""What ``Attack.perturb`` gets besides the tensors: deterministic noise, forward helpers, counters.

Why its own module: every attack (and adversarial training's inner maximisation) writes against this
context, while only the base's batching creates it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from robustcnn.attacks.result import SmallestFound
from robustcnn.batching import autocast_for


@dataclass
class PerturbContext:
    """What ``perturb`` gets besides the tensors: deterministic noise, forward helpers, counters."""

    device: torch.device
    eps_index: int
    batch_index: int
    full_batch: int  # size of the batch before inactive samples were dropped
    active: Tensor  # long [n]: positions of the attacked samples inside the full batch
    seed: int
    bounds: tuple[float, float] = (0.0, 1.0)
    amp: bool = False
    counters: dict[str, int] = field(default_factory=lambda: {"forward": 0, "gradient": 0})
    #: Logits an attack already computed for some of the candidates it returns (see :meth:`vouch`).
    known_logits: Tensor | None = None
    known: Tensor | None = None
    known_model: nn.Module | None = None
    #: A minimum-norm attack's verified examples of the attacked samples (None for other attacks).
    smallest: SmallestFound | None = None

    def amp_active(self) -> bool:
        """bf16 autocast is really on (CUDA only): logits computed under it are not the fp32 answer."""
        return self.amp and self.device.type == "cuda"

    def vouch(self, model: nn.Module, logits: Tensor, known: Tensor) -> None:
        """Hand the base ``model``'s fp32 logits of the returned candidates where ``known`` is True.

        Why: an iterative attack checks every iterate with the forward pass of its gradient step,
        so for the candidates it returns the base's re-measurement is a second identical forward
        pass (for PGD-10 at a large eps, 5% of the whole cost). Only what the base would compute
        itself may be vouched for: the deterministic model's plain fp32 output on exactly the
        returned tensor (not an EOT average, not a bf16 pass, not a surrogate's output). The base
        re-measures every row that is not vouched for or that its projection changes by a bit.
        """
        self.known_logits, self.known, self.known_model = logits, known, model

    def random(self, shape: tuple[int, ...], stream: int = 0, kind: str = "uniform") -> Tensor:
        """Noise for the attacked samples that does not depend on which other samples are attacked.

        Drawn for the full batch from a generator seeded by (seed, batch, eps, stream) and then
        indexed, so the plain computation and the shortcut one see identical noise per sample.
        """
        generator = torch.Generator(device=self.device)
        generator.manual_seed(hash((self.seed, self.batch_index, self.eps_index, stream)) & 0x7FFF_FFFF_FFFF)
        full_shape = (self.full_batch, *shape)
        if kind == "normal":
            full = torch.randn(full_shape, generator=generator, device=self.device)
        else:
            full = torch.rand(full_shape, generator=generator, device=self.device)
        return full.index_select(0, self.active)

    def for_samples(self, idx: Tensor) -> PerturbContext:
        """The context of the samples ``idx`` of this one: the same noise per sample, shared counters."""
        return PerturbContext(
            device=self.device,
            eps_index=self.eps_index,
            batch_index=self.batch_index,
            full_batch=self.full_batch,
            active=self.active.index_select(0, idx),
            seed=self.seed,
            bounds=self.bounds,
            amp=self.amp,
            counters=self.counters,
        )

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        return autocast_for(self.device, self.amp)

    def logits(self, model: nn.Module, x: Tensor) -> Tensor:
        """Forward pass without gradients (counted)."""
        self.counters["forward"] += x.shape[0]
        with torch.no_grad(), self.autocast():
            return model(x).float()


def goal_reached(logits: Tensor, y: Tensor, targets: Tensor | None) -> Tensor:
    """Untargeted: the prediction differs from the label; targeted: it equals the target."""
    pred = logits.argmax(1)
    return pred == targets if targets is not None else pred != y
