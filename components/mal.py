"""Block kind `mal`, Memory as a Layer (Titans eqs. 29-31): the neural memory over [p ; x],
then sliding-window attention over its outputs (the memory's outputs on p are the prefix every
query sees): o = SWA(LMM([p ; x]))."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field
from torch import Tensor, nn

from components.attention import Attention, KVCache
from components.hybrid import HybridSpec
from components.neural_memory import (
    NeuralMemory,
    NeuralMemoryState,
    over_prefix,
    primed,
)
from components.persistent import PersistentTokens


class MALSpec(HybridSpec):
    """Titans (MAL): a memory layer followed by sliding-window attention (Samba/H3-style)."""

    kind: Literal["mal"] = "mal"
    window: int = Field(2048, ge=1)
    """Sliding-window width of the attention layer (the paper uses 2048)."""

    def build(self, dim: int, heads: int) -> MemoryAsLayer:
        return MemoryAsLayer(
            self.memory.build(dim, heads),
            self.attention.build(dim, heads, window=self.window),
            self.persistent.build(dim) if self.persistent is not None else None,
        )


@dataclass
class MALState:
    memory: NeuralMemoryState
    attention: KVCache
    prefix: Tensor | None
    """The memory's outputs on the persistent tokens (b, p, dim): the attention's prefix."""


class MemoryAsLayer(nn.Module):
    def __init__(self, memory: NeuralMemory, attention: Attention, persistent: PersistentTokens | None) -> None:
        super().__init__()
        self.memory, self.attention, self.persistent = memory, attention, persistent

    def init_state(self, batch: int) -> MALState:
        prefix = self.persistent(batch) if self.persistent is not None else None
        y_prefix, mem = primed(self.memory, prefix, batch)
        return MALState(mem, self.attention.init_state(batch), y_prefix)

    def forward(self, x: Tensor, state: MALState | None = None) -> tuple[Tensor, MALState | None]:
        if state is None:
            prefix = self.persistent(x.shape[0]) if self.persistent is not None else None
            y_prefix, y, _ = over_prefix(self.memory, x, None, prefix)  # eq. 30
            o, _ = self.attention(y, None, y_prefix)  # eq. 31
            return o, None
        _, y, mem = over_prefix(self.memory, x, state.memory, None)
        o, attn = self.attention(y, state.attention, state.prefix)
        return o, MALState(mem, attn, state.prefix)
