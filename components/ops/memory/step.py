"""One chunk of the fast path (token granularity): per-token reads in the TTT dual form, the
end-of-chunk state, and what the hand-written outer backward (`backward.py`) reuses.

Letters as in `common`: B = b h, c tokens of the chunk, i / o a layer's input / output width.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

from components.ops.memory.coefficients import Coefficients
from components.ops.memory.common import (
    Keys,
    MemoryModel,
    Read,
    Weights,
    accumulate,
    act,
    finish,
    forward,
    keys_and_errors,
)

Backend = Literal["auto", "torch", "triton", "cpp"]


class Setting(NamedTuple):
    """What stays fixed over one call: the memory's structure, its norm and prior in bmm
    layout (B, ...), the read convention, the chunk size and how the loop runs."""

    model: MemoryModel
    norm: tuple[Tensor, Tensor] | None
    prior: Weights | None
    read: Read
    chunk_size: int
    group: int | None  # checkpoint groups of this many chunks (None: store everything)
    compiled: bool
    backend: Backend = "auto"
    channelwise: bool = False  # the decay has one gate per output channel (autograd then)


class Saved(NamedTuple):
    """What a chunk step computed that the hand-written outer backward reuses (per layer)."""

    keys: Keys
    x: list[Tensor]  # the read path: input of each layer
    z: list[Tensor]  # its pre-activation
    t: list[Tensor]  # after_update: x a^T (B, c, c)
    xm: list[Tensor]  # after_update: x M_l, x P_l, x S_l (the last two None when absent)
    xp: list[Tensor | None]
    xs: list[Tensor | None]


def chunk_step(anchor, M, S, q, k, v, coef: tuple[Coefficients, ...], setting: Setting):
    """One chunk piece of c tokens: per-token reads (if q is given), the end state and what
    its outer backward needs. Written with fused accumulations (addcmul, baddbmm): on CPU every
    elementwise pass over a (c, e) or (d, e) tensor costs a third of a matmul."""
    model, norm, prior, read = setting.model, setting.norm, setting.prior, setting.read
    shared = anchor is M  # the keys and queries see the same weights: one bmm for both
    theta = lambda i: coef[i].theta  # noqa: E731  (B, c) per layer, for the step cap
    depth = len(M)
    xs, zs, ts, xms, xps, xss = [], [], [], [], [], []
    y = None
    if q is not None and read == "chunk_start":
        keys = keys_and_errors(anchor, k, v, model, norm, q if shared else None, depth, theta)
        y = keys.q_out if keys.q_out is not None else forward(anchor, q, model, norm)
        xs, zs = keys.q_inputs, keys.q_pre
    else:
        keys = keys_and_errors(anchor, k, v, model, norm, q if shared else None, 1, theta)
    inputs, deltas = keys.inputs, keys.deltas
    if q is not None and read == "after_update":  # TTT dual form: row t is x_t M_t, M_t never built
        x = q
        for i, co in enumerate(coef):
            o = M[i].shape[-1]  # a per-channel decay's coefficients: this layer's first o channels
            xm = keys.q_pre[0] if (i == 0 and keys.q_pre) else x @ M[i]
            t = x @ inputs[i].transpose(-1, -2)
            if co.neg_G.ndim == 4:  # per channel: z[t, o] = sum_j t[t, j] G[t, j, o] delta[j, o]
                z = torch.einsum("btj,btjo,bjo->bto", t, co.neg_G[..., :o], deltas[i])
            else:
                z = torch.bmm(co.neg_G * t, deltas[i])
            beta = co.beta[..., :o]
            z = torch.addcmul(z, beta, xm)
            xp = xs_ = None
            if prior is not None:  # the share 1 - beta_t of the prior that decay brought back
                xp = x @ prior[i]
                z = torch.addcmul(z, 1 - beta, xp)
            if S is not None:
                xs_ = x @ S[i]
                z = torch.addcmul(z, co.f[..., :o], xs_)
            xs.append(x), zs.append(z), ts.append(t), xms.append(xm), xps.append(xp), xss.append(xs_)
            x = act(model.activation, z) if i < depth - 1 else z
        y = finish(q, x, model, norm)[0]
    new_M, new_S = [], []
    for i, co in enumerate(coef):
        a_t, o = inputs[i].transpose(-1, -2), M[i].shape[-1]
        beta_last = co.beta_last[..., :o]  # (B, 1, 1), or (B, 1, o) per channel: scales M's columns
        base = M[i] * beta_last
        if prior is not None:
            base = torch.addcmul(base, 1 - beta_last, prior[i])
        if S is not None:
            base = torch.addcmul(base, co.f_last[..., :o], S[i])
            new_S.append(accumulate(S[i] * co.m_last, a_t, co.neg_n_last * deltas[i]))
        new_M.append(accumulate(base, a_t, co.neg_g_last[..., :o] * deltas[i]))
    saved = Saved(keys, xs, zs, ts, xms, xps, xss)
    return y, tuple(new_M), tuple(new_S) if S is not None else None, saved
