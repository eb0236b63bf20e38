"""Muon as the inner optimiser (ATLAS, arXiv 2505.23735, eqs. 32-33), per token:

    S_t = eta_t S_{t-1} + u_t                                   (momentum of raw gradients)
    M_t = (1 - alpha_t) M_{t-1} + alpha_t P - theta_t NS_k(S_t)  (NS_k: k Newton-Schulz steps)

u_t = grad l_t(W_{t'}) at the chunk-start weights (or the Omega rule's window sum of them).
NS_k(S) ~ U V^T of S = U Sigma V^T: every singular direction moves by theta, whatever its
gradient's size. NS is not linear, so the TTT dual form (reads through G o x a^T) does not
apply; within a chunk S is independent of M (its gradients are all at W_{t'}), so every S_t of
the chunk comes from one matmul over the per-token gradients, NS runs on all of them at once
(a batch of c matrices per layer), and M_t follows from the decayed sum of the steps:

    S_t = m_t S_0 + sum_j mix[t, j] U_j,     M_t = beta_t M_0 + (1 - beta_t) P - sum_s T[t, s] NS(S_s)

with mix = N_eta band (N_eta[t, j] = prod_{j<i<=t} eta_i; the band of the Omega rule, the
identity without it) and T[t, s] = theta_s beta_t / beta_s. Reads use the per-token M_t
(materialised: c (i, o) matrices per layer and chunk). Autograd differentiates it.

Letters as in `common`: B = b h, K chunks, L' gate slots, c tokens of a chunk, R key rows.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from components.ops.memory.coefficients import coefficients, decay_matrix
from components.ops.memory.common import forward, keys_and_errors, per_token_weights, read_per_token

# the quintic iteration's coefficients (Jordan et al.'s Muon): it pushes every singular value of
# a Frobenius-normalised matrix into about [0.7, 1.2] within 5 steps
_NS = (3.4445, -4.7750, 2.0315)


def newton_schulz(G: Tensor, steps: int) -> Tensor:
    """NS_k(G) for G (..., i, o): X <- a X + (b A + c A^2) X with A = X X^T, from X = G / |G|_F,
    on the wide orientation (A is min(i, o) square). rsqrt(|G|^2 + eps): finite at G = 0."""
    a, b, c = _NS
    tall = G.shape[-2] > G.shape[-1]
    X = G.mT if tall else G
    X = X * torch.rsqrt(X.pow(2).sum((-2, -1), keepdim=True) + 1e-12)
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    return X.mT if tall else X


class MuonCoefficients(NamedTuple):
    """A chunk's coefficients for the Muon step, for one memory layer: (B, c, ...) per chunk and
    layer, (B, K, L', c, ...) for all (as `Coefficients`; `per_chunk` splits them)."""

    theta: Tensor  # (B, c)
    beta: Tensor  # (B, c, 1): prod_{s<=t} (1 - alpha_s); (B, c, O) with a decay per channel
    neg_T: Tensor  # (B, c, c): -theta_s beta_t / beta_s, s <= t; (B, c, c, O) per channel
    mix: Tensor | None  # (B, c, R): N_eta band, or the band alone; None: the identity (S_t = u_t)
    m: Tensor | None  # (B, c, 1): prod_{s<=t} eta_s; None without momentum


def muon_coefficients(lr: Tensor, log_eta: Tensor | None, log_keep: Tensor | None, window) -> MuonCoefficients:
    """lr, log_eta, log_keep (B, K, L', c); window: the Omega rule's (band, key rows' steps) or None.
    beta and T are gradient descent's coefficients without momentum (its G is then
    theta_s beta_t / beta_s), per token or per channel."""
    plain = coefficients(lr, None, log_keep)
    beta, neg_T = plain.beta, plain.neg_G
    band = window[0] if window is not None else None
    mix = m = None
    if log_eta is not None:
        mu = torch.cumsum(log_eta, -1)
        mix = decay_matrix(mu) if band is None else decay_matrix(mu) @ band
        m = mu.exp()[..., None]
    elif band is not None:
        mix = band
    return MuonCoefficients(lr, beta, neg_T, mix, m)


def muon_step(anchor, M, S, q, k, v, coef: tuple[MuonCoefficients, ...], setting):
    """One chunk piece of c tokens from M (gradients at `anchor`): per-token reads of q (if given)
    and the end state. Same contract as `step.chunk_step` (its fourth output, the saved
    tensors of the hand backward, is None: autograd differentiates this step)."""
    model, norm, prior = setting.model, setting.norm, setting.prior
    prior_of = lambda i: None if prior is None else prior[i]  # noqa: E731
    keys = keys_and_errors(anchor, k, v, model, norm)
    Ms, new_M, new_S = [], [], []
    for i, co in enumerate(coef):
        U = keys.inputs[i][..., :, None] * keys.deltas[i][..., None, :]  # (B, R, i, o) per key row
        sigma = U if co.mix is None else torch.einsum("btr,brio->btio", co.mix.to(U.dtype), U)
        if S is not None:
            sigma = sigma + co.m[..., None] * S[i][:, None]
            new_S.append(sigma[:, -1])
        Mt = per_token_weights(co.neg_T, newton_schulz(sigma, model.muon_steps), co.beta, M[i], prior_of(i))
        Ms.append(Mt)
        new_M.append(Mt[:, -1])
    y = None
    if q is not None and setting.read == "chunk_start":
        y = forward(anchor, q, model, norm)
    elif q is not None:
        y = read_per_token(q, Ms, model, norm)
    return y, tuple(new_M), tuple(new_S) if S is not None else None, None
