"""The reference: the memory's equations token by token (eqs. 12-14), inner gradients by
autograd at W_{t'} (create_graph=True, so outer gradients flow through them). Every fast path
is tested against it in float64. Both granularities (`token`, `chunk`) in one loop each.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from components.ops.memory.common import (
    Activation,
    Granularity,
    MemoryModel,
    MemoryState,
    Read,
    Weights,
    act,
    check,
    primal,
    retained,
    with_pending,
)
from components.ops.memory.muon import newton_schulz


def naive_memory_update(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr: Tensor,
    momentum: Tensor | None,
    decay: Tensor | None,
    state: MemoryState,
    *,
    chunk_size: int,
    activation: Activation = "gelu",
    read: Read = "after_update",
    model: MemoryModel | None = None,
    granularity: Granularity = "token",
    checkpoint_chunks: int | None = None,
    compiled: bool = False,
    backend: str = "auto",
    omega: Tensor | None = None,
    final_state: bool = True,
) -> tuple[Tensor, MemoryState]:
    """Reference: the equations token by token; inner gradients by autograd at W_{t'}
    (create_graph=True, so outer gradients flow through them). Same signature as memory_update
    (checkpoint_chunks, compiled, backend and final_state do not apply to the reference: it
    always returns the state)."""
    model = model or MemoryModel(activation=activation)
    layers = check(q, k, v, lr, momentum, decay, state, model, omega)
    b, h, n, d = q.shape
    gate = lambda g, t, i: None if g is None else (g[:, :, t, i] if g.ndim >= 4 else g[:, :, t])  # noqa: E731
    scalar = lambda x: x[..., None, None]  # noqa: E731

    def alpha(a: Tensor, i: int) -> Tensor:
        """The forget gate of layer i shaped against its weights (b, h, d_in, d_out): one value
        per token and head, or per output channel (a decay (b, h, n, L, O): column o of W_i)."""
        return a[..., None, : state.weights[i].shape[-1]] if decay is not None and decay.ndim == 5 else scalar(a)

    def f(ws: Weights, x: Tensor) -> Tensor:  # x (b, h, d)
        y = x
        for i, w in enumerate(ws):
            y = torch.einsum("bhi,bhio->bho", y, w)
            if i < len(ws) - 1:
                y = act(model.activation, y)
        if model.norm is not None:
            y = F.layer_norm(y, y.shape[-1:], eps=model.eps) * model.norm[0] + model.norm[1]
        return x + y if model.residual else y

    outer = torch.is_grad_enabled()  # build the graph through the inner gradients only if needed

    def grads(ws: Weights, kt: Tensor, vt: Tensor, theta) -> Weights:
        """grad l_t at ws, times the step cap r_t when there is one (theta(i): layer i's step)."""
        ws = primal(ws, model)  # the KL retention: the gradient by W = c softmax(A), not by A
        ws = tuple(w if (outer and w.requires_grad) else w.detach().requires_grad_() for w in ws)
        losses = model.objective.loss(f(ws, kt), vt)  # (b, h); autograd differentiates it
        u = torch.autograd.grad(losses.sum(), ws, create_graph=outer)
        if model.step_cap is None:
            return u
        with torch.no_grad():
            curv = sum(theta(i) * g.pow(2).sum((-2, -1)) for i, g in enumerate(u))
            r = (model.step_cap * losses / curv.clamp_min(1e-30)).clamp(max=1.0)
        return tuple(scalar(r) * g for g in u)

    W, S = state.weights, state.momentum
    if granularity == "chunk":
        if read != "chunk_start":
            raise ValueError('granularity "chunk" needs read="chunk_start"')
        if model.omega_window > 1:
            raise ValueError('the Omega rule needs granularity "token"')
        r = state.offset
        k, v, lr, momentum, decay = with_pending(state, k, v, lr, momentum, decay)
        outs = []
        for t in range(r, r + n):
            outs.append(f(primal(W, model), q[:, :, t - r]))
            if (t + 1) % chunk_size == 0:  # the chunk is whole: one step with its mean gates
                s0 = t + 1 - chunk_size
                theta = lambda i: torch.stack([gate(lr, s, i) for s in range(s0, t + 1)]).mean(0)  # noqa: E731
                with torch.enable_grad():
                    us = (grads(W, k[:, :, s], v[:, :, s], theta) for s in range(s0, t + 1))
                    total = [sum(gs) for gs in zip(*us)]
                new_W, new_S = [], []
                for i in range(layers):
                    mean = lambda g: torch.stack([gate(g, s, i) for s in range(s0, t + 1)]).mean(0)  # noqa: E731
                    if model.muon_steps:  # ATLAS eqs. 32-33 with the chunk's summed gradient
                        sigma = total[i] if S is None else scalar(mean(momentum)) * S[i] + total[i]
                        step = -scalar(mean(lr)) * newton_schulz(sigma, model.muon_steps)
                        if S is not None:
                            new_S.append(sigma)
                    else:
                        step = -scalar(mean(lr)) * total[i]
                        if S is not None:
                            step = scalar(mean(momentum)) * S[i] + step
                            new_S.append(step)
                    if decay is not None and model.prior is not None:
                        step = step + alpha(mean(decay), i) * model.prior[i]
                    keep = 1 - alpha(mean(decay), i) if decay is not None else 1.0
                    new_W.append(keep * W[i] + step)
                W, S = tuple(new_W), tuple(new_S) if S is not None else None
                W = retained(W, model, model.prior, chunk_size)  # MIRAS eqs. 22-23, at the chunk's end
        left = (r + n) % chunk_size
        pending = None
        if left:
            tail = lambda t: None if t is None else t[:, :, r + n - left :]  # noqa: E731
            pending = (tail(k), tail(v), tail(lr), tail(momentum), tail(decay))
        out = torch.stack(outs, 2) if outs else q.new_zeros(b, h, 0, v.shape[-1])
        return out, MemoryState(W, S, None, left, pending)

    # the Omega rule's window (ATLAS eq. 9): the w - 1 tokens before this call in front, rows
    # before the sequence start zeros with gamma 0; gamma = 1 without gates
    P = model.omega_window - 1
    hk, hv, hg, hlr = state.history if state.history is not None else (
        k.new_zeros(b, h, P, k.shape[-1]), v.new_zeros(b, h, P, v.shape[-1]),
        k.new_zeros(b, h, P), lr.new_zeros(b, h, P, *lr.shape[3:]),
    )  # fmt: skip
    gamma = omega if omega is not None else torch.ones_like(k[..., 0])
    kx, vx, gx, lrx = torch.cat([hk, k], 2), torch.cat([hv, v], 2), torch.cat([hg, gamma], 2), torch.cat([hlr, lr], 2)
    anchor = state.anchor if state.anchor is not None else W
    offset = state.offset
    outs = []
    for t in range(n):
        if offset == 0:
            anchor = W  # a new chunk starts: gradients at its start state W_{t'}
        with torch.enable_grad():  # sum_{j = t-w+1}^{t} gamma_j grad l_j(W_{t'}) (row t + P is token t)
            u = None
            for j in range(t, t + P + 1):
                g = grads(anchor, kx[:, :, j], vx[:, :, j], lambda i, j=j: gate(lrx, j, i))
                g = g if P == 0 else tuple(scalar(gx[:, :, j]) * x for x in g)
                u = g if u is None else tuple(a + x for a, x in zip(u, g))
        new_W, new_S = [], []
        for i in range(layers):
            if model.muon_steps:  # ATLAS eqs. 32-33
                # S_t = eta_t S_{t-1} + u_t: momentum of raw gradients (u_t alone without momentum)
                sigma = u[i] if S is None else scalar(gate(momentum, t, i)) * S[i] + u[i]
                step = -scalar(gate(lr, t, i)) * newton_schulz(sigma, model.muon_steps)
                if S is not None:
                    new_S.append(sigma)
            else:
                step = -scalar(gate(lr, t, i)) * u[i]  # eq. 14 (momentary surprise)
                if S is not None:
                    step = scalar(gate(momentum, t, i)) * S[i] + step
                    new_S.append(step)
            if decay is not None and model.prior is not None:  # forget toward the prior
                step = step + alpha(gate(decay, t, i), i) * model.prior[i]
            keep = 1 - alpha(gate(decay, t, i), i) if decay is not None else 1.0
            new_W.append(keep * W[i] + step)  # eq. 13
        W, S = tuple(new_W), tuple(new_S) if S is not None else None
        outs.append(f(primal(anchor if read == "chunk_start" else W, model), q[:, :, t]))
        offset = (offset + 1) % chunk_size
        if offset == 0:  # the chunk is complete: the elastic-net retention (MIRAS eqs. 22-23)
            W = retained(W, model, model.prior, chunk_size)
    out = torch.stack(outs, 2) if outs else q.new_zeros(b, h, 0, v.shape[-1])
    tail = lambda t: t[:, :, t.shape[2] - P :]  # noqa: E731
    history = (tail(kx), tail(vx), tail(gx), tail(lrx)) if P else None
    return out, MemoryState(W, S, anchor if offset else None, offset, history=history)
