"""Block kind `swa`: sliding-window causal attention alone, the short-memory baseline."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from components.attention import AttentionMixer, AttentionSpec
from components.base import BlockKindSpec, check_parts
from components.persistent import PersistentSpec


class SWASpec(BlockKindSpec):
    """Sliding-window attention: each token sees itself and the window - 1 tokens before it
    (plus persistent tokens, if any). Cost O(n * window)."""

    kind: Literal["swa"] = "swa"
    window: int = Field(2048, ge=1, le=2**24)
    """Tokens each query sees, itself included (the paper uses 2048)."""
    attention: AttentionSpec = AttentionSpec()
    """The attention layer."""
    persistent: PersistentSpec | None = None
    """Persistent tokens every query sees (eq. 19); null = none."""

    def describe(self) -> str:
        """The mixer in words (the model card's first line)."""
        return f"sliding-window attention (window {self.window})"

    def check(self, dim: int, heads: int) -> None:
        check_parts(self, dim, heads, "attention")

    def build(self, dim: int, heads: int) -> AttentionMixer:
        persistent = self.persistent.build(dim) if self.persistent is not None else None
        return AttentionMixer(self.attention.build(dim, heads, window=self.window), persistent)
