"""Persistent memory (Titans eq. 19): N_p learnable, input-independent tokens prepended to the
sequence a block mixes. Letters: p persistent tokens, d model feature."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from components.base import Spec


class PersistentSpec(Spec):
    """Learnable tokens every query sees (task knowledge; also an attention sink)."""

    num_tokens: int = Field(4, ge=1, le=4096)
    """N_p, the number of persistent tokens (the paper uses 128)."""

    def build(self, dim: int) -> PersistentTokens:
        return PersistentTokens(self.num_tokens, dim)


class PersistentTokens(nn.Module):
    def __init__(self, num_tokens: int, dim: int) -> None:
        super().__init__()
        # unit scale, like the pre-normed tokens they are prepended to
        self.tokens = nn.Parameter(torch.randn(num_tokens, dim))

    def forward(self, batch: int) -> Tensor:
        """-> (b, p, d): the same tokens for every sequence."""
        return self.tokens.expand(batch, -1, -1)
