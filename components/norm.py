"""Normalisation layers used before every mixer and MLP (pre-norm, Llama macro-architecture),
the RMSNorm every block kind uses inside (on CPU in the C++ kernel), and the neural memory's
SiLU + l2 norm of its queries, keys and values."""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from components.base import Spec
from components.ops.memory import cpu_loop


class RMSNormSpec(Spec):
    """Root-mean-square norm with a learned gain (Transformer++ / Llama default)."""

    kind: Literal["rmsnorm"] = "rmsnorm"
    eps: float = Field(1e-6, gt=0.0, lt=1.0)
    """Added to the mean square before the reciprocal square root."""

    def build(self, dim: int) -> nn.Module:
        return RMSNorm(dim, eps=self.eps)


class LayerNormSpec(Spec):
    """LayerNorm with learned gain and bias (GPT-2 style)."""

    kind: Literal["layernorm"] = "layernorm"
    eps: float = Field(1e-5, gt=0.0, lt=1.0)
    """Added to the variance before the reciprocal square root."""

    def build(self, dim: int) -> nn.Module:
        return nn.LayerNorm(dim, eps=self.eps)


NormSpec = Annotated[RMSNormSpec | LayerNormSpec, Field(discriminator="kind")]


class RMSNorm(nn.RMSNorm):
    """torch's RMSNorm over the last dimension, with a gain. On CPU in float32 / float64 the C++
    kernel computes each row in one pass each way and keeps x and one root per row for the
    backward; torch's CPU rms_norm runs nine kernels forward and autograd's chain of them back
    (a tenth of a small model's training step, docs/benchmarks.md). Elsewhere (GPU, bfloat16,
    tracing, no compiler) torch's own."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__(dim, eps=eps)  # a number always: nn.RMSNorm's None would reach the kernel

    def forward(self, x: Tensor) -> Tensor:
        if cpu_loop.unavailable(x, self.weight) is not None:
            return super().forward(x)
        return _RMSNorm.apply(x, self.weight, self.eps)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, eps: float) -> Tensor:
        x = x.contiguous()  # the copy the kernel reads is the one kept (a strided x is copied once)
        y, r = cpu_loop.rms_norm(x, w, eps)
        ctx.save_for_backward(x, w, r)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor, Tensor, None]:
        x, w, r = ctx.saved_tensors
        dx, dw = cpu_loop.rms_norm_backward(x, w, r, dy)
        return dx, dw, None


def silu_l2_normalize(x: Tensor) -> Tensor:
    """F.normalize(F.silu(x), dim=-1) (eps 1e-12): the memory's q, k, v per head (Titans §4.4).
    On CPU in float32 / float64 the C++ kernel computes each row in one pass each way and keeps
    only x for the backward; elsewhere torch's two ops."""
    if cpu_loop.unavailable(x) is not None:
        return F.normalize(F.silu(x), dim=-1)
    return cpu_loop.KernelRows.apply(x, "silu_l2")
