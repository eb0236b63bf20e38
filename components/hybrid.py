"""What the Titans hybrids (MAC, MAG, MAL) share: an attention, a neural memory, persistent tokens."""

from __future__ import annotations

from components.attention import AttentionSpec
from components.base import BlockKindSpec, check_parts
from components.neural_memory import NeuralMemorySpec
from components.persistent import PersistentSpec


class HybridSpec(BlockKindSpec):
    """Fields and rules common to the block kinds that combine attention and memory."""

    attention: AttentionSpec = AttentionSpec()
    """The attention (short-term memory)."""
    memory: NeuralMemorySpec = NeuralMemorySpec()
    """The neural long-term memory."""
    persistent: PersistentSpec | None = PersistentSpec(num_tokens=128)
    """Persistent tokens (eq. 19; the paper uses 128); null = none."""

    def check(self, dim: int, heads: int) -> None:
        check_parts(self, dim, heads, "attention", "memory")
