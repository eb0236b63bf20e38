"""The memory's retention beyond the forget gate, MIRAS's third choice (Behrouz et al., arXiv
2504.13173, §3.3): what a write keeps of the memory besides the learning step. The forget gate
(`decay`) is the l2 retention, W <- (1 - alpha) W; elastic net adds l1 (MIRAS eqs. 22-23), a
soft threshold S_g(x) = sign(x) max(|x| - g, 0) that sets small entries of the memory exactly to
its prior (`components.ops.memory.common.retained`); the KL retention (MIRAS eqs. 19-21, Memora)
keeps the memory's weights on scaled simplices, W = c softmax(A), and writes by mirror descent
(`components.ops.memory.mirror`); the l_q retention (MIRAS eqs. 24-25, Moneta) normalises them,
W = A / ||A||_q^(q-2), by the same scheme."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from components.base import Spec


class ElasticNetRetentionSpec(Spec):
    """l1 + l2: the forget gate (if `decay` is on) and a soft threshold of the memory's deviation
    from what the decay returns to (its prior, or zero), g = l1 per token, applied once per chunk
    (g = l1 * chunk_size) when the chunk completes: MIRAS's nonlinear retentions act at chunk
    boundaries (§5.3), so the chunk's reads stay the dual form's (the chunk's last token reads
    before the threshold). Chunk size 1 is the per-token proximal rule
    W_t = S_g((1 - alpha_t) W_{t-1} - theta_t grad), y_t read before S_g (docs/decisions/0013)."""

    kind: Literal["elastic_net"] = "elastic_net"
    l1: float = Field(1e-4, gt=0.0, le=1.0)
    """The soft threshold per token (the l1 weight times the step). A fresh memory's entries are
    ~1 / sqrt(head dim) (0.25 at 16) and one write moves an entry by ~theta / head dim."""

    def fields(self) -> dict[str, float]:
        """Its field of the op's `MemoryModel`."""
        return {"l1": self.l1}


class KLRetentionSpec(Spec):
    """The KL divergence as the local retention (MIRAS eqs. 19-21; Memora eq. 27): the state holds
    logits A and the memory computes with W = c softmax(A) over each weight column (its input
    axis: every output is c times a convex combination of the layer's inputs); a write is
    eqs. 13-14 on A with the gradient taken by W, i.e. W_t = c softmax((1 - alpha_t) log W_{t-1}
    - theta_t grad) up to each column's constant. The forget gate (`decay`) is the (1 - alpha_t)
    on log W. Reads after the update go through softmax(A_t) per token (materialised: c matrices
    per layer and chunk); `read: chunk_start` reads W_{t'} only."""

    kind: Literal["kl"] = "kl"
    scale: float = Field(1.0, gt=0.0, le=1e3)
    """c, each column's total weight. With nonnegative weights a layer cannot flip a sign, so a
    memory that must fit signed values needs the x + LN(f(x)) form (Memora's)."""

    def fields(self) -> dict[str, float]:
        return {"kl_scale": self.scale}


class LqRetentionSpec(Spec):
    """The l_q norm as the retention (MIRAS eqs. 24-25; Moneta): the state holds A and the memory
    computes with W = A / ||A||_q^(q-2) per layer (the entrywise q-norm of each head's matrix), a
    write being eqs. 13-14 on A with the gradient taken by W. q = 2 is the plain rule; for q > 2
    the normalisation bounds the weights' scale, ||W||_q = ||A||_q^(3-q). Reads after the update
    go through the map per token (materialised), as the KL retention's."""

    kind: Literal["lq"] = "lq"
    q: float = Field(4.0, ge=2.0, le=8.0)
    """The norm's exponent (Moneta: 4)."""

    def fields(self) -> dict[str, float]:
        return {"lq": self.q}


RetentionSpec = Annotated[ElasticNetRetentionSpec | KLRetentionSpec | LqRetentionSpec, Field(discriminator="kind")]
