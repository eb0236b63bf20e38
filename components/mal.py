"""Block kind `mal`, Memory as a Layer (Titans eqs. 29-31): the neural memory over [p ; x],
then sliding-window attention over its outputs (the memory's outputs on p are the prefix every
query sees). Both are residual layers, as every layer of the paper's blocks (T1 §4.4), the
memory layer's output normalised before the attention reads it (docs/decisions/0006):

    m = LMM([p ; x])                  (eq. 30)
    h = RMSNorm([p ; x] + m)          the memory layer with its residual, at unit scale
    o = m + SWA(h)                    (eq. 31; with the block's residual: x + m + SWA(h))

Without the norm the attention reads the memory output at RMS ~0.18 and its logits are ~0.01:
uniform attention."""

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
from components.norm import RMSNorm
from components.persistent import PersistentTokens


class MALSpec(HybridSpec):
    """Titans (MAL): a memory layer followed by sliding-window attention (Samba/H3-style)."""

    kind: Literal["mal"] = "mal"
    window: int = Field(2048, ge=1, le=2**24)
    """Sliding-window width of the attention layer (the paper uses 2048)."""

    def describe(self) -> str:
        """The mixer in words (the model card's first line)."""
        return f"memory as layer (MAL): the memory, then sliding-window attention (window {self.window})"

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
    """The memory layer's outputs on the persistent tokens (b, p, dim): the attention's prefix."""


class MemoryAsLayer(nn.Module):
    def __init__(self, memory: NeuralMemory, attention: Attention, persistent: PersistentTokens | None) -> None:
        super().__init__()
        self.memory, self.attention, self.persistent = memory, attention, persistent
        self.norm = RMSNorm(memory.dim, eps=1e-6)

    def init_state(self, batch: int) -> MALState:
        prefix = self.persistent(batch) if self.persistent is not None else None
        m_prefix, mem = primed(self.memory, prefix, batch)
        return MALState(mem, self.attention.init_state(batch), self._layer(prefix, m_prefix))

    def _layer(self, x: Tensor | None, m: Tensor | None) -> Tensor | None:
        """The memory layer's output as the attention reads it: RMSNorm(x + m)."""
        return None if x is None else self.norm(x + m)

    def forward(self, x: Tensor, state: MALState | None = None) -> tuple[Tensor, MALState | None]:
        if state is None:
            prefix = self.persistent(x.shape[0]) if self.persistent is not None else None
            m_prefix, m, _ = over_prefix(self.memory, x, None, prefix)  # eq. 30
            a, _ = self.attention(self._layer(x, m), None, self._layer(prefix, m_prefix))  # eq. 31
            return m + a, None
        _, m, mem = over_prefix(self.memory, x, state.memory, None)
        a, attn = self.attention(self._layer(x, m), state.attention, state.prefix)
        return m + a, MALState(mem, attn, state.prefix)
