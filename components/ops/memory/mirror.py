"""The mirrored retentions' chunk step: KL (MIRAS, arXiv 2504.13173, eqs. 19-21; Memora eq. 27),
and l_q (eqs. 24-25, Moneta: W = A / ||A||_q^(q-2), the same scheme with another map). The state
holds logits A, the memory uses W = c softmax(A) over each column (`common.primal`), and the
update is eqs. 13-14 on A with the gradient taken by W,

    A_t = (1 - alpha_t) A_{t-1} + alpha_t P + S_t,   S_t = eta_t S_{t-1} - theta_t grad_W l_t(W_{t'}),

which is mirror descent with the KL divergence: W_t = c softmax((1 - alpha_t) log W_{t-1} - ...)
up to each column's constant, which the softmax drops. The recursion on A is the fast path's,
but W_t is not linear in A_t, so the TTT dual form cannot read through it: A_t is materialised
per token from the coefficients (M_t = beta_t M_0 + (1 - beta_t) P + f_t S_0 - sum_j G[t, j] U_j,
U_j = a_j^T delta_j, `coefficients.Coefficients`) and every read goes through softmax(A_t).
Reads at the chunk start need none of it and take `step.chunk_step`. Autograd differentiates it.
"""

from __future__ import annotations

from components.ops.memory.coefficients import Coefficients
from components.ops.memory.common import accumulate, keys_and_errors, per_token_weights, read_per_token


def materialized_step(anchor, M, S, q, k, v, coef: tuple[Coefficients, ...], setting):
    """One chunk piece of c tokens from M (gradients at `anchor`): per-token reads of q through
    the materialised per-token weights, and the end state. Same contract as `step.chunk_step`."""
    model, norm, prior = setting.model, setting.norm, setting.prior
    keys = keys_and_errors(anchor, k, v, model, norm, theta=lambda i: coef[i].theta)
    Ms, new_M, new_S = [], [], []
    for i, co in enumerate(coef):
        a, delta, o = keys.inputs[i], keys.deltas[i], M[i].shape[-1]
        U = a[..., :, None] * delta[..., None, :]  # (B, R, i, o): each key row's gradient
        Mt = per_token_weights(co.neg_G, U, co.beta, M[i], None if prior is None else prior[i])
        if S is not None:
            Mt = Mt + co.f[..., :o].unsqueeze(-2) * S[i][:, None]
            new_S.append(accumulate(S[i] * co.m_last, a.transpose(-1, -2), co.neg_n_last * delta))
        Ms.append(Mt)
        new_M.append(Mt[:, -1])
    y = read_per_token(q, Ms, model, norm) if q is not None else None
    return y, tuple(new_M), tuple(new_S) if S is not None else None, None
