"""What every task provides: seeded batches of (inputs, targets) and a metric.

Targets are next-token aligned with `inputs` (target t is the token the model must emit after
reading input t); positions that are not scored hold IGNORE.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from components.base import Spec

IGNORE = -100


class Batch(NamedTuple):
    inputs: Tensor
    """(b, n) int64 token ids."""
    targets: Tensor
    """(b, n) int64; IGNORE where the position is not trained on."""
    scored: Tensor | None = None
    """(b, n) bool: the positions the metric reads; None = every position with a target."""

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(None if t is None else t.to(device) for t in self))

    def metric_mask(self) -> Tensor:
        return self.scored if self.scored is not None else self.targets != IGNORE


class TaskBase(Spec):
    """Common behaviour; each task adds `kind` and its own fields."""

    metric: ClassVar[str] = "accuracy"
    """Name of the task metric `score` reports (higher is better unless `metric_mode` says min)."""
    metric_mode: ClassVar[str] = "max"

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Token ids the task uses are in [0, vocab_size)."""

    @abstractmethod
    def sample(self, batch: int, generator: torch.Generator, split: str = "train") -> Batch:
        """A batch drawn with `generator` (the only source of randomness: seeds reproduce).
        `split` is "train" or "eval"; tasks on real text draw from disjoint documents."""

    def readout(self, dim: int) -> nn.Module | None:
        """A head the task trains with the model in place of the model's LM head: it maps the
        model's final features (b, n, dim) to the logits `score` reads, and its weights are saved
        with the model's. None (every task but MAD compression): the next-token LM head."""
        return None

    def score(self, logits: Tensor, batch: Batch) -> dict[str, tuple[float, float]]:
        """Sums to aggregate over evaluation batches: metric -> (numerator, denominator).
        Default: accuracy of the argmax over scored positions."""
        scored = batch.metric_mask()
        correct = (logits.argmax(-1) == batch.targets) & scored
        return {"accuracy": (float(correct.sum()), float(scored.sum()))}
