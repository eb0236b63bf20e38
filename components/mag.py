"""Block kind `mag`, Memory as a Gate (Titans eqs. 26-28): sliding-window attention over
[p ; x] and the neural memory over [p ; x], combined by a gate:
    o = RMSNorm(y) * sigmoid(RMSNorm(LMM([p ; x])))."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
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


class MAGSpec(HybridSpec):
    """Titans (MAG): short-term sliding-window attention and long-term memory in parallel
    branches, gated."""

    kind: Literal["mag"] = "mag"
    window: int = Field(2048, ge=1, le=2**24)
    """Sliding-window width of the attention branch (the paper uses 2048)."""

    def describe(self) -> str:
        """The mixer in words (the model card's first line)."""
        return f"memory as gate (MAG): sliding-window attention (window {self.window}) gated with the memory branch"

    def build(self, dim: int, heads: int) -> MemoryAsGate:
        return MemoryAsGate(
            self.attention.build(dim, heads, window=self.window),
            self.memory.build(dim, heads),
            self.persistent.build(dim) if self.persistent is not None else None,
            dim,
        )


@dataclass
class MAGState:
    attention: KVCache
    memory: NeuralMemoryState


class MemoryAsGate(nn.Module):
    def __init__(
        self, attention: Attention, memory: NeuralMemory, persistent: PersistentTokens | None, dim: int
    ) -> None:
        super().__init__()
        self.attention, self.memory, self.persistent = attention, memory, persistent
        # eq. 28: "normalize the outputs using learnable vector-valued weights, then a non-linearity"
        self.norm_attention, self.norm_memory = RMSNorm(dim, eps=1e-6), RMSNorm(dim, eps=1e-6)

    def init_state(self, batch: int) -> MAGState:
        prefix = self.persistent(batch) if self.persistent is not None else None
        return MAGState(self.attention.init_state(batch), primed(self.memory, prefix, batch)[1])

    def forward(self, x: Tensor, state: MAGState | None = None) -> tuple[Tensor, MAGState | None]:
        prefix = self.persistent(x.shape[0]) if self.persistent is not None else None
        y, attn_state = self.attention(x, state.attention if state else None, prefix)  # eq. 27
        _, m, mem_state = over_prefix(
            self.memory, x, state.memory if state else None, prefix if state is None else None
        )
        o = self.norm_attention(y) * torch.sigmoid(self.norm_memory(m))  # eq. 28
        return o, (MAGState(attn_state, mem_state) if state is not None else None)
