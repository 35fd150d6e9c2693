"""Restarts and early stop: the per-sample bookkeeping every iterative attack shares, written once.

An iterative attack (PGD, APGD, Square, the torchattacks PGD loop) searches each sample's eps ball
several times from different starts. What it reports per sample is the same everywhere:

* the first candidate that reaches the attack's goal is the sample's result, and a later candidate
  never replaces it (as AutoAttack keeps its best point), so no sample is reported robust because a
  later step or restart wandered back;
* a sample that never reaches the goal reports the point its attack ends at (or, for Square, its
  best point over the restarts);
* with ``early_stop`` a fooled sample is attacked no further: a restart attacks only the samples not
  fooled yet, and inside a restart a sample leaves the batch the moment it reaches the goal. This
  saves work but changes no result, because each sample's computation and random start do not
  depend on which other samples are attacked. Without ``early_stop`` every restart attacks every
  sample (the plain computation that the shortcut must match).

:class:`Restarts` holds that state for one ``perturb`` call; :class:`SampleRows` is the base of an
attack's row-aligned loop state, so that dropping the finished samples is one call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import TypeVar

import torch
from torch import Tensor

Rows = TypeVar("Rows", bound="SampleRows")


@dataclasses.dataclass
class SampleRows:
    """Loop state of an attack in which every tensor field has one row per attacked sample.

    Subclasses declare their tensors (the samples' positions ``idx``, their inputs, the current
    iterate, ...); :meth:`rows` keeps a subset of the samples in all of them at once, so no
    attack can forget one tensor when samples leave the batch.
    """

    #: Positions of these rows inside the batch that ``perturb`` was given.
    idx: Tensor

    def rows(self: Rows, keep: Tensor) -> Rows:
        """The state of the samples where ``keep`` is True (fields that are no tensor stay as they are)."""
        kept = {
            f.name: value[keep]
            for f in dataclasses.fields(self)
            if isinstance(value := getattr(self, f.name), Tensor)
        }
        return dataclasses.replace(self, **kept)


State = TypeVar("State", bound=SampleRows)


class Restarts:
    """Per-sample outcome of one ``perturb`` call across restarts; see the module docstring.

    ``for restart, idx in Restarts(x, count, early_stop=...)`` yields each restart with the samples
    it attacks (positions in ``x``) and ends early once every sample is fooled. The attack reports
    what each restart finds with :meth:`record_hits` (during the search) and :meth:`keep_misses`
    (at its end); :attr:`result` is what ``perturb`` returns.
    """

    def __init__(self, x: Tensor, count: int, *, early_stop: bool) -> None:
        #: The candidate reported per sample so far (the clean input until an attack writes one).
        self.result = x.clone()
        #: Samples whose reported candidate reaches the goal.
        self.fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        #: The model's logits of each first hit, when the attack keeps them (see :meth:`keep_logits`).
        self.logits: Tensor | None = None
        self.count = count
        self.early_stop = early_stop

    def __iter__(self) -> Iterator[tuple[int, Tensor]]:
        for restart in range(self.count):
            idx = self.pending()
            if idx.numel() == 0:
                return
            yield restart, idx

    def pending(self) -> Tensor:
        """The samples the next restart attacks: those not fooled yet (early stop), else all."""
        if self.early_stop:
            return (~self.fooled).nonzero().flatten()
        return torch.arange(self.fooled.shape[0], device=self.fooled.device)

    def keep_logits(self, like: Tensor) -> None:
        """From now on also keep the logits of first hits (rows shaped like ``like``'s).

        PGD hands them to the base (``ctx.vouch``) so that it need not run the same forward pass a
        second time; an attack calls this only while its logits are the deployed model's fp32 output.
        """
        if self.logits is None:
            self.logits = like.new_empty((self.result.shape[0], like.shape[1]))

    def record_hits(self, hit: Tensor, candidate: Tensor, idx: Tensor, logits: Tensor | None = None) -> None:
        """Samples ``idx`` whose ``candidate`` reaches the goal (``hit``) and had no hit yet keep it.

        ``logits`` (the candidates' logits) are kept too once :meth:`keep_logits` was called.
        """
        newly = hit & ~self.fooled.index_select(0, idx)
        rows = idx[newly]
        self.result[rows] = candidate[newly]
        self.fooled[rows] = True
        if logits is not None and self.logits is not None:
            self.logits[rows] = logits[newly]

    def keep_misses(self, candidate: Tensor, idx: Tensor, where: Tensor | None = None) -> Tensor:
        """Samples ``idx`` not fooled (and where ``where`` holds) report ``candidate``; returns that mask."""
        missed = ~self.fooled.index_select(0, idx)
        if where is not None:
            missed = missed & where
        self.result[idx[missed]] = candidate[missed]
        return missed

    def drop_finished(self, finished: Tensor, state: State) -> State | None:
        """With early stop, the samples that reached the goal leave ``state``; None when none is left.

        Without early stop the state is returned unchanged: every sample runs every step.
        """
        if not self.early_stop:
            return state
        keep = ~finished
        kept = int(keep.sum())  # one host sync per step, none per tensor
        if kept == 0:
            return None
        if kept == keep.shape[0]:
            return state
        return state.rows(keep)


def optional_rows(tensor: Tensor | None, idx: Tensor) -> Tensor | None:
    """``tensor``'s rows ``idx``, or None without a tensor (the targets of an untargeted attack)."""
    return tensor.index_select(0, idx) if tensor is not None else None
