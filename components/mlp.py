"""SwiGLU feed-forward layer (Shazeer 2020), the MLP of every block (Titans T2 §3.3)."""

from __future__ import annotations

import math

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from components.base import Spec
from components.ops.memory import cpu_loop


class MLPSpec(Spec):
    """SwiGLU MLP: `W_down (silu(W_gate x) * W_up x)`, no biases."""

    ratio: float = Field(8.0 / 3.0, gt=0.0, le=16.0)
    """Hidden width as a multiple of the model dim (8/3 keeps the parameters of a 4x GELU MLP)."""
    multiple_of: int = Field(8, ge=1, le=4096)
    """The hidden width is rounded up to a multiple of this (hardware-friendly shapes)."""

    def hidden(self, dim: int) -> int:
        return self.multiple_of * math.ceil(self.ratio * dim / self.multiple_of)

    def build(self, dim: int) -> SwiGLU:
        return SwiGLU(dim, self.hidden(dim))


class SwiGLU(nn.Module):
    """On CPU in float32 / float64 the product silu(gate) up runs in the C++ kernel, one pass each
    way keeping only the projection's output for the backward; elsewhere torch's ops."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """(b, n, d) -> (b, n, d)"""
        z = self.gate_up(x)  # [gate | up]
        if cpu_loop.unavailable(z) is None:  # on CPU one pass each way in the C++ kernel
            return self.down(cpu_loop.KernelRows.apply(z, "swiglu"))
        gate, up = z.chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)
