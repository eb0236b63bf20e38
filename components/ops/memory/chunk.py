"""granularity "chunk", the coarser rule (titans-pytorch's): a chunk is one inner step with the
chunk means of theta, eta, alpha,

    S_k = eta S_{k-1} - theta sum_{t in k} grad l_t(W_{k-1}),   W_k = (1 - alpha) W_{k-1} + S_k,

read at the chunk start (an in-chunk read would see the chunk's future gates). With Muon
(`model.muon_steps`) S sums raw gradients and the step is -theta NS(S_k). Autograd
differentiates it: each chunk is a handful of large bmm calls.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from components.ops.memory.common import (
    MemoryModel,
    MemoryState,
    compile_once,
    flat,
    flat_weights,
    forward,
    keys_and_errors,
    norm_params,
    per_layer,
    prior_weights,
    retained,
    unflat_outputs,
    unflat_weights,
    with_pending,
)
from components.ops.memory.muon import newton_schulz


def _layer(t: Tensor | None, i: int) -> Tensor | None:
    """Gate slice for memory layer i (shared gates have a layer dim of 1)."""
    return None if t is None else t[:, min(i, t.shape[1] - 1)]


def chunkwise_step(W, S, q, k, v, gates: tuple[Tensor, Tensor | None, Tensor | None], model: MemoryModel, norm, prior):
    """One inner step for a whole chunk with its mean gates theta, eta, keep = 1 - alpha (B, L'),
    and the reads f_W(q) of the chunk's new queries (same weights: they share the keys' bmm)."""
    theta, eta, keep = gates
    cap_theta = lambda i: _layer(theta, i)[..., None]  # noqa: E731  the chunk's mean theta, (B, 1)
    keys = keys_and_errors(W, k, v, model, norm, q, len(W) if q is not None else 0, cap_theta)
    new_W, new_S = [], []
    for i in range(len(W)):
        # the sum over the chunk's tokens of theta * grad is one matmul: -theta A^T delta
        a_t, delta = keys.inputs[i].transpose(-1, -2), keys.deltas[i]
        if model.muon_steps:  # ATLAS eqs. 32-33: S = eta S + sum grad, step -theta NS(S)
            sigma = torch.bmm(a_t, delta).to(W[i].dtype)
            if S is not None:
                sigma = torch.addcmul(sigma, _layer(eta, i)[..., None, None], S[i])
                new_S.append(sigma)
            step = newton_schulz(sigma, model.muon_steps) * -_layer(theta, i)[..., None, None]
        else:
            step = torch.bmm(a_t, delta * -_layer(theta, i)[..., None, None]).to(W[i].dtype)
            if S is not None:
                step = torch.addcmul(step, _layer(eta, i)[..., None, None], S[i])
                new_S.append(step)
        if keep is None:
            new_W.append(W[i] + step)
            continue
        keep_i = _layer(keep, i)  # (B,), or (B, O) per channel: column o of W_i
        keep_i = keep_i[:, None, : W[i].shape[-1]] if keep_i.ndim == 2 else keep_i[..., None, None]
        if prior is not None:
            step = torch.addcmul(step, 1 - keep_i, prior[i])
        new_W.append(torch.addcmul(step, keep_i, W[i]))
    return keys.q_out, tuple(new_W), tuple(new_S) if S is not None else None


def memory_update_chunkwise(
    q, k, v, lr, momentum, decay, state: MemoryState, C: int, model: MemoryModel, compiled: bool
):
    """Reads at the chunk start; the chunk's update waits until it is whole (state.pending)."""
    b, h, n, _ = q.shape
    norm, prior = norm_params(model, b), prior_weights(model, b)
    r = state.offset
    k, v, lr, momentum, decay = with_pending(state, k, v, lr, momentum, decay)
    total, whole = r + n, (r + n) // C
    kf, vf, qf = flat(k), flat(v), flat(q)
    W, S = flat_weights(state.weights), flat_weights(state.momentum)

    def chunk_means(g: Tensor | None) -> list[Tensor | None]:
        """(b, h, total[, L]) -> one (B, L') mean per whole chunk (eta, 1 - alpha as values)."""
        if g is None:
            return [None] * whole
        g = per_layer(g, b, h).narrow(2, 0, whole * C)
        return list(rearrange(g, "B l (k c) ... -> k B l ... c", c=C).mean(-1).unbind(0))

    gates = zip(chunk_means(lr), chunk_means(momentum), chunk_means(None if decay is None else 1 - decay))
    step = compile_once(chunkwise_step) if compiled else chunkwise_step
    outs = []
    for start in range(0, total, C):
        end = min(total, start + C)
        q_lo, q_hi = max(start, r) - r, end - r  # new tokens of this chunk
        q_rows = qf[:, q_lo:q_hi] if q_hi > q_lo else None
        if end - start == C:  # a whole chunk: one inner step with the chunk-mean gates
            y, W, S = step(W, S, q_rows, kf[:, start:end], vf[:, start:end], next(gates), model, norm, prior)
            W = retained(W, model, prior, C)
        else:
            y = forward(W, q_rows, model, norm) if q_rows is not None else None
        if y is not None:
            outs.append(y)
    left = total % C
    pending = None
    if left:
        tail = lambda t: None if t is None else t[:, :, total - left :]  # noqa: E731
        pending = (tail(k), tail(v), tail(lr), tail(momentum), tail(decay))
    return unflat_outputs(outs, q, v), MemoryState(unflat_weights(W, b), unflat_weights(S, b), None, left, pending)
