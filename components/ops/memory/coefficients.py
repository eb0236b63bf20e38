"""Per-token coefficients of a chunk of the fast path, from the gates in log space, for all
chunks at once (a few batched ops before the sequential loop).

Letters as in `common`: B = b h, K chunks, L' gate slots (1, or one per memory layer), c tokens.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from components.ops.memory.common import autocast_on


class Coefficients(NamedTuple):
    """A chunk's coefficients for one memory layer, shaped for broadcasting: (B, c, ...) for one
    chunk and layer, (B, K, L', c, ...) for all of them (`coefficients`; `at` picks one).

    With beta_t = prod_{s<=t} (1 - alpha_s), m_t = prod_{s<=t} eta_s,
    N[s, j] = theta_j prod_{j<i<=s} eta_i and G[t, j] = sum_{j<=s<=t} (beta_t / beta_s) N[s, j],
    unrolling eqs. 13-14 inside the chunk gives (u_j = grad l_j at the anchor, f_t = sum_s
    (beta_t / beta_s) m_s)
        S_t = m_t S_0 - sum_j N[t, j] u_j,   M_t = beta_t M_0 + f_t S_0 - sum_j G[t, j] u_j.
    G and N are stored negated, so the chunk step only accumulates. With a decay per channel
    (one alpha per output channel o of each layer: M_t = M_{t-1} diag(1 - alpha_t) + ...) beta,
    f and G carry a last channel axis O (the widest layer's; a layer reads its first o): beta
    (B, c, O), G (B, c, R, O), and the reads' G o x a^T becomes a sum over j per channel. Under the Omega rule
    (`omega`) u_j is the windowed gradient sum_i band[j, i] u_i over R = c + w - 1 key rows:
    G and N are multiplied by the band on the right, their columns are key rows (c -> R).
    """

    theta: Tensor  # (B, R): each key row's own step (for the step cap)
    beta: Tensor  # (B, c, 1)
    f: Tensor | None  # (B, c, 1); None without momentum
    neg_G: Tensor  # (B, c, c)
    beta_last: Tensor  # (B, 1, 1)
    f_last: Tensor | None  # (B, 1, 1)
    neg_g_last: Tensor  # (B, c, 1): the last row of -G, as a column
    m_last: Tensor | None  # (B, 1, 1)
    neg_n_last: Tensor | None  # (B, c, 1): the last row of -N, as a column


def coefficients(
    lr: Tensor, log_eta: Tensor | None, log_keep: Tensor | None, window: tuple[Tensor, Tensor] | None = None
) -> Coefficients:
    """lr, log_eta, log_keep: (B, K, L', c) -> Coefficients of (B, K, L', ...) tensors, in the
    gates' precision (float32 at least) also under autocast: these products span whole chunks.
    window: the Omega rule's band (B, K, 1, c, R) (`omega.band`) and the key rows' steps (B, K, L', R)."""
    if not autocast_on(lr):
        return _coefficients(lr, log_eta, log_keep, window)
    with torch.autocast(lr.device.type, enabled=False):
        return _coefficients(lr, log_eta, log_keep, window)


def normal_exp(x: Tensor, keep: Tensor | None = None) -> Tensor:
    """exp(x), 0 where it would fall below float32's smallest normal (1.2e-38; float64's in
    float64) and, if given, where `keep` is False. A chunk's gate products reach there at chunk
    64, and on an Intel core every product such a denormal enters runs on microcode assists: the
    torch path at chunk 64 ran 1.25-1.33x faster without them (docs/benchmarks.md, "Denormals";
    the C++ kernel flushes its own)."""
    drop = x < math.log(torch.finfo(torch.promote_types(x.dtype, torch.float32)).tiny)
    return x.masked_fill(drop if keep is None else drop | ~keep, float("-inf")).exp()


def decay_matrix(log_cum: Tensor) -> Tensor:
    """Cumulative log gates (..., c) -> (..., c, c): [t, i] = exp(cum_t - cum_i) for i <= t, else 0."""
    c = log_cum.shape[-1]
    causal = torch.ones(c, c, dtype=torch.bool, device=log_cum.device).tril()
    diff = log_cum[..., :, None] - log_cum[..., None, :]
    return normal_exp(diff, keep=causal)


def _coefficients(lr: Tensor, log_eta: Tensor | None, log_keep: Tensor | None, window) -> Coefficients:
    if log_keep is not None and log_keep.ndim == lr.ndim + 1:
        return _channel_coefficients(lr, log_eta, log_keep, window)
    lam = torch.cumsum(log_keep, -1) if log_keep is not None else torch.zeros_like(lr[..., :1, :])
    l_beta = decay_matrix(lam)  # (B, K, L', c, c)
    beta = normal_exp(lam)
    if log_eta is None:  # no momentum: N = diag(theta)
        f = m_last = neg_n_last = None
        neg_G = l_beta * -lr[..., None, :]
    else:
        mu = torch.cumsum(log_eta, -1)
        neg_N = decay_matrix(mu) * -lr[..., None, :]
        m = normal_exp(mu)
        f = (l_beta @ m[..., None])[..., 0]
        neg_G = l_beta @ neg_N
        if window is not None:
            neg_N = neg_N @ window[0]
        m_last, neg_n_last = m[..., -1, None, None], neg_N[..., -1, :, None]
    if window is not None:
        neg_G = neg_G @ window[0]
    return Coefficients(
        theta=lr if window is None else window[1],
        beta=beta[..., None],
        f=None if f is None else f[..., None],
        neg_G=neg_G,
        beta_last=beta[..., -1, None, None],
        f_last=None if f is None else f[..., -1, None, None],
        neg_g_last=neg_G[..., -1, :, None],
        m_last=m_last,
        neg_n_last=neg_n_last,
    )


def _channel_coefficients(lr: Tensor, log_eta: Tensor | None, log_keep: Tensor, window) -> Coefficients:
    """`_coefficients` with log_keep (B, K, L', c, O): every decay-dependent matrix per channel."""
    lam = torch.cumsum(log_keep, -2)  # (..., c, O)
    l_beta = decay_matrix(lam.transpose(-1, -2))  # (..., O, c, c)
    beta = normal_exp(lam)
    f = m_last = neg_n_last = None
    if log_eta is None:
        neg_G = l_beta * -lr[..., None, None, :]
    else:
        mu = torch.cumsum(log_eta, -1)
        neg_N = decay_matrix(mu) * -lr[..., None, :]
        m = normal_exp(mu)
        f = (l_beta @ m[..., None, :, None])[..., 0].transpose(-1, -2)  # (..., c, O)
        neg_G = l_beta @ neg_N[..., None, :, :]
        if window is not None:
            neg_N = neg_N @ window[0]
        m_last, neg_n_last = m[..., -1, None, None], neg_N[..., -1, :, None]
    if window is not None:
        neg_G = neg_G @ window[0][..., None, :, :]
    neg_G = neg_G.movedim(-3, -1)  # (..., c, R, O)
    return Coefficients(
        theta=lr if window is None else window[1],
        beta=beta,
        f=f,
        neg_G=neg_G,
        beta_last=beta[..., -1:, :],
        f_last=None if f is None else f[..., -1:, :],
        neg_g_last=neg_G[..., -1, :, :],
        m_last=m_last,
        neg_n_last=neg_n_last,
    )


def per_chunk(co: NamedTuple, layers: int) -> list[tuple[NamedTuple, ...]]:
    """(B, K, L', ...) -> per chunk, per memory layer (slot min(l, L' - 1); L' may differ between
    fields: without decay beta has one slot whatever theta has). unbind, not
    indexing: the backward pass then stacks once instead of a full-size zero tensor per chunk."""
    split = [None if t is None else [s.unbind(1) for s in t.unbind(1)] for t in co]  # [field][chunk][slot]
    pick = lambda k, i: type(co)(*[None if t is None else t[k][min(i, len(t[k]) - 1)] for t in split])  # noqa: E731
    return [tuple(pick(k, i) for i in range(layers)) for k in range(co.theta.shape[1])]
