"""Block kind `lmm`: the neural memory alone as the sequence mixer ("Titans (LMM)"), inside the
Transformer++ macro-architecture (pre-RMSNorm, residuals, SwiGLU MLP)."""

from __future__ import annotations

from typing import Literal

from components.base import Spec, SpecRuleError
from components.neural_memory import NeuralMemory, NeuralMemorySpec


class LMMSpec(Spec):
    """Titans (LMM): the long-term memory module is the sequence mixer; no attention."""

    kind: Literal["lmm"] = "lmm"
    memory: NeuralMemorySpec = NeuralMemorySpec()
    """The long-term memory."""

    def check(self, dim: int, heads: int) -> None:
        try:
            self.memory.check(dim, heads)
        except SpecRuleError as e:
            raise e.under("memory") from None

    def build(self, dim: int, heads: int) -> NeuralMemory:
        return self.memory.build(dim, heads)
