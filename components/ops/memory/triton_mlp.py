"""Triton kernels for the chunk loop of the 2-layer MLP memory (the paper's L_M = 2), forward and
backward: f(x) = act(x W_1) W_2 [+ x], per-token gates, one coefficient set per layer.

The math is `step.chunk_step` and `backward.chunk_backward` at depth 2, per layer (names as in
`triton_linear`; r the step cap, a constant in the backward):

    keys      z1 = k M1, a2 = act(z1), err = a2 M2 [+ k] - v
              D2 = 2 r err, D1 = act'(z1) o (D2 M2^T)
    reads     zq = (G1 o q k^T) D1 + beta1 o q M1 + (1 - beta1) o q P1 + f1 o q S1,  x2 = act(zq)
              y = (G2 o x2 a2^T) D2 + beta2 o x2 M2 + ...  [+ q]
    state     M_l' = beta_l,c M_l + (1 - beta_l,c) P_l + f_l,c S_l + a_l^T (g_l o D_l), S_l' likewise

The layers mix every hidden unit (err sums over them, and so does r), so unlike the linear
memory no kernel can own a slice of the state for the whole sequence. A chunk's (d, e) states
do not fit on chip either (4 x 64 KB at d 64, e 256: the kernel that held them took 864 s to
compile for sm_90 and asked for 463 KB of shared memory). So the states live in global memory,
one slot per chunk (as the torch path keeps each chunk's start state), and every kernel
walks the hidden width in tiles of BE (a (C, BE) slice of z1, a2, D1, zq, a (d, BE) / (BE, d)
slice of each state); the chunks' dependence is kept to two sequential kernels:

    forward   _state_fwd    grid (B): the chunks in order, three passes over the hidden
                            tiles (keys and err; D1 and r; the end states); stores z1, D1, D2,
                            r and every chunk's start state
              _read_fwd     grid (B K): every chunk's reads at once; stores zq
    backward  _chunk_bwd    grid (B K), READS: what each chunk's reads send to its start state
                            (through the reads and through D1, D2), into the gradient slots
              _state_bwd    grid (B): the chunks in reverse: adds what reaches the start state
                            through the end state (directly and through D1, D2)
              _chunk_bwd    grid (B K), ALL: every other gradient of every chunk at once, from
                            both parts

Passes that read what an earlier pass of the same program wrote in global memory are separated
by a barrier (`tl.debug_barrier`). Layouts: q, k, v, y, D2 (B, K, C, d); z1, D1, zq (B, K, C, e);
state slots (B, K + 1, d, e) and (B, K + 1, e, d); coefficients (B, K, 2, size) float32.
Tested on CPU under TRITON_INTERPRET=1 (tests/components/test_memory_triton.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from components.ops.memory.triton_parts import GRAD_FIELDS, LAUNCH, Buffers, dot, load, state


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
def _tiles(e, C: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BE: tl.constexpr):
    """Offsets of hidden tile e: (D, BE) of a (D, E) state, (BE, D) of an (E, D) one, (C, BE) of a
    chunk's (C, E) tensor."""
    rc, rd, re = tl.arange(0, C), tl.arange(0, D), e * BE + tl.arange(0, BE)
    return rd[:, None] * E + re[None, :], re[:, None] * D + rd[None, :], rc[:, None] * E + re[None, :]


@triton.jit
def _state_fwd(
    k, v, theta, beta_last, f_last, g_last, m_last, n_last, M1s, M2s, S1s, S2s, P1, P2, Z1, D1, D2, rr,
    K, cap,
    C: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BE: tl.constexpr, HAS_S: tl.constexpr,
    HAS_P: tl.constexpr, CAP: tl.constexpr, RESIDUAL: tl.constexpr, SILU: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    rc, rd = tl.arange(0, C), tl.arange(0, D)
    rows = rc[:, None] * D + rd[None, :]
    pw = b * D * E
    for j in range(K):
        cs = b * K + j
        s1 = cs * 2  # layer 1's coefficient slot; layer 2's is s1 + 1
        w0 = (b * (K + 1) + j) * D * E  # this chunk's start state; its end state at w0 + D E
        kj = tl.load(k + cs * C * D + rows).to(tl.float32)
        # 1. the keys through both layers: z1 (stored), err, |a2|^2
        out = tl.zeros((C, D), tl.float32)
        asq = tl.zeros((C,), tl.float32)
        for e in range(E // BE):
            de, ed, ce = _tiles(e, C, D, E, BE)
            z1 = dot(kj, tl.load(M1s + w0 + de))
            tl.store(Z1 + cs * C * E + ce, z1)
            a2 = _act(z1, SILU)
            asq += tl.sum(a2 * a2, 1)
            out += dot(a2, tl.load(M2s + w0 + ed))
        err = out - tl.load(v + cs * C * D + rows).to(tl.float32)
        if RESIDUAL:
            err += kj
        D2u = 2 * err
        tl.debug_barrier()
        # 2. layer 1's deltas before the cap (into D1), |D1|^2, then r
        dsq = tl.zeros((C,), tl.float32)
        for e in range(E // BE):
            de, ed, ce = _tiles(e, C, D, E, BE)
            D1u = _act1(tl.load(Z1 + cs * C * E + ce), SILU) * dot(D2u, tl.trans(tl.load(M2s + w0 + ed)))
            dsq += tl.sum(D1u * D1u, 1)
            tl.store(D1 + cs * C * E + ce, D1u)
        r = tl.full((C,), 1.0, tl.float32)
        if CAP:  # r = min(1, cap |err|^2 / sum_l theta_l |a_l|^2 |D_l|^2)
            th1, th2 = tl.load(theta + s1 * C + rc), tl.load(theta + s1 * C + C + rc)
            curv = th1 * tl.sum(kj * kj, 1) * dsq + th2 * asq * tl.sum(D2u * D2u, 1)
            r = tl.minimum(cap * tl.sum(err * err, 1) / tl.maximum(curv, 1e-30), 1.0)
        D2j = r[:, None] * D2u
        tl.store(D2 + cs * C * D + rows, D2j)
        tl.store(rr + cs * C + rc, r)
        tl.debug_barrier()
        # 3. the end states, tile by tile (D1 capped in place)
        c1 = s1 * C + rc
        fl1, ml1, nl1, fl2, ml2, nl2 = 0.0, 0.0, rc * 0.0, 0.0, 0.0, rc * 0.0
        if HAS_S:
            fl1, ml1, nl1 = tl.load(f_last + s1), tl.load(m_last + s1), tl.load(n_last + c1)
            fl2, ml2, nl2 = tl.load(f_last + s1 + 1), tl.load(m_last + s1 + 1), tl.load(n_last + c1 + C)
        bl1, gl1 = tl.load(beta_last + s1), tl.load(g_last + c1)
        bl2, gl2 = tl.load(beta_last + s1 + 1), tl.load(g_last + c1 + C)
        for e in range(E // BE):
            de, ed, ce = _tiles(e, C, D, E, BE)
            a2 = _act(tl.load(Z1 + cs * C * E + ce), SILU)
            D1j = r[:, None] * tl.load(D1 + cs * C * E + ce)
            tl.store(D1 + cs * C * E + ce, D1j)
            S1, Pm1 = load(S1s + w0 + de, HAS_S, (D, BE)), load(P1 + pw + de, HAS_P, (D, BE))
            M1, S1 = state(kj, D1j, tl.load(M1s + w0 + de), Pm1, S1, bl1, gl1, fl1, ml1, nl1, HAS_S, HAS_P)
            tl.store(M1s + w0 + D * E + de, M1)
            S2, Pm2 = load(S2s + w0 + ed, HAS_S, (BE, D)), load(P2 + pw + ed, HAS_P, (BE, D))
            M2, S2 = state(a2, D2j, tl.load(M2s + w0 + ed), Pm2, S2, bl2, gl2, fl2, ml2, nl2, HAS_S, HAS_P)
            tl.store(M2s + w0 + D * E + ed, M2)
            if HAS_S:
                tl.store(S1s + w0 + D * E + de, S1)
                tl.store(S2s + w0 + D * E + ed, S2)
        tl.debug_barrier()


@triton.jit
def _read_fwd(
    q, k, beta, f, G, M1s, M2s, S1s, S2s, P1, P2, Z1, D1, D2, ZQ, y,
    K,
    C: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BE: tl.constexpr, HAS_S: tl.constexpr,
    HAS_P: tl.constexpr, RESIDUAL: tl.constexpr, SILU: tl.constexpr,
):  # fmt: skip
    cs = tl.program_id(0)
    b = cs // K
    rc, rd = tl.arange(0, C), tl.arange(0, D)
    rows, cc = cs * C * D + rc[:, None] * D + rd[None, :], rc[:, None] * C + rc[None, :]
    pw, w0 = b * D * E, (cs + b) * D * E  # (cs + b) = b (K + 1) + j: this chunk's start-state slot
    s1 = cs * 2
    c1 = s1 * C + rc
    qj = tl.load(q + rows).to(tl.float32)
    G1t = tl.load(G + s1 * C * C + cc) * dot(qj, tl.trans(tl.load(k + rows).to(tl.float32)))
    bt1, bt2 = tl.load(beta + c1)[:, None], tl.load(beta + c1 + C)[:, None]
    f1 = load(f + c1, HAS_S, (C,))[:, None]
    f2 = load(f + c1 + C, HAS_S, (C,))[:, None]
    T2 = tl.zeros((C, C), tl.float32)  # x2 a2^T
    out = tl.zeros((C, D), tl.float32)  # beta2 o x2 M2 + (1 - beta2) o x2 P2 + f2 o x2 S2
    for e in range(E // BE):
        de, ed, ce = _tiles(e, C, D, E, BE)
        zq = dot(G1t, tl.load(D1 + cs * C * E + ce)) + bt1 * dot(qj, tl.load(M1s + w0 + de))
        if HAS_P:
            zq += (1 - bt1) * dot(qj, tl.load(P1 + pw + de))
        if HAS_S:
            zq += f1 * dot(qj, tl.load(S1s + w0 + de))
        tl.store(ZQ + cs * C * E + ce, zq)
        x2 = _act(zq, SILU)
        T2 += dot(x2, tl.trans(_act(tl.load(Z1 + cs * C * E + ce), SILU)))
        out += bt2 * dot(x2, tl.load(M2s + w0 + ed))
        if HAS_P:
            out += (1 - bt2) * dot(x2, tl.load(P2 + pw + ed))
        if HAS_S:
            out += f2 * dot(x2, tl.load(S2s + w0 + ed))
    out += dot(tl.load(G + (s1 + 1) * C * C + cc) * T2, tl.load(D2 + rows))
    if RESIDUAL:
        out += qj
    tl.store(y + rows, out)


@triton.jit
def _chunk_bwd(
    q, k, beta, f, G, beta_last, f_last, g_last, m_last, n_last, M1s, M2s, S1s, S2s, P1, P2,
    Z1, ZQ, D1, D2, rr, dy, dM1s, dM2s, dS1s, dS2s, U1, U2, Xq, Xa, Xz,
    dq, dk, dv, dbeta, df, dG, dbeta_last, df_last, dg_last, dm_last, dn_last,
    K,
    C: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BE: tl.constexpr, HAS_S: tl.constexpr,
    HAS_P: tl.constexpr, RESIDUAL: tl.constexpr, SILU: tl.constexpr, ALL: tl.constexpr,
):  # fmt: skip
    """One chunk's backward. READS (not ALL): the cotangent dy alone, and what it sends to the
    chunk's start state, written to its gradient slots (dM_l, dS_l at slot j; the prior's part to
    U_l). ALL: dy and the end state's gradients (slot j + 1, final after `_state_bwd`) together,
    giving dq, dk, dv and the coefficients' gradients. Three passes over the hidden tiles: the
    second read layer's sums (x2 a2^T, ...); then d loss / d zq, the first read layer, and the
    inner backward through D1 (d a2 and d z1 so far to the scratch Xa, Xz); then, with d err
    complete, the rest of d a2 and d z1."""
    cs = tl.program_id(0)
    b = cs // K
    rc, rd = tl.arange(0, C), tl.arange(0, D)
    rows, cc = cs * C * D + rc[:, None] * D + rd[None, :], rc[:, None] * C + rc[None, :]
    pw, w0 = b * D * E, (cs + b) * D * E
    w1 = w0 + D * E  # the chunk's end state
    s1 = cs * 2
    c1, c2 = s1 * C + rc, s1 * C + C + rc
    dyj, D2j = tl.load(dy + rows), tl.load(D2 + rows)
    bt1, bt2 = tl.load(beta + c1)[:, None], tl.load(beta + c2)[:, None]
    gl1, gl2 = tl.load(g_last + c1)[:, None], tl.load(g_last + c2)[:, None]
    f1, f2 = load(f + c1, HAS_S, (C,))[:, None], load(f + c2, HAS_S, (C,))[:, None]
    nl1, nl2 = load(n_last + c1, HAS_S, (C,))[:, None], load(n_last + c2, HAS_S, (C,))[:, None]
    G1, G2 = tl.load(G + s1 * C * C + cc), tl.load(G + (s1 + 1) * C * C + cc)
    # 1. x2 a2^T; for ALL, the second layer's coefficient sums and a2 dM2', a2 dS2'
    T2 = tl.zeros((C, C), tl.float32)
    hm2 = tl.zeros((C, D), tl.float32)
    hs2 = tl.zeros((C, D), tl.float32)
    dbt2, df2, dbl2, dfl2, dml2 = rc * 0.0, rc * 0.0, 0.0, 0.0, 0.0
    for e in range(E // BE):
        de, ed, ce = _tiles(e, C, D, E, BE)
        # the chunk's (C, d) rows are loaded where a loop uses them: held across the loop as a
        # product's operand (hi and lo halves of tf32x3), each cost up to 64 registers a thread
        dyj = tl.load(dy + rows)
        a2 = _act(tl.load(Z1 + cs * C * E + ce), SILU)
        x2 = _act(tl.load(ZQ + cs * C * E + ce), SILU)
        T2 += dot(x2, tl.trans(a2))
        if ALL:
            M2, dM2 = tl.load(M2s + w0 + ed), tl.load(dM2s + w1 + ed)
            up = dot(x2, M2)
            dbl2 += tl.sum(tl.sum(dM2 * M2, 1), 0)
            if HAS_P:
                Pm2 = tl.load(P2 + pw + ed)
                up -= dot(x2, Pm2)
                dbl2 -= tl.sum(tl.sum(dM2 * Pm2, 1), 0)
            dbt2 += tl.sum(dyj * up, 1)
            hm2 += dot(a2, dM2)
            if HAS_S:
                S2, dS2 = tl.load(S2s + w0 + ed), tl.load(dS2s + w1 + ed)
                df2 += tl.sum(dyj * dot(x2, S2), 1)
                hs2 += dot(a2, dS2)
                dfl2 += tl.sum(tl.sum(dM2 * S2, 1), 0)
                dml2 += tl.sum(tl.sum(dS2 * S2, 1), 0)
    dgt2 = dot(dyj, tl.trans(D2j))  # d loss / d (G2 o x2 a2^T)
    dt2 = dgt2 * G2
    dD2 = dot(tl.trans(G2 * T2), dyj)
    if ALL:
        dD2 += gl2 * hm2 + nl2 * hs2
        tl.store(dG + (s1 + 1) * C * C + cc, dgt2 * T2)
        tl.store(dbeta + c2, dbt2)
        tl.store(dg_last + c2, tl.sum(D2j * hm2, 1))
        tl.store(dbeta_last + s1 + 1, dbl2)
        if HAS_S:
            tl.store(df + c2, df2)
            tl.store(dn_last + c2, tl.sum(D2j * hs2, 1))
            tl.store(df_last + s1 + 1, dfl2)
            tl.store(dm_last + s1 + 1, dml2)
    # 2a. the second read layer's backward: d loss / d zq and the reads' d a2 (to Xq, Xa)
    for e in range(E // BE):
        de, ed, ce = _tiles(e, C, D, E, BE)
        dyj = tl.load(dy + rows)
        zq = tl.load(ZQ + cs * C * E + ce)
        # a row scale outside the product (bt2 o (dy M2^T), not (bt2 o dy) M2^T): the products
        # then share one operand
        dx2 = bt2 * dot(dyj, tl.trans(tl.load(M2s + w0 + ed))) + dot(dt2, _act(tl.load(Z1 + cs * C * E + ce), SILU))
        if HAS_P:
            dx2 += (1 - bt2) * dot(dyj, tl.trans(tl.load(P2 + pw + ed)))
        if HAS_S:
            dx2 += f2 * dot(dyj, tl.trans(tl.load(S2s + w0 + ed)))
        tl.store(Xq + cs * C * E + ce, _act1(zq, SILU) * dx2)
        tl.store(Xa + cs * C * E + ce, dot(tl.trans(dt2), _act(zq, SILU)))
    tl.debug_barrier()
    # 2b. the first read layer, the end state's part (ALL), and the inner backward through D1
    qj, kj = tl.load(q + rows).to(tl.float32), tl.load(k + rows).to(tl.float32)
    t1 = dot(qj, tl.trans(kj))
    G1t = G1 * t1
    dgt1 = tl.zeros((C, C), tl.float32)
    dqa = tl.zeros((C, D), tl.float32)
    dka = tl.zeros((C, D), tl.float32)
    dbt1, df1, dgl1, dnl1, dbl1, dfl1, dml1 = rc * 0.0, rc * 0.0, rc * 0.0, rc * 0.0, 0.0, 0.0, 0.0
    for e in range(E // BE):
        de, ed, ce = _tiles(e, C, D, E, BE)
        qj, kj = tl.load(q + rows).to(tl.float32), tl.load(k + rows).to(tl.float32)
        dyj, D2j = tl.load(dy + rows), tl.load(D2 + rows)
        z1 = tl.load(Z1 + cs * C * E + ce)
        M2, D1e = tl.load(M2s + w0 + ed), tl.load(D1 + cs * C * E + ce)
        dzq, da2 = tl.load(Xq + cs * C * E + ce), tl.load(Xa + cs * C * E + ce)
        dD1 = dot(tl.trans(G1t), dzq)
        dgt1 += dot(dzq, tl.trans(D1e))
        if ALL:
            M1, dM1 = tl.load(M1s + w0 + de), tl.load(dM1s + w1 + de)
            dqa += bt1 * dot(dzq, tl.trans(M1))
            up = dot(qj, M1)
            dbl1 += tl.sum(tl.sum(dM1 * M1, 1), 0)
            if HAS_P:
                Pm1 = tl.load(P1 + pw + de)
                dqa += (1 - bt1) * dot(dzq, tl.trans(Pm1))
                up -= dot(qj, Pm1)
                dbl1 -= tl.sum(tl.sum(dM1 * Pm1, 1), 0)
            dbt1 += tl.sum(dzq * up, 1)
            h = dot(kj, dM1)
            dD1 += gl1 * h
            dgl1 += tl.sum(D1e * h, 1)
            dka += gl1 * dot(D1e, tl.trans(dM1))
            da2 += gl2 * dot(D2j, tl.trans(tl.load(dM2s + w1 + ed)))
            if HAS_S:
                S1, dS1 = tl.load(S1s + w0 + de), tl.load(dS1s + w1 + de)
                dqa += f1 * dot(dzq, tl.trans(S1))
                df1 += tl.sum(dzq * dot(qj, S1), 1)
                h = dot(kj, dS1)
                dD1 += nl1 * h
                dnl1 += tl.sum(D1e * h, 1)
                dka += nl1 * dot(D1e, tl.trans(dS1))
                dfl1 += tl.sum(tl.sum(dM1 * S1, 1), 0)
                dml1 += tl.sum(tl.sum(dS1 * S1, 1), 0)
                da2 += nl2 * dot(D2j, tl.trans(tl.load(dS2s + w1 + ed)))
        else:  # the reads' part of the start state's gradient (pass 3 adds the deltas' part)
            x2 = _act(tl.load(ZQ + cs * C * E + ce), SILU)
            tl.store(dM1s + w0 + de, dot(tl.trans(qj), bt1 * dzq))
            if HAS_S:
                tl.store(dS1s + w0 + de, dot(tl.trans(qj), f1 * dzq))
                tl.store(dS2s + w0 + ed, dot(tl.trans(f2 * x2), dyj))
            if HAS_P:
                tl.store(U1 + cs * D * E + de, dot(tl.trans(qj), (1 - bt1) * dzq))
                tl.store(U2 + cs * D * E + ed, dot(tl.trans((1 - bt2) * x2), dyj))
        # the inner backward through D1 = act'(z1) o (D2 M2^T)
        dcar = _act1(z1, SILU) * dD1
        tl.store(Xz + cs * C * E + ce, _act2(z1, SILU) * dot(D2j, tl.trans(M2)) * dD1)
        tl.store(Xa + cs * C * E + ce, da2)
        dD2 += dot(dcar, M2)
        if not ALL:
            tl.store(dM2s + w0 + ed, dot(tl.trans(bt2 * x2), dyj) + dot(tl.trans(dcar), D2j))
    derr = 2 * tl.load(rr + cs * C + rc)[:, None] * dD2  # d loss / d err
    tl.debug_barrier()
    # 3. with d err: the rest of d a2 and d z1, and what they send to M1, M2 (READS) or k (ALL)
    for e in range(E // BE):
        de, ed, ce = _tiles(e, C, D, E, BE)
        kj = tl.load(k + rows).to(tl.float32)
        z1, M2 = tl.load(Z1 + cs * C * E + ce), tl.load(M2s + w0 + ed)
        da2 = tl.load(Xa + cs * C * E + ce) + dot(derr, tl.trans(M2))
        dz1 = tl.load(Xz + cs * C * E + ce) + _act1(z1, SILU) * da2
        if ALL:
            dka += dot(dz1, tl.trans(tl.load(M1s + w0 + de)))
        else:
            tl.store(dM1s + w0 + de, tl.load(dM1s + w0 + de) + dot(tl.trans(kj), dz1))
            tl.store(dM2s + w0 + ed, tl.load(dM2s + w0 + ed) + dot(tl.trans(_act(z1, SILU)), derr))
    if ALL:
        dt1 = dgt1 * G1
        qj, kj, dyj = tl.load(q + rows).to(tl.float32), tl.load(k + rows).to(tl.float32), tl.load(dy + rows)
        dqa += dot(dt1, kj)
        dka += dot(tl.trans(dt1), qj)
        if RESIDUAL:
            dqa += dyj
            dka += derr
        tl.store(dq + rows, dqa)
        tl.store(dk + rows, dka)
        tl.store(dv + rows, -derr)
        tl.store(dG + s1 * C * C + cc, dgt1 * t1)  # above the diagonal too, as the torch path
        tl.store(dbeta + c1, dbt1)
        tl.store(dg_last + c1, dgl1)
        tl.store(dbeta_last + s1, dbl1)
        if HAS_S:
            tl.store(df + c1, df1)
            tl.store(dn_last + c1, dnl1)
            tl.store(df_last + s1, dfl1)
            tl.store(dm_last + s1, dml1)


@triton.jit
def _state_bwd(
    k, beta_last, f_last, g_last, m_last, n_last, M2s, Z1, D2, rr, dM1s, dM2s, dS1s, dS2s, dP1, dP2,
    K,
    C: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BE: tl.constexpr, HAS_S: tl.constexpr,
    HAS_P: tl.constexpr, SILU: tl.constexpr,
):  # fmt: skip
    """The gradient of each chunk's start state, chunks in reverse: slot j holds the reads' part
    (`_chunk_bwd`, READS); this adds what arrives from the end state in slot j + 1, directly
    (beta_c, f_c, m_c) and through the deltas, which enter it by a_l^T (g_l o D_l) and
    a_l^T (n_l o D_l): d D1 and d D2 from there, then the inner backward. Two passes over the
    hidden tiles: d err (a sum over them), then each tile's d z1 and its slots."""
    b = tl.program_id(0)
    rc, rd = tl.arange(0, C), tl.arange(0, D)
    rows = rc[:, None] * D + rd[None, :]
    pw = b * D * E
    for jj in range(K):
        j = K - 1 - jj
        cs = b * K + j
        w0 = (cs + b) * D * E
        w1 = w0 + D * E
        s1 = cs * 2
        c1 = s1 * C + rc
        gl1, gl2 = tl.load(g_last + c1)[:, None], tl.load(g_last + c1 + C)[:, None]
        nl1, nl2 = load(n_last + c1, HAS_S, (C,))[:, None], load(n_last + c1 + C, HAS_S, (C,))[:, None]
        dD2 = tl.zeros((C, D), tl.float32)
        for e in range(E // BE):
            de, ed, ce = _tiles(e, C, D, E, BE)
            kj = tl.load(k + cs * C * D + rows).to(tl.float32)
            z1, M2 = tl.load(Z1 + cs * C * E + ce), tl.load(M2s + w0 + ed)
            a2 = _act(z1, SILU)
            dD1 = gl1 * dot(kj, tl.load(dM1s + w1 + de))
            dD2 += gl2 * dot(a2, tl.load(dM2s + w1 + ed))
            if HAS_S:
                dD1 += nl1 * dot(kj, tl.load(dS1s + w1 + de))
                dD2 += nl2 * dot(a2, tl.load(dS2s + w1 + ed))
            dD2 += dot(_act1(z1, SILU) * dD1, M2)
        derr = 2 * tl.load(rr + cs * C + rc)[:, None] * dD2
        bl1, bl2 = tl.load(beta_last + s1), tl.load(beta_last + s1 + 1)
        fl1, ml1, fl2, ml2 = 0.0, 0.0, 0.0, 0.0
        if HAS_S:
            fl1, ml1 = tl.load(f_last + s1), tl.load(m_last + s1)
            fl2, ml2 = tl.load(f_last + s1 + 1), tl.load(m_last + s1 + 1)
        for e in range(E // BE):
            de, ed, ce = _tiles(e, C, D, E, BE)
            kj, D2j = tl.load(k + cs * C * D + rows).to(tl.float32), tl.load(D2 + cs * C * D + rows)
            z1, M2 = tl.load(Z1 + cs * C * E + ce), tl.load(M2s + w0 + ed)
            a2 = _act(z1, SILU)
            dM1, dM2 = tl.load(dM1s + w1 + de), tl.load(dM2s + w1 + ed)
            dD1 = gl1 * dot(kj, dM1)
            da2 = gl2 * dot(D2j, tl.trans(dM2)) + dot(derr, tl.trans(M2))
            dS1 = tl.zeros((D, BE), tl.float32)
            dS2 = tl.zeros((BE, D), tl.float32)
            if HAS_S:
                dS1, dS2 = tl.load(dS1s + w1 + de), tl.load(dS2s + w1 + ed)
                dD1 += nl1 * dot(kj, dS1)
                da2 += nl2 * dot(D2j, tl.trans(dS2))
            dcar = _act1(z1, SILU) * dD1
            dz1 = _act2(z1, SILU) * dot(D2j, tl.trans(M2)) * dD1 + _act1(z1, SILU) * da2
            new1 = bl1 * dM1 + dot(tl.trans(kj), dz1)
            new2 = bl2 * dM2 + dot(tl.trans(dcar), D2j) + dot(tl.trans(a2), derr)
            tl.store(dM1s + w0 + de, tl.load(dM1s + w0 + de) + new1)
            tl.store(dM2s + w0 + ed, tl.load(dM2s + w0 + ed) + new2)
            if HAS_S:
                tl.store(dS1s + w0 + de, tl.load(dS1s + w0 + de) + fl1 * dM1 + ml1 * dS1)
                tl.store(dS2s + w0 + ed, tl.load(dS2s + w0 + ed) + fl2 * dM2 + ml2 * dS2)
            if HAS_P:
                tl.store(dP1 + pw + de, tl.load(dP1 + pw + de) + (1 - bl1) * dM1)
                tl.store(dP2 + pw + ed, tl.load(dP2 + pw + ed) + (1 - bl2) * dM2)
        tl.debug_barrier()


# ---------------------------------------------------------------------------------------------
# launchers (called by `triton_loop.TritonLoop`)

TILE = 16  # hidden units (BE) a pass takes at a time


def _slots(w, K: int):
    """(B, a, c) -> (B, K + 1, a, c) float32 chunk slots with w in slot 0."""
    s = w.new_empty(w.shape[0], K + 1, *w.shape[1:])
    s[:, 0] = w
    return s


def forward(q, k, v, co: dict, M, S, P, cap: float, flags: dict):
    """q, k, v (B, K, C, d); co: the coefficient fields (B, K, 2, size) float32 (None: absent);
    M, S, P: the two layers' (B, d, e), (B, e, d) float32 (S, P may be None). Returns y, the end
    states and what the backward keeps."""
    B, K, C, d = q.shape
    e = M[0].shape[-1]
    has_S, has_P = S is not None, P is not None
    buf = Buffers(q.device)
    Ms = [_slots(w, K) for w in M]
    Ss = [_slots(w, K) for w in S] if has_S else [buf.dummy] * 2
    Ps = list(P) if has_P else [buf.dummy] * 2
    Z1, D1, ZQ = buf.new(B, K, C, e), buf.new(B, K, C, e), buf.new(B, K, C, e)
    D2, y, r = buf.new(B, K, C, d), buf.new(B, K, C, d), buf.new(B, K, C)
    c = {n: buf.opt(t) for n, t in co.items()}
    sizes = dict(C=C, D=d, E=e, BE=min(e, TILE), HAS_S=has_S, HAS_P=has_P, RESIDUAL=flags["RESIDUAL"])
    _state_fwd[(B,)](
        k, v, c["theta"], c["beta_last"], c["f_last"], c["neg_g_last"], c["m_last"], c["neg_n_last"], *Ms, *Ss, *Ps,
        Z1, D1, D2, r, K, cap, CAP=flags["CAP"], SILU=flags["SILU"], **sizes, **LAUNCH,
    )  # fmt: skip
    _read_fwd[(B * K,)](
        q, k, c["beta"], c["f"], c["neg_G"], *Ms, *Ss, *Ps, Z1, D1, D2, ZQ, y, K, SILU=flags["SILU"], **sizes, **LAUNCH,
    )  # fmt: skip
    # the end states as tensors of their own: a view would keep every chunk's slot alive
    ends = tuple(s[:, K].clone() for s in Ms), tuple(s[:, K].clone() for s in Ss) if has_S else None
    return y, *ends, (Ms, Ss, Z1, ZQ, D1, D2, r)


def backward(q, k, co: dict, P, kept, dy, dM_end, dS_end, flags: dict):
    """The gradients of `forward`'s y and end states dy, dM_end, dS_end (float32 pairs; dS_end
    None without momentum): dq, dk, dv, dM_0, dS_0, dP (pairs, None where absent) and each
    coefficient field's gradient (B, K, 2, size) (None where the field is absent)."""
    Ms, Ss, Z1, ZQ, D1, D2, r = kept
    B, K, C, d = q.shape
    e = Z1.shape[-1]
    has_S, has_P = flags["HAS_S"], flags["HAS_P"]
    buf = Buffers(q.device)
    c = {n: buf.opt(t) for n, t in co.items()}
    Ps = list(P) if has_P else [buf.dummy] * 2
    dMs = [torch.empty_like(s) for s in Ms]
    dSs = [torch.empty_like(s) for s in Ss] if has_S else [buf.dummy] * 2
    for slots, end in zip(dMs + (dSs if has_S else []), list(dM_end) + list(dS_end or ())):
        slots[:, K] = end
    U = [buf.new(B, K, *w.shape[2:], on=has_P) for w in Ms]
    Xq, Xa, Xz = torch.empty_like(Z1), torch.empty_like(Z1), torch.empty_like(Z1)
    dq, dk, dv = buf.new(B, K, C, d), buf.new(B, K, C, d), buf.new(B, K, C, d)
    per_token, per_chunk = (lambda on: buf.new(B, K, 2, C, on=on)), (lambda on: buf.new(B, K, 2, on=on))  # noqa: E731
    g = {
        "beta": per_token(True), "f": per_token(has_S), "neg_G": buf.new(B, K, 2, C, C),
        "beta_last": per_chunk(True), "f_last": per_chunk(has_S), "neg_g_last": per_token(True),
        "m_last": per_chunk(has_S), "neg_n_last": per_token(has_S),
    }  # fmt: skip
    sizes = dict(C=C, D=d, E=e, BE=min(e, TILE), HAS_S=has_S, HAS_P=has_P, SILU=flags["SILU"])

    def chunks(ALL: bool):
        _chunk_bwd[(B * K,)](
            q, k, *(c[n] for n in GRAD_FIELDS), *Ms, *Ss, *Ps, Z1, ZQ, D1, D2, r, dy, *dMs, *dSs, *U, Xq, Xa, Xz,
            dq, dk, dv, *(g[n] for n in GRAD_FIELDS), K, RESIDUAL=flags["RESIDUAL"], ALL=ALL, **sizes, **LAUNCH,
        )  # fmt: skip

    chunks(ALL=False)
    dP = [u.sum(1) for u in U] if has_P else [buf.dummy] * 2
    _state_bwd[(B,)](
        k, c["beta_last"], c["f_last"], c["neg_g_last"], c["m_last"], c["neg_n_last"], Ms[1], Z1, D2, r,
        *dMs, *dSs, *dP, K, **sizes, **LAUNCH,
    )  # fmt: skip
    chunks(ALL=True)
    g = {n: buf.given(t) for n, t in g.items()}
    dM0 = tuple(s[:, 0].clone() for s in dMs)
    dS0 = tuple(s[:, 0].clone() for s in dSs) if has_S else None
    return dq, dk, dv, dM0, dS0, tuple(dP) if has_P else None, g
