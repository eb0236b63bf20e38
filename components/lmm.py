"""Block kind `lmm`: the neural memory alone as the sequence mixer ("Titans (LMM)"), inside the
Transformer++ macro-architecture (pre-RMSNorm, residuals, SwiGLU MLP)."""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from components.base import BlockKindSpec, check_parts
from components.neural_memory import (
    NeuralMemory,
    NeuralMemorySpec,
    NeuralMemoryState,
    over_prefix,
    primed,
)
from components.persistent import PersistentSpec, PersistentTokens


class LMMSpec(BlockKindSpec):
    """Titans (LMM): the long-term memory module is the sequence mixer; no attention."""

    kind: Literal["lmm"] = "lmm"
    memory: NeuralMemorySpec = NeuralMemorySpec()
    """The long-term memory."""
    persistent: PersistentSpec | None = None
    """Persistent tokens the memory reads before the sequence (eq. 19); null = none."""

    def describe(self) -> str:
        """The mixer in words (the model card's first line)."""
        return "the neural long-term memory as the sequence mixer (Titans LMM)"

    def check(self, dim: int, heads: int) -> None:
        check_parts(self, dim, heads, "memory")

    def build(self, dim: int, heads: int) -> MemoryMixer:
        persistent = self.persistent.build(dim) if self.persistent is not None else None
        return MemoryMixer(self.memory.build(dim, heads), persistent)


class MemoryMixer(nn.Module):
    """y = LMM([p ; x]) restricted to the positions of x."""

    def __init__(self, memory: NeuralMemory, persistent: PersistentTokens | None) -> None:
        super().__init__()
        self.memory, self.persistent = memory, persistent

    def init_state(self, batch: int) -> NeuralMemoryState:
        prefix = self.persistent(batch) if self.persistent is not None else None
        return primed(self.memory, prefix, batch)[1]

    def forward(self, x: Tensor, state: NeuralMemoryState | None = None) -> tuple[Tensor, NeuralMemoryState | None]:
        prefix = self.persistent(x.shape[0]) if self.persistent is not None and state is None else None
        _, y, state = over_prefix(self.memory, x, state, prefix)
        return y, state
