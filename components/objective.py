"""The memory's inner objective, the attentional bias of MIRAS (Behrouz et al., "It's All
Connected", arXiv 2504.13173, §3): which loss each token's write descends. The math is
`components.ops.memory.common.Objective` (loss, its gradient and the jacobians the hand-written
backward needs); these specs choose it. Letters as in the op: e = f_W(k) - v, per coordinate."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from components.base import Spec
from components.ops.memory.common import Objective


class L2ObjectiveSpec(Spec):
    """||f_W(k) - v||^2 (Titans eq. 12, without the 1/2): the default."""

    kind: Literal["l2"] = "l2"

    def build(self) -> Objective:
        return Objective("l2")


class LpObjectiveSpec(Spec):
    """sum |e|^p (MIRAS's l_p attentional bias, e.g. Moneta); p = 2 is l2, p = 1 writes only the
    sign of each error."""

    kind: Literal["lp"] = "lp"
    p: float = Field(3.0, ge=1.0, le=4.0)
    """The exponent."""

    def build(self) -> Objective:
        return Objective("lp", p=self.p)


class HuberObjectiveSpec(Spec):
    """Per coordinate e^2 inside |e| <= delta, 2 delta |e| - delta^2 outside (twice the usual
    Huber loss, so a large delta is l2): an outlier's write is bounded (MIRAS's Huber bias, Yaad)."""

    kind: Literal["huber"] = "huber"
    delta: float = Field(0.1, gt=0.0, le=1e6)
    """Where the loss turns from quadratic to linear, per coordinate. With l2-normalised values
    (`v_norm`) an error coordinate is typically ~1 / sqrt(head dim) and at most 2: at 1 the loss
    would be l2 for nearly every token."""

    def build(self) -> Objective:
        return Objective("huber", delta=self.delta)


class DotObjectiveSpec(Spec):
    """-<f_W(k), v>: the dot-product similarity of linear attention (no error term; a linear
    memory without decay then adds theta k^T v per token)."""

    kind: Literal["dot"] = "dot"

    def build(self) -> Objective:
        return Objective("dot")


ObjectiveSpec = Annotated[
    L2ObjectiveSpec | LpObjectiveSpec | HuberObjectiveSpec | DotObjectiveSpec, Field(discriminator="kind")
]
