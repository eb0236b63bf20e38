"""Block kind `attention`: full causal multi-head attention, the Transformer++ baseline."""

from __future__ import annotations

from typing import Literal

from components.attention import AttentionMixer, AttentionSpec
from components.base import BlockKindSpec, check_parts
from components.persistent import PersistentSpec


class TransformerSpec(BlockKindSpec):
    """Transformer++ (Llama-style): full causal attention as the sequence mixer."""

    kind: Literal["attention"] = "attention"
    attention: AttentionSpec = AttentionSpec()
    """The attention layer."""
    persistent: PersistentSpec | None = None
    """Persistent tokens every query sees (eq. 19); null = none."""

    def describe(self) -> str:
        """The mixer in words (the model card's first line)."""
        return "full causal attention (Transformer++)"

    def check(self, dim: int, heads: int) -> None:
        check_parts(self, dim, heads, "attention")

    def build(self, dim: int, heads: int) -> AttentionMixer:
        persistent = self.persistent.build(dim) if self.persistent is not None else None
        return AttentionMixer(self.attention.build(dim, heads), persistent)
