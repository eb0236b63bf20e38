"""A Triton kernel for the chunk loop of the 2-layer MLP memory (the paper's L_M = 2), forward
and backward: f(x) = act(x W_1) W_2 [+ x], per-token gates with one coefficient set per layer.

The same layout as `triton_linear` (one program per (batch, head), states on chip in float32
for the whole sequence, the chunk loop inside the kernel) and the same math as
`step.chunk_step` / `backward.chunk_backward` at depth 2, written out per layer:

    keys      z1 = k M1, a2 = act(z1), err = a2 M2 [+ k] - v
              D2 = 2 r err, D1 = act'(z1) o (D2 M2^T)      (r: the step cap, a constant)
    reads     zq1 = (G1 o q k^T) D1 + beta1 o q M1 + (1 - beta1) o q P1 + f1 o q S1,  x2 = act(zq1)
              y = (G2 o x2 a2^T) D2 + beta2 o x2 M2 + ...  [+ q]
    state     M_l' = beta_l,c M_l + (1 - beta_l,c) P_l + f_l,c S_l + a_l^T (g_l o D_l), S_l' likewise

The backward recomputes each chunk's intermediates on chip from the chunk-start states the
forward stored; the second-order terms of the inner backward use act''. Tested on CPU under
TRITON_INTERPRET=1 against the naive reference (tests/components/test_memory_triton.py).

The autograd wrapper that launches it is `triton_loop.TritonLoop`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from components.ops.memory.triton_parts import dot, read, read_backward, state, state_backward, store_layer_grads


@triton.jit
def _act(z, SILU: tl.constexpr):
    if SILU:
        return z / (1 + tl.exp(-z))
    return 0.5 * z * (1 + tl.math.erf(z * 0.7071067811865476))


@triton.jit
def _act1(z, SILU: tl.constexpr):
    """act'(z)."""
    if SILU:
        s = 1 / (1 + tl.exp(-z))
        return s * (1 + z * (1 - s))
    return 0.5 * (1 + tl.math.erf(z * 0.7071067811865476)) + z * tl.exp(-0.5 * z * z) * 0.3989422804014327


@triton.jit
def _act2(z, SILU: tl.constexpr):
    """act''(z)."""
    if SILU:
        s = 1 / (1 + tl.exp(-z))
        return s * (1 - s) * (2 + z * (1 - 2 * s))
    return tl.exp(-0.5 * z * z) * 0.3989422804014327 * (2 - z * z)


@triton.jit
def _pair(p1, p2, off, D: tl.constexpr, E: tl.constexpr, ON: tl.constexpr):
    """A layer-1 (D, E) and layer-2 (E, D) tile at offset `off`, float32; zeros when not ON."""
    rd, re = tl.arange(0, D), tl.arange(0, E)
    a = tl.zeros((D, E), tl.float32)
    b = tl.zeros((E, D), tl.float32)
    if ON:
        a = tl.load(p1 + off + rd[:, None] * E + re[None, :]).to(tl.float32)
        b = tl.load(p2 + off + re[:, None] * D + rd[None, :]).to(tl.float32)
    return a, b


@triton.jit
def _keys(kj, vj, M1, M2, th_ptr, cap, C: tl.constexpr, CAP: tl.constexpr, RESIDUAL: tl.constexpr, SILU: tl.constexpr):
    """The keys pass of one chunk: z1, a2, the capped deltas D1, D2, carried = D2 M2^T (capped), r."""
    z1 = dot(kj, M1)
    a2 = _act(z1, SILU)
    err = dot(a2, M2) - vj
    if RESIDUAL:
        err += kj
    D2 = 2 * err
    carried = dot(D2, tl.trans(M2))
    D1 = _act1(z1, SILU) * carried
    r = tl.full((C,), 1.0, tl.float32)
    if CAP:  # r = min(1, cap |err|^2 / sum_l theta_l |a_l|^2 |D_l|^2)
        rc = tl.arange(0, C)
        th1 = tl.load(th_ptr + rc)
        th2 = tl.load(th_ptr + C + rc)
        curv = th1 * tl.sum(kj * kj, 1) * tl.sum(D1 * D1, 1) + th2 * tl.sum(a2 * a2, 1) * tl.sum(D2 * D2, 1)
        r = tl.minimum(cap * tl.sum(err * err, 1) / tl.maximum(curv, 1e-30), 1.0)
        D1 = D1 * r[:, None]
        D2 = D2 * r[:, None]
        carried = carried * r[:, None]
    return z1, a2, D1, D2, carried, r


@triton.jit
def _mlp_fwd(
    q, k, v, theta, beta, f, G, beta_last, f_last, g_last, m_last, n_last,
    M1_0, M2_0, S1_0, S2_0, P1_, P2_, y, M1_out, M2_out, S1_out, S2_out, M1_st, M2_st, S1_st, S2_st,
    K, n, cap,
    C: tl.constexpr, D: tl.constexpr, E: tl.constexpr, HAS_S: tl.constexpr, HAS_P: tl.constexpr,
    CAP: tl.constexpr, RESIDUAL: tl.constexpr, SILU: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    rc, rd, re = tl.arange(0, C), tl.arange(0, D), tl.arange(0, E)
    de = rd[:, None] * E + re[None, :]  # (D, E) tile of layer 1
    ed = re[:, None] * D + rd[None, :]  # (E, D) tile of layer 2
    cc = rc[:, None] * C + rc[None, :]
    w = b * D * E
    M1, M2 = _pair(M1_0, M2_0, w, D, E, True)
    S1, S2 = _pair(S1_0, S2_0, w, D, E, HAS_S)
    P1, P2 = _pair(P1_, P2_, w, D, E, HAS_P)
    zc = tl.zeros((C,), tl.float32)
    for j in range(K):
        st = (b * K + j) * D * E
        tl.store(M1_st + st + de, M1)
        tl.store(M2_st + st + ed, M2)
        if HAS_S:
            tl.store(S1_st + st + de, S1)
            tl.store(S2_st + st + ed, S2)
        rows = b * n * D + (j * C + rc)[:, None] * D + rd[None, :]
        qj = tl.load(q + rows).to(tl.float32)
        kj = tl.load(k + rows).to(tl.float32)
        vj = tl.load(v + rows).to(tl.float32)
        s1 = (b * K + j) * 2  # per-chunk scalars of layer 1; layer 2 at + 1
        c1 = s1 * C + rc  # per-token coefficients of layer 1; layer 2 at + C
        z1, a2, D1, D2, carried, r = _keys(kj, vj, M1, M2, theta + s1 * C, cap, C, CAP, RESIDUAL, SILU)
        f1 = tl.load(f + c1) if HAS_S else zc
        f2 = tl.load(f + c1 + C) if HAS_S else zc
        zq, t1 = read(qj, kj, D1, M1, P1, S1, tl.load(G + s1 * C * C + cc), tl.load(beta + c1), f1, HAS_S, HAS_P)
        x2 = _act(zq, SILU)
        out, t2 = read(
            x2, a2, D2, M2, P2, S2, tl.load(G + (s1 + 1) * C * C + cc), tl.load(beta + c1 + C), f2, HAS_S, HAS_P
        )  # noqa: E501
        if RESIDUAL:
            out += qj
        tl.store(y + rows, out)
        fl1, ml1, nl1, fl2, ml2, nl2 = 0.0, 0.0, zc, 0.0, 0.0, zc
        if HAS_S:
            fl1, ml1, nl1 = tl.load(f_last + s1), tl.load(m_last + s1), tl.load(n_last + c1)
            fl2, ml2, nl2 = tl.load(f_last + s1 + 1), tl.load(m_last + s1 + 1), tl.load(n_last + c1 + C)
        M1, S1 = state(kj, D1, M1, P1, S1, tl.load(beta_last + s1), tl.load(g_last + c1), fl1, ml1, nl1, HAS_S, HAS_P)
        M2, S2 = state(
            a2, D2, M2, P2, S2, tl.load(beta_last + s1 + 1), tl.load(g_last + c1 + C), fl2, ml2, nl2, HAS_S, HAS_P
        )  # noqa: E501
    tl.store(M1_out + w + de, M1)
    tl.store(M2_out + w + ed, M2)
    if HAS_S:
        tl.store(S1_out + w + de, S1)
        tl.store(S2_out + w + ed, S2)


@triton.jit
def _mlp_bwd(
    q, k, v, theta, beta, f, G, beta_last, f_last, g_last, m_last, n_last, P1_, P2_, M1_st, M2_st, S1_st, S2_st,
    dy, dM1_end, dM2_end, dS1_end, dS2_end, dq, dk, dv,
    dbeta, df, dG, dbeta_last, df_last, dg_last, dm_last, dn_last, dM1_0, dM2_0, dS1_0, dS2_0, dP1_, dP2_,
    K, n, cap,
    C: tl.constexpr, D: tl.constexpr, E: tl.constexpr, HAS_S: tl.constexpr, HAS_P: tl.constexpr,
    CAP: tl.constexpr, RESIDUAL: tl.constexpr, SILU: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    rc, rd = tl.arange(0, C), tl.arange(0, D)
    cc = rc[:, None] * C + rc[None, :]
    w = b * D * E
    dM1, dM2 = _pair(dM1_end, dM2_end, w, D, E, True)
    dS1, dS2 = _pair(dS1_end, dS2_end, w, D, E, HAS_S)
    P1, P2 = _pair(P1_, P2_, w, D, E, HAS_P)
    S1, S2 = _pair(P1_, P2_, w, D, E, False)  # zeros; the chunk-start S are loaded in the loop
    dP1, dP2 = _pair(P1_, P2_, w, D, E, False)
    zc = tl.zeros((C,), tl.float32)
    for jj in range(K):
        j = K - 1 - jj
        st = (b * K + j) * D * E
        M1, M2 = _pair(M1_st, M2_st, st, D, E, True)
        if HAS_S:
            S1, S2 = _pair(S1_st, S2_st, st, D, E, True)
        rows = b * n * D + (j * C + rc)[:, None] * D + rd[None, :]
        qj = tl.load(q + rows).to(tl.float32)
        kj = tl.load(k + rows).to(tl.float32)
        vj = tl.load(v + rows).to(tl.float32)
        dyj = tl.load(dy + rows).to(tl.float32)
        s1 = (b * K + j) * 2
        c1 = s1 * C + rc
        # recompute the chunk: keys, then the first read layer
        z1, a2, D1, D2, carried, r = _keys(kj, vj, M1, M2, theta + s1 * C, cap, C, CAP, RESIDUAL, SILU)
        G1, G2 = tl.load(G + s1 * C * C + cc), tl.load(G + (s1 + 1) * C * C + cc)
        b1, b2 = tl.load(beta + c1), tl.load(beta + c1 + C)
        f1 = tl.load(f + c1) if HAS_S else zc
        f2 = tl.load(f + c1 + C) if HAS_S else zc
        zq, t1 = read(qj, kj, D1, M1, P1, S1, G1, b1, f1, HAS_S, HAS_P)
        x2 = _act(zq, SILU)
        t2 = dot(x2, tl.trans(a2))
        # 1. the end-of-chunk state, both layers
        fl1, ml1, nl1, fl2, ml2, nl2 = 0.0, 0.0, zc, 0.0, 0.0, zc
        if HAS_S:
            fl1, ml1, nl1 = tl.load(f_last + s1), tl.load(m_last + s1), tl.load(n_last + c1)
            fl2, ml2, nl2 = tl.load(f_last + s1 + 1), tl.load(m_last + s1 + 1), tl.load(n_last + c1 + C)
        gM1, gS1, dPs1, dD1, dk1, dbl1, dgl1, dfl1, dml1, dnl1 = state_backward(
            kj, D1, M1, P1, S1, tl.load(beta_last + s1), tl.load(g_last + c1), fl1, ml1, nl1, dM1, dS1, HAS_S, HAS_P
        )
        gM2, gS2, dPs2, dD2, da2, dbl2, dgl2, dfl2, dml2, dnl2 = state_backward(
            a2, D2, M2, P2, S2, tl.load(beta_last + s1 + 1), tl.load(g_last + c1 + C), fl2, ml2, nl2, dM2, dS2,
            HAS_S, HAS_P,
        )  # fmt: skip
        # 2. the reads, layer 2 (input x2) then layer 1 (input q)
        dx, gM, dP, gS, dD, da, dG2, dbt2, dfv2 = read_backward(
            x2, a2, D2, M2, P2, S2, G2, t2, b2, f2, dyj, HAS_S, HAS_P
        )
        gM2 += gM
        dP2 += dPs2 + dP
        gS2 += gS
        dD2 += dD
        da2 += da
        dz = _act1(zq, SILU) * dx
        dqj, gM, dP, gS, dD, da, dG1, dbt1, dfv1 = read_backward(
            qj, kj, D1, M1, P1, S1, G1, t1, b1, f1, dz, HAS_S, HAS_P
        )
        gM1 += gM
        dP1 += dPs1 + dP
        gS1 += gS
        dD1 += dD
        dk1 += da
        if RESIDUAL:
            dqj += dyj
        # 3. the inner backward (D1 = act'(z1) o carried, carried = D2 M2^T), then the keys' forward
        dcarried = _act1(z1, SILU) * dD1
        dz1 = _act2(z1, SILU) * carried * dD1
        dD2 += dot(dcarried, M2)
        gM2 += dot(tl.trans(dcarried), D2)
        d_err = 2 * r[:, None] * dD2
        gM2 += dot(tl.trans(a2), d_err)
        da2 += dot(d_err, tl.trans(M2))
        dz1 += _act1(z1, SILU) * da2
        gM1 += dot(tl.trans(kj), dz1)
        dk1 += dot(dz1, tl.trans(M1))
        if RESIDUAL:
            dk1 += d_err
        tl.store(dq + rows, dqj)
        tl.store(dk + rows, dk1)
        tl.store(dv + rows, -d_err)
        store_layer_grads(
            dbeta_last, dg_last, dbeta, dG, df_last, dm_last, dn_last, df, s1, C,
            dbl1, dgl1, dbt1, dG1, dfl1, dml1, dnl1, dfv1, HAS_S,
        )  # fmt: skip
        store_layer_grads(
            dbeta_last, dg_last, dbeta, dG, df_last, dm_last, dn_last, df, s1 + 1, C,
            dbl2, dgl2, dbt2, dG2, dfl2, dml2, dnl2, dfv2, HAS_S,
        )  # fmt: skip
        dM1, dM2, dS1, dS2 = gM1, gM2, gS1, gS2
    re = tl.arange(0, E)
    de = rd[:, None] * E + re[None, :]
    ed = re[:, None] * D + rd[None, :]
    tl.store(dM1_0 + w + de, dM1)
    tl.store(dM2_0 + w + ed, dM2)
    if HAS_S:
        tl.store(dS1_0 + w + de, dS1)
        tl.store(dS2_0 + w + ed, dS2)
    if HAS_P:
        tl.store(dP1_ + w + de, dP1)
        tl.store(dP2_ + w + ed, dP2)
