"""The Triton kernels' launcher for `kernel_loop.KernelLoop` (`triton_linear` for a depth-1
memory, `triton_mlp` for depth 2): float32 on chip, the inputs as they come (bf16 is cast on
load), one program per (batch, head).
"""

from __future__ import annotations

import torch

from components.ops.memory.kernel_loop import KernelLoop, reach
from components.ops.memory.triton_linear import _linear_bwd, _linear_fwd
from components.ops.memory.triton_mlp import _mlp_bwd, _mlp_fwd

_KERNELS = {1: (_linear_fwd, _linear_bwd), 2: (_mlp_fwd, _mlp_bwd)}

# `auto` takes the Triton kernels only where each layer's whole state tile is at most this many
# floats: they keep every state tile on chip (no tiling over the hidden width yet), so larger
# memories would spill or fail to compile, and no GPU has measured them (docs/decisions/0007)
AUTO_MAX_TILE = 64 * 64


def supported(setting, M: tuple[torch.Tensor, ...], q: torch.Tensor) -> str | None:
    """Why the kernels cannot run whole chunks q (B, K, c, d) from states M (None: they can)."""
    return reach("triton", setting, M, q)


def chosen_by_auto(M: tuple[torch.Tensor, ...]) -> bool:
    return all(w.shape[-2] * w.shape[-1] <= AUTO_MAX_TILE for w in M)


class Triton:
    """Launches the kernels of a depth-L memory, one program per (batch, head)."""

    def dtype(self, state_dtype: torch.dtype) -> torch.dtype:
        return torch.float32

    def inputs(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return t

    def forward(self, L, B, tensors, K, cap, flags):
        _KERNELS[L][0][(B,)](*tensors, K, K * flags["C"], cap, **flags)

    def backward(self, L, B, tensors, K, cap, flags):
        _KERNELS[L][1][(B,)](*tensors, K, K * flags["C"], cap, **flags)


class TritonLoop:
    @staticmethod
    def run(setting, q, k, v, co, M, S):
        return KernelLoop.run(Triton(), setting, q, k, v, co, M, S)
