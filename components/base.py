"""The spec base class and the streaming contract every sequence mixer follows."""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict
from torch import Tensor


class Spec(BaseModel):
    """Base of every spec: unknown fields are errors, specs are immutable (hashable), and each
    field's attribute docstring is its user documentation (it shows in `titans-nas schema`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class BlockKindSpec(Spec):
    """What every block kind's spec says about itself (a member of `titans_nas.spec.BlockSpec`;
    the union is the only registry of kinds). A kind lacking one of these cannot be built."""

    @abstractmethod
    def describe(self) -> str:
        """The mixer in words: the model card's first line."""

    @abstractmethod
    def check(self, dim: int, heads: int) -> None:
        """Cross-field rules given the model's width and heads (raise SpecRuleError)."""

    @abstractmethod
    def build(self, dim: int, heads: int) -> Any:
        """The mixer module (the `Mixer` protocol below)."""


class SpecRuleError(ValueError):
    """A cross-field rule broken inside a spec. `path` is dotted and relative to the spec that
    raised it; the config layer prefixes the spec's own location, so users see the full path."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path, reason)  # args = constructor args: copyable, picklable (Ray)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return self.reason

    def under(self, prefix: str) -> SpecRuleError:
        """The same error seen from the parent spec that holds this one at `prefix`."""
        return SpecRuleError(f"{prefix}.{self.path}" if self.path else prefix, self.reason)


def check_parts(spec: Spec, dim: int, heads: int, *names: str) -> None:
    """Run the cross-field rules of the sub-specs `names` of `spec`, reporting their paths."""
    for name in names:
        try:
            getattr(spec, name).check(dim, heads)
        except SpecRuleError as e:
            raise e.under(name) from None


class Mixer(Protocol):
    """A sequence mixer: (b, n, d) -> (b, n, d), causal, streamable.

    `forward(x, None)` is one stateless pass and returns `(y, None)`. `forward(x, state)` continues
    from `state` (made by `init_state`) and returns the state after the last token of `x`; feeding
    a sequence in pieces of any length gives the outputs of one pass.
    """

    def init_state(self, batch: int) -> Any: ...

    def __call__(self, x: Tensor, state: Any = None) -> tuple[Tensor, Any]: ...
