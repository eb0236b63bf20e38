"""The outer backward of the chunk loop, written by hand (an autograd.Function).

Autograd through `chunk_step` records ~40 small ops per chunk and layer and replays each in
the backward with its own allocation; here the backward of a chunk is a fixed sequence of
bmm / baddbmm_ on the tensors the forward kept (`Saved`), in reverse over the chunks:

    1. the end-of-chunk state  M' = beta_c M + (1 - beta_c) P + f_c S + a^T (g o D),
                               S' = m_c S + a^T (n o D)
    2. the reads               after_update: z = (G o x a^T) D + beta o xM + (1 - beta) o xP + f o xS
                               per layer, x the previous layer's act(z); chunk_start: f_M(q)
    3. the inner backward      D_L = r grad l(f_M(k), v) (l2: 2 r (f_M(k) - v); the objective's
                               jacobians), D_l = act'(z_l) o (D_{l+1} M_{l+1}^T)
                               (second derivatives: act''), then the keys' forward z_l = a_l M_l

(D: the capped deltas r o delta, r constant; a: each layer's input; names as in
`coefficients.Coefficients`). The gradients of the coefficients go back to autograd, which
takes them to the gates through the log-space cumulative sums. A LayerNorm'd memory and autocast
keep autograd (`hand_backward_applies`). Compiled (`Setting.compiled`), the chunk step and its
backward are each one torch.compile'd function (elementwise passes fused around the bmm calls;
on this CPU 1.07-1.16x the eager loop, where autograd through the compiled step was 0.79x of it:
docs/benchmarks.md). Exact against the naive token loop in float64 (tests/components/test_memory_op.py).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from components.ops.memory.coefficients import Coefficients, per_chunk
from components.ops.memory.common import act_backward, act_second, autocast_on, beyond_plain_rule, compile_once
from components.ops.memory.step import Setting, chunk_step


def hand_backward_applies(q: Tensor, setting) -> bool:
    """The chunk loop's backward is written for eq. 12's one-token rule with gradient descent
    (any objective): the mechanisms beyond it (`beyond_plain_rule`: the Omega rule, Muon, the l1,
    KL and l_q retentions, a decay per channel) keep autograd, as a LayerNorm'd memory does."""
    plain = setting.model.norm is None and not beyond_plain_rule(setting.model, setting.channelwise)
    return plain and not autocast_on(q) and torch.is_grad_enabled()


def _dot(x: Tensor, y: Tensor) -> Tensor:
    """<x, y> per batch element of (B, i, o) tensors -> (B, 1, 1) (a multiply and a sum: 5x
    faster on CPU than the same dot as a (1, io) x (io, 1) bmm)."""
    return (x * y).sum((-2, -1), keepdim=True)


def _rowdot(x: Tensor, y: Tensor) -> Tensor:
    """Row-wise <x_t, y_t> of (B, c, o) tensors -> (B, c, 1)."""
    return (x * y).sum(-1, keepdim=True)


class ChunkLoop(torch.autograd.Function):
    """Whole chunks q, k, v (B, K, c, d) with their coefficients (B, K, L', ...) from states
    M, S (per layer (B, i, o); S None without momentum) -> reads (B, K c, d) and the end state."""

    @staticmethod
    def run(setting, q, k, v, co: Coefficients, M, S):
        depth, has_S = len(M), S is not None
        P = setting.prior or ()
        out = ChunkLoop.apply(setting, depth, has_S, q, k, v, *co, *M, *(S or ()), *P)
        B, K, c, _ = q.shape
        y = out[0].reshape(B, K * c, v.shape[-1])  # reads have the values' width (keys may be wider)
        return y, tuple(out[1 : 1 + depth]), tuple(out[1 + depth :]) if has_S else None

    @staticmethod
    def forward(ctx, setting, depth, has_S, q, k, v, *tensors):
        co = Coefficients(*tensors[:9])
        M = tuple(tensors[9 : 9 + depth])
        S = tuple(tensors[9 + depth : 9 + 2 * depth]) if has_S else None
        P = tuple(tensors[9 + (2 if has_S else 1) * depth :]) or None
        step_setting = Setting(setting.model, None, P, setting.read, setting.chunk_size, None, setting.compiled)
        step = compile_once(chunk_step) if setting.compiled else chunk_step
        per = per_chunk(co, depth)
        ys, starts, saved = [], [], []
        for j in range(q.shape[1]):
            starts.append((M, S))
            y, M, S, s = step(M, M, S, q[:, j], k[:, j], v[:, j], per[j], step_setting)
            ys.append(y)
            saved.append(s)
        ctx.setting, ctx.depth, ctx.has_S, ctx.P = step_setting, depth, has_S, P
        ctx.co, ctx.per, ctx.starts, ctx.saved = co, per, starts, saved
        return (torch.stack(ys, 1), *M, *(S or ()))

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, *dstate):
        setting, depth, P, co = ctx.setting, ctx.depth, ctx.P, ctx.co
        dM = list(dstate[:depth])
        dS = list(dstate[depth:]) if ctx.has_S else None
        dP = [torch.zeros_like(p) for p in P] if P is not None else None
        K = dy.shape[1]
        per_chunk_grads, dqkv = [None] * K, [None] * K
        back = compile_once(chunk_backward) if setting.compiled else chunk_backward
        for j in reversed(range(K)):
            M, S = ctx.starts[j]
            dM, dS, dqkv[j], per_chunk_grads[j] = back(setting, M, S, ctx.per[j], ctx.saved[j], dy[:, j], dM, dS, dP)
            ctx.saved[j] = None  # free as we go
        dq, dk, dv = (torch.stack(t, 1) for t in zip(*dqkv))
        return (None, None, None, dq, dk, dv, *_stack_grads(co, per_chunk_grads), *dM, *(dS or ()), *(dP or ()))


def _stack_grads(co: Coefficients, per_chunk_grads: list[list[dict]]) -> list[Tensor | None]:
    """Per chunk, per layer {field: grad (B, ...)} -> per field (B, K, L', ...) like `co` (layers
    sharing a gate slot add up); None for absent fields and theta (it only sets the cap)."""
    out = []
    for name, t in co._asdict().items():
        if t is None or name not in per_chunk_grads[0][0]:
            out.append(None if t is None or name == "theta" else torch.zeros_like(t))
            continue
        slots = t.shape[2]
        chunks = []
        for grads in per_chunk_grads:
            per_slot = [None] * slots
            for i, g in enumerate(grads):
                s = min(i, slots - 1)
                per_slot[s] = g[name] if per_slot[s] is None else per_slot[s] + g[name]
            chunks.append(torch.stack(per_slot, 1))
        out.append(torch.stack(chunks, 1))
    return out


def chunk_backward(setting, M, S, co, saved, dy, dM, dS, dP):
    """One chunk in reverse: gradients of its start state (returned) and inputs, its
    coefficients per layer (dicts by field name), the prior's accumulated into dP in place."""
    model, P, read = setting.model, setting.prior, setting.read
    name, depth = model.activation, len(M)
    keys = saved.keys
    a, zk, D, carried = keys.inputs, keys.pre, keys.deltas, keys.carried
    grads = [{} for _ in range(depth)]
    gM, gS, dD, da = [], [], [], []

    # 1. the end-of-chunk state
    for i in range(depth):
        c, g = co[i], grads[i]
        gM.append(dM[i] * c.beta_last)
        g["beta_last"] = _dot(dM[i], M[i]) if P is None else _dot(dM[i], M[i]) - _dot(dM[i], P[i])
        if P is not None:
            dP[i].addcmul_(dM[i], 1 - c.beta_last)
        hm = a[i] @ dM[i]
        dD.append(c.neg_g_last * hm)
        g["neg_g_last"] = _rowdot(D[i], hm)
        da.append((c.neg_g_last * D[i]) @ dM[i].transpose(-1, -2))
        if S is not None:
            gS.append(torch.addcmul(dS[i] * c.m_last, dM[i], c.f_last))
            g["f_last"], g["m_last"] = _dot(dM[i], S[i]), _dot(dS[i], S[i])
            hs = a[i] @ dS[i]
            dD[i].addcmul_(c.neg_n_last, hs)
            g["neg_n_last"] = _rowdot(D[i], hs)
            da[i].baddbmm_(c.neg_n_last * D[i], dS[i].transpose(-1, -2))

    # 2. the reads
    dq = dy if model.residual else None
    dz = dy
    for i in reversed(range(depth)):
        x = saved.x[i]
        if read == "chunk_start":
            gM[i].baddbmm_(x.transpose(-1, -2), dz)
            dx = dz @ M[i].transpose(-1, -2)
        else:
            c, g = co[i], grads[i]
            g["beta"] = _rowdot(dz, saved.xm[i]) if P is None else _rowdot(dz, saved.xm[i] - saved.xp[i])
            bdz = c.beta * dz
            gM[i].baddbmm_(x.transpose(-1, -2), bdz)
            dx = bdz @ M[i].transpose(-1, -2)
            if P is not None:
                pdz = dz - bdz  # (1 - beta) dz
                dP[i].baddbmm_(x.transpose(-1, -2), pdz)
                dx.baddbmm_(pdz, P[i].transpose(-1, -2))
            if S is not None:
                g["f"] = _rowdot(dz, saved.xs[i])
                fdz = c.f * dz
                gS[i].baddbmm_(x.transpose(-1, -2), fdz)
                dx.baddbmm_(fdz, S[i].transpose(-1, -2))
            t = saved.t[i]
            dD[i].baddbmm_((c.neg_G * t).transpose(-1, -2), dz)
            dgt = dz @ D[i].transpose(-1, -2)  # d loss / d (G o t), (B, c, c)
            g["neg_G"] = dgt * t  # also above the diagonal, where G is 0: exact for any G
            dt = dgt * c.neg_G
            dx.baddbmm_(dt, a[i])
            da[i].baddbmm_(dt.transpose(-1, -2), x)
        if i:
            dz = act_backward(name, dx, saved.z[i - 1])
        else:
            dq = dx if dq is None else dq + dx

    # 3. the inner backward (D_l = act'(z_l) o carried_l, carried_l = D_{l+1} M_{l+1}^T), then the keys' forward
    dzk: list[Tensor | None] = [None] * depth
    for i in range(depth - 1):
        dcarried = act_backward(name, dD[i], zk[i])
        dzk[i] = act_second(name, zk[i]) * carried[i] * dD[i]
        dD[i + 1].baddbmm_(dcarried, M[i + 1])
        gM[i + 1].baddbmm_(dcarried.transpose(-1, -2), D[i + 1])
    # D_L = r grad l(pred, v) (l2: 2 r (pred - v)): through the objective's per-coordinate jacobians
    d_pred, d_v = keys.jacobians
    dD_L = dD[-1] if keys.r is None else keys.r * dD[-1]
    de, dv = d_pred * dD_L, d_v * dD_L
    dk = de if model.residual else None
    dzk[-1] = de if dzk[-1] is None else dzk[-1] + de
    for i in reversed(range(depth)):
        gM[i].baddbmm_(a[i].transpose(-1, -2), dzk[i])
        da[i].baddbmm_(dzk[i], M[i].transpose(-1, -2))
        if i:
            dzk[i - 1] = dzk[i - 1] + act_backward(name, da[i], zk[i - 1])
        else:
            dk = da[0] if dk is None else dk + da[0]
    return gM, gS if S is not None else None, (dq, dk, dv), grads
