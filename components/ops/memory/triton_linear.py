"""A Triton kernel for the chunk loop of the linear (matrix) memory, forward and backward.

One program per (batch, head): the state M (and S, P) stays on chip in float32 for the whole
sequence, the loop over chunks runs inside the kernel (one launch per call instead of ~100
small kernels per chunk), the inputs may be bf16. The math is `step.chunk_step` and
`backward.chunk_backward` for depth 1 (names as there; D = the capped deltas 2 r (kM - v)):

    forward, per chunk    z = k M,  D = 2 r (z [+ k] - v),  t = q k^T
                          y = (G o t) D + beta o qM + (1 - beta) o qP + f o qS  [+ q]
                          M' = beta_c M + (1 - beta_c) P + f_c S + k^T (g o D),  S' = m_c S + k^T (n o D)
    backward, in reverse  from the chunk-start states the forward stored, the intermediates are
                          recomputed on chip and every gradient of the chunk is one pass

The coefficients come in from `coefficients.coefficients` (autograd takes their gradients to
the gates). Runs on CUDA; on CPU tensors under TRITON_INTERPRET=1 (how CI tests it against the
naive reference, tests/components/test_memory_triton.py).

The autograd wrapper that launches it is `triton_loop.TritonLoop`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from components.ops.memory.triton_parts import dot, read, read_backward, state, state_backward, store_layer_grads


@triton.jit
def _tile(p, off, D: tl.constexpr, ON: tl.constexpr):
    """A (D, D) tile at offset `off`, float32; zeros when not ON."""
    rd = tl.arange(0, D)
    t = tl.zeros((D, D), tl.float32)
    if ON:
        t = tl.load(p + off + rd[:, None] * D + rd[None, :]).to(tl.float32)
    return t


@triton.jit
def _deltas(kj, vj, M, th_ptr, cap, C: tl.constexpr, CAP: tl.constexpr, RESIDUAL: tl.constexpr):
    """D = 2 r (kM [+ k] - v) and r, with r = min(1, cap |err|^2 / (theta |k|^2 |2 err|^2))."""
    err = dot(kj, M) - vj
    if RESIDUAL:
        err += kj
    Dl = 2 * err
    r = tl.full((C,), 1.0, tl.float32)
    if CAP:
        curv = tl.load(th_ptr + tl.arange(0, C)) * tl.sum(kj * kj, 1) * tl.sum(Dl * Dl, 1)
        r = tl.minimum(cap * tl.sum(err * err, 1) / tl.maximum(curv, 1e-30), 1.0)
        Dl = Dl * r[:, None]
    return Dl, r


@triton.jit
def _linear_fwd(
    q, k, v, theta, beta, f, G, beta_last, f_last, g_last, m_last, n_last,
    M0, S0, P, y, M_out, S_out, M_starts, S_starts,
    K, n, cap,
    C: tl.constexpr, D: tl.constexpr, HAS_S: tl.constexpr, HAS_P: tl.constexpr, CAP: tl.constexpr,
    RESIDUAL: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    rc, rd = tl.arange(0, C), tl.arange(0, D)
    sq = rd[:, None] * D + rd[None, :]  # a (D, D) state tile
    M = _tile(M0, b * D * D, D, True)
    S = _tile(S0, b * D * D, D, HAS_S)
    Pm = _tile(P, b * D * D, D, HAS_P)
    for j in range(K):
        cs = b * K + j  # this chunk's coefficients: per token at cs * C, per chunk at cs
        tl.store(M_starts + cs * D * D + sq, M)
        if HAS_S:
            tl.store(S_starts + cs * D * D + sq, S)
        rows = b * n * D + (j * C + rc)[:, None] * D + rd[None, :]
        qj = tl.load(q + rows).to(tl.float32)
        kj = tl.load(k + rows).to(tl.float32)
        Dl, r = _deltas(kj, tl.load(v + rows).to(tl.float32), M, theta + cs * C, cap, C, CAP, RESIDUAL)
        cj = cs * C + rc
        Gj = tl.load(G + cs * C * C + rc[:, None] * C + rc[None, :])
        fv = tl.load(f + cj) if HAS_S else tl.zeros((C,), tl.float32)
        out, t = read(qj, kj, Dl, M, Pm, S, Gj, tl.load(beta + cj), fv, HAS_S, HAS_P)
        if RESIDUAL:
            out += qj
        tl.store(y + rows, out)
        fl, ml, nl = 0.0, 0.0, fv
        if HAS_S:
            fl, ml, nl = tl.load(f_last + cs), tl.load(m_last + cs), tl.load(n_last + cj)
        M, S = state(kj, Dl, M, Pm, S, tl.load(beta_last + cs), tl.load(g_last + cj), fl, ml, nl, HAS_S, HAS_P)
    tl.store(M_out + b * D * D + sq, M)
    if HAS_S:
        tl.store(S_out + b * D * D + sq, S)


@triton.jit
def _linear_bwd(
    q, k, v, theta, beta, f, G, beta_last, f_last, g_last, m_last, n_last, P, M_starts, S_starts,
    dy, dM_end, dS_end, dq, dk, dv, dbeta, df, dG, dbeta_last, df_last, dg_last, dm_last, dn_last,
    dM0, dS0, dP,
    K, n, cap,
    C: tl.constexpr, D: tl.constexpr, HAS_S: tl.constexpr, HAS_P: tl.constexpr, CAP: tl.constexpr,
    RESIDUAL: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    rc, rd = tl.arange(0, C), tl.arange(0, D)
    sq = rd[:, None] * D + rd[None, :]
    cc = rc[:, None] * C + rc[None, :]
    dM = _tile(dM_end, b * D * D, D, True)
    dS = _tile(dS_end, b * D * D, D, HAS_S)
    Pm = _tile(P, b * D * D, D, HAS_P)
    dPm = _tile(P, 0, D, False)
    S = _tile(P, 0, D, False)
    for jj in range(K):
        j = K - 1 - jj
        cs = b * K + j
        M = tl.load(M_starts + cs * D * D + sq)
        if HAS_S:
            S = tl.load(S_starts + cs * D * D + sq)
        rows = b * n * D + (j * C + rc)[:, None] * D + rd[None, :]
        qj = tl.load(q + rows).to(tl.float32)
        kj = tl.load(k + rows).to(tl.float32)
        dyj = tl.load(dy + rows).to(tl.float32)
        Dl, r = _deltas(kj, tl.load(v + rows).to(tl.float32), M, theta + cs * C, cap, C, CAP, RESIDUAL)
        cj = cs * C + rc
        Gj = tl.load(G + cs * C * C + cc)
        bt = tl.load(beta + cj)
        fv = tl.load(f + cj) if HAS_S else tl.zeros((C,), tl.float32)
        t = dot(qj, tl.trans(kj))
        # 1. the end-of-chunk state
        fl, ml, nl = 0.0, 0.0, fv
        if HAS_S:
            fl, ml, nl = tl.load(f_last + cs), tl.load(m_last + cs), tl.load(n_last + cj)
        gM, gS, dPs, dD, dkj, dbl, dgl, dfl, dml, dnl = state_backward(
            kj, Dl, M, Pm, S, tl.load(beta_last + cs), tl.load(g_last + cj), fl, ml, nl, dM, dS, HAS_S, HAS_P
        )
        # 2. the read
        dqj, gMr, dPr, gSr, dDr, dkr, dGj, dbt, dfv = read_backward(
            qj, kj, Dl, M, Pm, S, Gj, t, bt, fv, dyj, HAS_S, HAS_P
        )
        gM += gMr
        dPm += dPs + dPr
        dD += dDr
        dkj += dkr
        if RESIDUAL:
            dqj += dyj
        # 3. the inner backward of a linear memory: D = 2 r (kM [+ k] - v)
        de = 2 * r[:, None] * dD
        gM += dot(tl.trans(kj), de)
        dkj += dot(de, tl.trans(M))
        if RESIDUAL:
            dkj += de
        tl.store(dq + rows, dqj)
        tl.store(dk + rows, dkj)
        tl.store(dv + rows, -de)
        store_layer_grads(
            dbeta_last, dg_last, dbeta, dG, df_last, dm_last, dn_last, df, cs, C,
            dbl, dgl, dbt, dGj, dfl, dml, dnl, dfv, HAS_S,
        )  # fmt: skip
        dM = gM
        dS = gS + gSr
    tl.store(dM0 + b * D * D + sq, dM)
    if HAS_S:
        tl.store(dS0 + b * D * D + sq, dS)
    if HAS_P:
        tl.store(dP + b * D * D + sq, dPm)
