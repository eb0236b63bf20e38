"""The memory's inner optimiser, MIRAS's fourth choice (Behrouz et al., arXiv 2504.13173, §3):
how a token's gradient becomes a write. Gradient descent (with the `momentum` field: eq. 14) is
Titans'; Muon is ATLAS's (arXiv 2505.23735, eqs. 32-33): the momentum is orthogonalised by
Newton-Schulz steps before it is applied. The math is `components.ops.memory.muon`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from components.base import Spec


class GDOptimizerSpec(Spec):
    """M_t = (1 - alpha_t) M_{t-1} + S_t, S_t = eta_t S_{t-1} - theta_t grad (eqs. 13-14; eta = 0
    without `momentum`): the default."""

    kind: Literal["gd"] = "gd"

    def steps(self) -> int | None:
        return None


class MuonOptimizerSpec(Spec):
    """M_t = (1 - alpha_t) M_{t-1} - theta_t NS_k(S_t), S_t = eta_t S_{t-1} + grad (ATLAS eqs.
    32-33; S_t = grad without `momentum`): every singular direction of the write moves by about
    theta, whatever the gradient's size. Needs `lr.curvature_cap: null` (the cap scales a
    gradient that NS normalises away) and granularity token or chunk."""

    kind: Literal["muon"] = "muon"
    ns_steps: int = Field(5, ge=1, le=10)
    """Newton-Schulz steps k (ATLAS's test-time compute knob): each is three matmuls of the
    state's size per token."""

    def steps(self) -> int | None:
        return self.ns_steps


InnerOptimizerSpec = Annotated[GDOptimizerSpec | MuonOptimizerSpec, Field(discriminator="kind")]
