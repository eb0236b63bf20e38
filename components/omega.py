"""The Omega rule (ATLAS, Behrouz et al., arXiv 2505.23735, eq. 9): each token's write descends
the gated loss of its last `window` tokens, sum_{i=t-c+1}^{t} gamma_i ||f(k_i) - v_i||^2,
instead of its own alone; gamma_i in [0, 1] is a gate per token and head (in-context pruning).
The math is `components.ops.memory.omega`; the gate lives with the others in `Gates`."""

from __future__ import annotations

from pydantic import Field

from components.base import Spec


class OmegaSpec(Spec):
    """The window of the Omega rule (window 1 is eq. 12's rule and builds no gate: the same
    model as null)."""

    window: int = Field(4, ge=1, le=64)
    """c, the tokens whose losses each write descends (ATLAS sweeps 2-16). The default step bound
    `lr.theta_max: null` becomes 1 / (chunk_size c): a repeated key now counts c times per token."""
    gate_init: float | None = Field(0.9, gt=0.0, lt=1.0)
    """gamma_i = sigmoid(x W_gamma + b) starts here; null = no gate (every token of a window weighs 1)."""
