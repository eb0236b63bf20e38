"""Normalisation layers used before every mixer and MLP (pre-norm, Llama macro-architecture)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field
from torch import nn

from components.base import Spec


class RMSNormSpec(Spec):
    """Root-mean-square norm with a learned gain (Transformer++ / Llama default)."""

    kind: Literal["rmsnorm"] = "rmsnorm"
    eps: float = Field(1e-6, gt=0.0, lt=1.0)
    """Added to the mean square before the reciprocal square root."""

    def build(self, dim: int) -> nn.Module:
        return nn.RMSNorm(dim, eps=self.eps)


class LayerNormSpec(Spec):
    """LayerNorm with learned gain and bias (GPT-2 style)."""

    kind: Literal["layernorm"] = "layernorm"
    eps: float = Field(1e-5, gt=0.0, lt=1.0)
    """Added to the variance before the reciprocal square root."""

    def build(self, dim: int) -> nn.Module:
        return nn.LayerNorm(dim, eps=self.eps)


NormSpec = Annotated[RMSNormSpec | LayerNormSpec, Field(discriminator="kind")]
