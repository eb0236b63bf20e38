"""Multi-query associative recall (Zoology, Arora et al. 2023, arXiv 2312.04927).

`kv` key-value pairs `k_1 v_1 ... k_kv v_kv` open the sequence; later every key is queried once
at a power-law distributed gap, and the model must emit the paired value right after reading the
queried key. Keys come from [1, V/2), values from [V/2, V); 0 is filler (or random tokens).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from components.base import SpecRuleError
from titans_nas.tasks.base import IGNORE, Batch, TaskBase


class MQARSpec(TaskBase):
    """Zoology's MQAR: accuracy of the value predicted at each query position."""

    kind: Literal["mqar"] = "mqar"
    seq_len: int = Field(256, ge=8)
    """Length of the generated example (the model reads seq_len - 1 tokens); even."""
    num_kv_pairs: int = Field(16, ge=1)
    """Key-value pairs stored and queried (4 * pairs <= seq_len)."""
    vocab: int = Field(8192, ge=8)
    """Token ids used (the paper: 8192); keys below vocab/2, values above."""
    power_a: float = Field(0.01, gt=0.0, le=1.0)
    """Gap distribution p(g) ~ a (g + 1)^(a - 1): small a favours short gaps; 1 is uniform."""
    random_non_queries: bool = False
    """Fill the non-query slots with random tokens instead of 0 (Zoology's newer default)."""

    @model_validator(mode="after")
    def _fits(self) -> MQARSpec:
        if self.seq_len % 2:
            raise SpecRuleError("seq_len", f"must be even, got {self.seq_len}")
        if 4 * self.num_kv_pairs > self.seq_len:
            raise SpecRuleError("num_kv_pairs", f"4 * {self.num_kv_pairs} pairs do not fit in seq_len {self.seq_len}")
        if self.vocab // 2 - 1 < self.num_kv_pairs:
            raise SpecRuleError("vocab", f"{self.vocab} ids cannot hold {self.num_kv_pairs} distinct keys and values")
        return self

    @property
    def vocab_size(self) -> int:
        return self.vocab

    def sample(self, batch: int, generator: torch.Generator, split: str = "train") -> Batch:
        kv, L, V = self.num_kv_pairs, self.seq_len, self.vocab
        # distinct keys in [1, V/2) and values in [V/2, V) per example
        keys = torch.argsort(torch.rand(batch, V // 2 - 1, generator=generator), dim=1)[:, :kv] + 1
        values = torch.argsort(torch.rand(batch, V - V // 2, generator=generator), dim=1)[:, :kv] + V // 2
        context = torch.stack([keys, values], dim=2).reshape(batch, 2 * kv)
        # one gap slot per key, drawn without replacement from the power law
        space = (L - 2 * kv) // 2
        p = self.power_a * (torch.arange(space, dtype=torch.float64) + 1) ** (self.power_a - 1)
        gaps = torch.multinomial(p.expand(batch, -1), kv, replacement=False, generator=generator)
        if self.random_non_queries:
            rest = torch.randint(1, V, (batch, L - 2 * kv), generator=generator)
        else:
            rest = torch.zeros(batch, L - 2 * kv, dtype=torch.long)
        labels = torch.full((batch, L - 2 * kv), IGNORE, dtype=torch.long)
        rows = torch.arange(batch)[:, None]
        rest[rows, 2 * gaps] = keys
        rest[rows, 2 * gaps + 1] = values
        labels[rows, 2 * gaps + 1] = values
        example = torch.cat([context, rest], dim=1)
        labels = torch.cat([torch.full((batch, 2 * kv), IGNORE, dtype=torch.long), labels], dim=1)
        # next-token alignment: at a queried key's position the target is its value
        return Batch(example[:, :-1], labels[:, 1:])
