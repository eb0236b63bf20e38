"""The Omega rule (ATLAS, arXiv 2505.23735, eq. 9): token t's write descends the gamma-weighted
loss of its last w tokens, sum_{i = t-w+1}^{t} gamma_i l(f_W(k_i), v_i), not its own alone
(w = 1 is eq. 12). In the chunked form every gradient is taken at t's chunk-start weights
W_{t'}, so token t's gradient is sum_j band[t, j] gamma_j u_j over the chunk's key rows j,
u_j = grad l_j(W_{t'}): a chunk of c tokens forwards c + w - 1 keys (its own and the w - 1
before it) and the dual form's coefficient matrices gain w - 1 columns (`banded`). Rows before
the sequence start are zeros with gamma 0 (they add nothing).

Letters as in `common`: B = b h, K chunks, L' gate slots, c tokens of a chunk, R = c + w - 1
key rows.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from components.ops.memory.common import MemoryState, flat


class Rows:
    """A call's keys, values, gammas and steps with the w - 1 tokens before it in front (from
    the state's history), in bmm layout: k, v (B, w - 1 + n, d), gamma (B, 1, w - 1 + n), lr
    (B, L', w - 1 + n). Rows [s, s + c + w - 1) are the key rows of the call's tokens [s, s + c)."""

    def __init__(self, state: MemoryState, k: Tensor, v: Tensor, gamma: Tensor, lr: Tensor, w: int) -> None:
        b, h = k.shape[:2]
        if state.history is not None:
            hk, hv, hg, hlr = state.history
        else:
            hk, hv = k.new_zeros(b, h, w - 1, k.shape[-1]), v.new_zeros(b, h, w - 1, v.shape[-1])
            hg, hlr = gamma.new_zeros(b, h, w - 1), lr.new_zeros(b, h, w - 1, *lr.shape[3:])
        self.w = w
        self.k4, self.v4 = torch.cat([hk, k], 2), torch.cat([hv, v], 2)
        self.g4, self.lr4 = torch.cat([hg, gamma], 2), torch.cat([hlr, lr], 2)
        self.k, self.v = flat(self.k4), flat(self.v4)
        self.gamma = rearrange(self.g4, "b h n -> (b h) 1 n")
        self.lr = rearrange(self.lr4 if self.lr4.ndim == 4 else self.lr4[..., None], "b h n l -> (b h) l n")

    def history(self) -> tuple[Tensor, ...]:
        """The last w - 1 rows, for the state after the call."""
        keep = lambda t: t[:, :, t.shape[2] - (self.w - 1) :]  # noqa: E731
        return keep(self.k4), keep(self.v4), keep(self.g4), keep(self.lr4)

    def piece(self, start: int, c: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Key rows of the call's tokens [start, start + c): k, v (B, R, d), gamma (B, 1, R), lr (B, L', R)."""
        sl = slice(start, start + c + self.w - 1)
        return self.k[:, sl], self.v[:, sl], self.gamma[..., sl], self.lr[..., sl]

    def chunks(self, pos: int, count: int, C: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Key rows of `count` whole chunks from the call's token `pos`, overlapping by w - 1:
        k, v (B, K, R, d), gamma (B, K, 1, R), lr (B, K, L', R)."""
        R = C + self.w - 1
        span = lambda t, dim: t.narrow(dim, pos, (count - 1) * C + R).unfold(dim, R, C)  # noqa: E731
        k, v = (rearrange(span(t, 1), "B k d r -> B k r d") for t in (self.k, self.v))
        gamma, lr = (rearrange(span(t, -1), "B l k r -> B k l r") for t in (self.gamma, self.lr))
        return k, v, gamma, lr


def band(gamma: Tensor, c: int) -> Tensor:
    """gamma (..., 1, R) over R = c + w - 1 key rows -> (..., 1, c, R): [t, j] = gamma_j where
    token t's window holds row j (t <= j <= t + w - 1: row t + w - 1 is t itself), else 0."""
    R = gamma.shape[-1]
    t = torch.arange(c, device=gamma.device)[:, None]
    j = torch.arange(R, device=gamma.device)[None, :]
    inside = (j >= t) & (j <= t + R - c)
    return gamma[..., None, :] * inside.to(gamma.dtype)
