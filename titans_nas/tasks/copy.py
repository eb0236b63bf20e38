"""Copy: read L random symbols and a separator, then reproduce the symbols in order."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from titans_nas.tasks.base import IGNORE, Batch, TaskBase

SEP = 1
FIRST_SYMBOL = 2


class CopySpec(TaskBase):
    """Inputs `x_1..x_L SEP x_1..x_{L-1}`; scored on emitting `x_1..x_L` after the separator."""

    kind: Literal["copy"] = "copy"
    length: int = Field(16, ge=1)
    """Number of symbols to copy (the sequence is 2 * length tokens)."""
    symbols: int = Field(16, ge=2)
    """Alphabet size of the copied symbols."""

    @property
    def vocab_size(self) -> int:
        return FIRST_SYMBOL + self.symbols

    def sample(self, batch: int, generator: torch.Generator, split: str = "train") -> Batch:
        x = torch.randint(FIRST_SYMBOL, self.vocab_size, (batch, self.length), generator=generator)
        sep = torch.full((batch, 1), SEP)
        inputs = torch.cat([x, sep, x[:, :-1]], dim=1)
        targets = torch.cat([torch.full_like(x, IGNORE), x], dim=1)
        return Batch(inputs, targets)
