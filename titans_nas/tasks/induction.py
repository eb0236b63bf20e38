"""Induction heads (Mamba, Gu & Dao 2023, §4.1; Olsson et al. 2022): a trigger token followed by
some token t appears once in random text; the sequence ends with the trigger, and the model must
emit t."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from titans_nas.tasks.base import IGNORE, Batch, TaskBase


class InductionSpec(TaskBase):
    """Random tokens from [0, vocab - 1) with one `trigger t` pair; the last token is the trigger
    (id vocab - 1) and only that position is scored (target t)."""

    kind: Literal["induction"] = "induction"
    seq_len: int = Field(256, ge=4)
    """Sequence length (the paper trains at 256 and tests up to 2^20)."""
    vocab: int = Field(16, ge=3)
    """Token ids, the trigger included (the paper: 16)."""

    @property
    def vocab_size(self) -> int:
        return self.vocab

    def sample(self, batch: int, generator: torch.Generator, split: str = "train") -> Batch:
        trigger = self.vocab - 1
        inputs = torch.randint(0, trigger, (batch, self.seq_len), generator=generator)
        where = torch.randint(0, self.seq_len - 2, (batch,), generator=generator)
        rows = torch.arange(batch)
        answer = inputs[rows, where + 1]
        inputs[rows, where] = trigger
        inputs[:, -1] = trigger
        targets = torch.full_like(inputs, IGNORE)
        targets[:, -1] = answer
        return Batch(inputs, targets)
