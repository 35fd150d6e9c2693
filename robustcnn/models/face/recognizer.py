"""Verification and identification on top of any face embedder.

Why separate from the network: attacks, calibration and the study only need ``embed`` and the
decision rules, so a user's own TorchScript embedder plugs in the same way as the ported face-api net.
Descriptors are compared by Euclidean distance (face-api's rule: same person below ~0.6; its
descriptors are not unit-norm, so cosine would be a different rule).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from robustcnn.errors import ConfigError

#: face-api's published decision threshold on the Euclidean distance of two descriptors.
DEFAULT_THRESHOLD = 0.6


class FaceRecognizer:
    """An embedder ([N, 3, H, W] RGB in [0, 1] -> [N, D]) plus a verification threshold.

    ``threshold`` is the distance below which two faces count as the same person.
    ``weights_sha256`` is the sha256 of the file the embedder was loaded from (None for one built in
    memory): a face job's results are keyed by it, so changed weights are never taken for the old ones.
    """

    def __init__(
        self,
        embedder: nn.Module,
        threshold: float = DEFAULT_THRESHOLD,
        name: str = "face",
        weights_sha256: str | None = None,
    ) -> None:
        if not threshold > 0:
            raise ConfigError(f"face verification threshold must be > 0, got {threshold}")
        self.embedder = embedder.eval()
        for p in self.embedder.parameters():
            p.requires_grad_(False)
        self.threshold = float(threshold)
        self.name = name
        self.weights_sha256 = weights_sha256

    def to(self, device: torch.device | str) -> FaceRecognizer:
        self.embedder.to(device)
        return self

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Raw descriptors [N, D] of faces ``x`` [N, 3, H, W] in [0, 1]; differentiable w.r.t. ``x``."""
        return self.embedder(x)

    @torch.no_grad()
    def embed_batched(self, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Descriptors without gradients, in batches (galleries, evaluation draws)."""
        return torch.cat([self.embedder(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])

    @staticmethod
    def distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Row-wise Euclidean distance of descriptors ``a`` [N, D] and ``b`` [N, D] (or [D], broadcast)."""
        return (a - b).norm(dim=-1)

    def verify(self, descriptors: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """Bool [N]: is each descriptor the same person as ``reference`` ([N, D] or [D])?"""
        return self.distance(descriptors, reference) < self.threshold


@dataclass(frozen=True)
class Calibration:
    """A threshold chosen at a target false-accept rate, with the distributions it came from."""

    threshold: float
    target_far: float
    measured_far: float
    impostor_distances: list[float]
    genuine_distances: list[float]


def calibrate_threshold(
    impostor_distances: torch.Tensor, far: float = 0.01, genuine_distances: torch.Tensor | None = None
) -> Calibration:
    """The largest threshold whose false-accept rate on ``impostor_distances`` is at most ``far``.

    Impostor pairs are different people; a pair is accepted when its distance is below the threshold,
    so the threshold is the k-th smallest impostor distance with k = floor(far * n) (ties excluded).
    """
    if not 0.0 <= far < 1.0:
        raise ConfigError(f"false-accept rate must be in [0, 1), got {far}: e.g. face.far=0.01")
    impostors = impostor_distances.detach().flatten().double().sort().values
    if impostors.numel() < 2:
        raise ConfigError("calibrating a threshold needs at least 2 impostor pairs (3 identities)")
    k = int(far * impostors.numel())
    threshold = float(impostors[k])
    measured = float((impostors < threshold).double().mean())
    genuine = [] if genuine_distances is None else genuine_distances.detach().flatten().double().tolist()
    return Calibration(threshold, far, measured, impostors.tolist(), genuine)


def impostor_pairs(descriptors: torch.Tensor, identities: list[str]) -> torch.Tensor:
    """Distances of every unordered pair of descriptors whose identities differ."""
    if descriptors.shape[0] != len(identities):
        raise ConfigError(f"{descriptors.shape[0]} descriptors for {len(identities)} identity labels")
    d = torch.cdist(descriptors, descriptors)
    labels = {name: i for i, name in enumerate(sorted(set(identities)))}
    ids = torch.tensor([labels[name] for name in identities])
    upper = torch.triu(torch.ones_like(d, dtype=torch.bool), diagonal=1)
    return d[upper & (ids[:, None] != ids[None, :])]
