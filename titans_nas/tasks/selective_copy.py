"""Selective copying (Mamba, Gu & Dao 2023, §4.1): M data tokens scattered among noise, then M
markers; at the i-th marker the model must emit the i-th data token."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from components.base import SpecRuleError
from titans_nas.tasks.base import IGNORE, Batch, TaskBase

NOISE = 0


class SelectiveCopySpec(TaskBase):
    """Inputs: `length + num_tokens` slots holding the data tokens in order at random positions
    (noise 0 elsewhere), then `num_tokens` markers (id vocab - 1). Scored at the markers."""

    kind: Literal["selective_copy"] = "selective_copy"
    length: int = Field(256, ge=1)
    """Noise slots among which the data tokens are scattered (the paper: 4096)."""
    num_tokens: int = Field(16, ge=1)
    """Data tokens to remember and copy, in order (the paper: 16)."""
    vocab: int = Field(16, ge=4)
    """Token ids: 0 noise, 1 .. vocab - 2 data, vocab - 1 marker (the paper: 16)."""

    @model_validator(mode="after")
    def _fits(self) -> SelectiveCopySpec:
        if self.num_tokens > self.length:
            raise SpecRuleError("num_tokens", f"{self.num_tokens} tokens need at least as many noise slots")
        return self

    @property
    def vocab_size(self) -> int:
        return self.vocab

    def sample(self, batch: int, generator: torch.Generator, split: str = "train") -> Batch:
        M, slots = self.num_tokens, self.length + self.num_tokens
        data = torch.randint(1, self.vocab - 1, (batch, M), generator=generator)
        positions = torch.argsort(torch.rand(batch, slots, generator=generator), dim=1)[:, :M].sort(dim=1).values
        body = torch.full((batch, slots), NOISE, dtype=torch.long)
        body.scatter_(1, positions, data)
        inputs = torch.cat([body, torch.full((batch, M), self.vocab - 1, dtype=torch.long)], dim=1)
        targets = torch.cat([torch.full((batch, slots), IGNORE, dtype=torch.long), data], dim=1)
        return Batch(inputs, targets)
