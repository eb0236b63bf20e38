"""Block kind `attention`: full causal multi-head attention, the Transformer++ baseline."""

from __future__ import annotations

from typing import Literal

from components.attention import Attention, AttentionSpec
from components.base import Spec, SpecRuleError


class TransformerSpec(Spec):
    """Transformer++ (Llama-style): full causal attention as the sequence mixer."""

    kind: Literal["attention"] = "attention"
    attention: AttentionSpec = AttentionSpec()
    """The attention layer."""

    def check(self, dim: int, heads: int) -> None:
        try:
            self.attention.check(dim, heads)
        except SpecRuleError as e:
            raise e.under("attention") from None

    def build(self, dim: int, heads: int) -> Attention:
        return self.attention.build(dim, heads)
