"""Triton kernels for the chunk loop of the linear (matrix) memory, forward and backward, split
the way chunked linear-attention kernels are (flash-linear-attention's chunk_* ops): only the
state recurrence runs chunk after chunk, everything else runs for all chunks at once.

The math is `step.chunk_step` and `backward.chunk_backward` at depth 1 (names as there; D the
capped deltas, G / g / n the negated coefficient matrices and columns):

    per chunk   D = 2 r (k M [+ k] - v),  t = q k^T
                y = (G o t) D + beta o qM + (1 - beta) o qP + f o qS  [+ q]
                M' = beta_c M + (1 - beta_c) P + f_c S + k^T (g o D),  S' = m_c S + k^T (n o D)

Every output column of M is its own recurrence: column o of D, y, M' and S' reads column o of
M, S, P and v only. The step cap's r is no exception: at depth 1, |grad l|^2 = |k|^2 |D|^2 and
l = |D|^2 / 4, so r = min(1, cap l / (theta |k|^2 |D|^2)) = min(1, cap / (4 theta |k|^2)) needs
no column sums (it differs from the torch path's form only where theta |k|^2 |D|^2 < 1e-30,
that is where D is 0 to float32 anyway). So each kernel holds (d, BV) column tiles of the
states, never a whole (d, d) state with its gradient and momentum (at d = 64 the untiled
kernels spilled 67-163 KB a thread and the backward asked for 330 KB of shared memory):

    forward   _state_fwd    grid (B, d / BV): the chunks in order; stores D and each chunk's
                            start state (M_j, S_j)
              _read_fwd     grid (B K, d / BV): the reads of every chunk at once
    backward  _state_bwd    grid (B, d / BV): the chunks in reverse; stores the gradient of
                            each chunk's end state (dM_j+1, dS_j+1), returns dM_0, dS_0, dP
              _grads_cols   grid (B K): a chunk's gradients that sum over output columns (the
                            gates', D's, and d loss / d t, kept for _grads_rows), dv
              _grads_rows   grid (B K, d / BK): dq and dk, BK input rows at a time

Layouts: q, k, v, y, D and their gradients (B, K, C, d); states (B, d, d), the chunk slots
(B, K, d, d); coefficients (B, K, 1, size) float32 (`triton_loop`). Runs on CUDA; on CPU
tensors under TRITON_INTERPRET=1 (tests/components/test_memory_triton.py).
"""

from __future__ import annotations

import triton
import triton.language as tl

from components.ops.memory.triton_parts import LAUNCH, Buffers, dot, load, read, state


@triton.jit
def _cap(kj, th, cap, CAP: tl.constexpr):
    """The step cap's r per token of a chunk from its keys kj (C, d) and steps th (C,)."""
    r = tl.full(th.shape, 1.0, tl.float32)
    if CAP:
        r = tl.minimum(cap / tl.maximum(4 * th * tl.sum(kj * kj, 1), 1e-30), 1.0)
    return r


@triton.jit
def _state_fwd(
    k, v, theta, beta_last, f_last, g_last, m_last, n_last, M0, S0, P, Dl, rr, M_out, S_out, M_st, S_st,
    K, cap,
    C: tl.constexpr, D: tl.constexpr, BV: tl.constexpr, HAS_S: tl.constexpr, HAS_P: tl.constexpr,
    CAP: tl.constexpr, RESIDUAL: tl.constexpr,
):  # fmt: skip
    b, i = tl.program_id(0), tl.program_id(1)
    rc, rd, rv = tl.arange(0, C), tl.arange(0, D), i * BV + tl.arange(0, BV)
    tile = rd[:, None] * D + rv[None, :]  # (D, BV) of a (D, D) state
    M = tl.load(M0 + b * D * D + tile)
    S, Pm = load(S0 + b * D * D + tile, HAS_S, (D, BV)), load(P + b * D * D + tile, HAS_P, (D, BV))
    for j in range(K):
        cs = b * K + j  # the chunk's slot: per-token coefficients at cs C, per-chunk at cs
        tl.store(M_st + cs * D * D + tile, M)
        if HAS_S:
            tl.store(S_st + cs * D * D + tile, S)
        kj = tl.load(k + cs * C * D + rc[:, None] * D + rd[None, :]).to(tl.float32)
        part = cs * C * D + rc[:, None] * D + rv[None, :]  # (C, BV) of the chunk's rows
        err = dot(kj, M) - tl.load(v + part).to(tl.float32)
        if RESIDUAL:
            err += tl.load(k + part).to(tl.float32)
        r = _cap(kj, tl.load(theta + cs * C + rc), cap, CAP)
        Dj = 2 * r[:, None] * err
        tl.store(Dl + part, Dj)
        if i == 0:
            tl.store(rr + cs * C + rc, r)
        cj = cs * C + rc
        fl, ml, nl = 0.0, 0.0, rc * 0.0
        if HAS_S:
            fl, ml, nl = tl.load(f_last + cs), tl.load(m_last + cs), tl.load(n_last + cj)
        M, S = state(kj, Dj, M, Pm, S, tl.load(beta_last + cs), tl.load(g_last + cj), fl, ml, nl, HAS_S, HAS_P)
    tl.store(M_out + b * D * D + tile, M)
    if HAS_S:
        tl.store(S_out + b * D * D + tile, S)


@triton.jit
def _read_fwd(
    q, k, beta, f, G, Dl, M_st, S_st, P, y,
    K,
    C: tl.constexpr, D: tl.constexpr, BV: tl.constexpr, HAS_S: tl.constexpr, HAS_P: tl.constexpr,
    RESIDUAL: tl.constexpr,
):  # fmt: skip
    cs, i = tl.program_id(0), tl.program_id(1)
    b = cs // K
    rc, rd, rv = tl.arange(0, C), tl.arange(0, D), i * BV + tl.arange(0, BV)
    tile = rd[:, None] * D + rv[None, :]
    rows = cs * C * D + rc[:, None] * D + rd[None, :]
    part = cs * C * D + rc[:, None] * D + rv[None, :]
    qj = tl.load(q + rows).to(tl.float32)
    M = tl.load(M_st + cs * D * D + tile)
    S, Pm = load(S_st + cs * D * D + tile, HAS_S, (D, BV)), load(P + b * D * D + tile, HAS_P, (D, BV))
    fv = load(f + cs * C + rc, HAS_S, (C,))
    Gj = tl.load(G + cs * C * C + rc[:, None] * C + rc[None, :])
    kj = tl.load(k + rows).to(tl.float32)
    out, _ = read(qj, kj, tl.load(Dl + part), M, Pm, S, Gj, tl.load(beta + cs * C + rc), fv, HAS_S, HAS_P)
    if RESIDUAL:
        out += tl.load(q + part).to(tl.float32)
    tl.store(y + part, out)


@triton.jit
def _bwd_reads(
    q, k, beta, f, G, rr, dy, A, R, Q, U,
    C: tl.constexpr, D: tl.constexpr, BV: tl.constexpr, HAS_S: tl.constexpr, HAS_P: tl.constexpr,
):  # fmt: skip
    """What a chunk's reads send back, for all chunks at once (BV output columns a program):
    A = (G o t)^T dy, d loss / d D through the reads; R = q^T (beta o dy) + k^T (2 r A), the reads'
    part of d loss / d M_j (directly and through D); Q = q^T (f o dy), of d loss / d S_j; U =
    q^T ((1 - beta) o dy), of d loss / d P."""
    cs, i = tl.program_id(0), tl.program_id(1)
    rc, rd, rv = tl.arange(0, C), tl.arange(0, D), i * BV + tl.arange(0, BV)
    rows = cs * C * D + rc[:, None] * D + rd[None, :]
    part = cs * C * D + rc[:, None] * D + rv[None, :]
    tile = cs * D * D + rd[:, None] * D + rv[None, :]
    qj = tl.load(q + rows).to(tl.float32)
    kj = tl.load(k + rows).to(tl.float32)
    dyj = tl.load(dy + part)
    cj = cs * C + rc
    Gt = tl.load(G + cs * C * C + rc[:, None] * C + rc[None, :]) * dot(qj, tl.trans(kj))
    Aj = dot(tl.trans(Gt), dyj)
    tl.store(A + part, Aj)
    bt = tl.load(beta + cj)[:, None]
    r2 = 2 * tl.load(rr + cj)
    tl.store(R + tile, dot(tl.trans(qj), bt * dyj) + dot(tl.trans(kj), r2[:, None] * Aj))
    if HAS_S:
        tl.store(Q + tile, dot(tl.trans(qj), tl.load(f + cj)[:, None] * dyj))
    if HAS_P:
        tl.store(U + tile, dot(tl.trans(qj), (1 - bt) * dyj))


@triton.jit
def _state_bwd(
    k, rr, beta_last, f_last, g_last, m_last, n_last, R, Q, U, dM_end, dS_end, dM_st, dS_st, dM0, dS0, dP,
    K,
    C: tl.constexpr, D: tl.constexpr, BV: tl.constexpr, HAS_S: tl.constexpr, HAS_P: tl.constexpr,
):  # fmt: skip
    """d loss / d (M_j, S_j) from d loss / d (M_j+1, S_j+1), chunk by chunk in reverse: the end
    state's own terms and its deltas' (D = 2 r (kM - v) enters M_j+1 and S_j+1 through k^T (g o D)
    and k^T (n o D)), plus the reads' R, Q, U (`_bwd_reads`). Stores each chunk's dM_j+1, dS_j+1."""
    b, i = tl.program_id(0), tl.program_id(1)
    rc, rd, rv = tl.arange(0, C), tl.arange(0, D), i * BV + tl.arange(0, BV)
    tile = rd[:, None] * D + rv[None, :]
    dM, dS = tl.load(dM_end + b * D * D + tile), load(dS_end + b * D * D + tile, HAS_S, (D, BV))
    dPm = tl.zeros((D, BV), tl.float32)
    for jj in range(K):
        cs = b * K + K - 1 - jj
        st = cs * D * D + tile
        tl.store(dM_st + st, dM)
        if HAS_S:
            tl.store(dS_st + st, dS)
        kj = tl.load(k + cs * C * D + rc[:, None] * D + rd[None, :]).to(tl.float32)
        cj = cs * C + rc
        dD = tl.load(g_last + cj)[:, None] * dot(kj, dM)
        bl = tl.load(beta_last + cs)
        if HAS_P:
            dPm += (1 - bl) * dM + tl.load(U + st)
        if HAS_S:
            dD += tl.load(n_last + cj)[:, None] * dot(kj, dS)
            dS = tl.load(f_last + cs) * dM + tl.load(m_last + cs) * dS + tl.load(Q + st)
        r2 = 2 * tl.load(rr + cj)
        dM = bl * dM + tl.load(R + st) + dot(tl.trans(kj), r2[:, None] * dD)
    tl.store(dM0 + b * D * D + tile, dM)
    if HAS_S:
        tl.store(dS0 + b * D * D + tile, dS)
    if HAS_P:
        tl.store(dP + b * D * D + tile, dPm)


@triton.jit
def _grads_cols(
    q, k, rr, g_last, n_last, Dl, dy, A, M_st, S_st, P, dM_st, dS_st,
    dv, dbeta, df, dbeta_last, df_last, dg_last, dm_last, dn_last,
    K,
    C: tl.constexpr, D: tl.constexpr, BV: tl.constexpr, HAS_S: tl.constexpr, HAS_P: tl.constexpr,
):  # fmt: skip
    """A chunk's gradients of v (dv = -2 r dD, dD = d loss / d D) and of the coefficients, for BV
    output columns: the coefficients' are sums over output columns, stored per column tile
    (B, K, d / BV, ...) for the launcher to add up."""
    cs, i = tl.program_id(0), tl.program_id(1)
    NT: tl.constexpr = D // BV
    b = cs // K
    rc, rd, rv = tl.arange(0, C), tl.arange(0, D), i * BV + tl.arange(0, BV)
    rows = cs * C * D + rc[:, None] * D + rd[None, :]
    part = cs * C * D + rc[:, None] * D + rv[None, :]
    tile = cs * D * D + rd[:, None] * D + rv[None, :]
    cj = cs * C + rc
    ct = (cs * NT + i) * C + rc  # this tile's slot of a per-token sum
    qj = tl.load(q + rows).to(tl.float32)
    kj = tl.load(k + rows).to(tl.float32)
    Dj, dyj = tl.load(Dl + part), tl.load(dy + part)
    M, dM = tl.load(M_st + tile), tl.load(dM_st + tile)
    hm = dot(kj, dM)
    dD = tl.load(A + part) + tl.load(g_last + cj)[:, None] * hm
    tl.store(dg_last + ct, tl.sum(Dj * hm, 1))
    dbl = tl.sum(tl.sum(dM * M, 1), 0)
    up = dot(qj, M)
    if HAS_P:
        Pm = tl.load(P + b * D * D + rd[:, None] * D + rv[None, :])
        dbl -= tl.sum(tl.sum(dM * Pm, 1), 0)
        up -= dot(qj, Pm)
    tl.store(dbeta + ct, tl.sum(dyj * up, 1))
    tl.store(dbeta_last + cs * NT + i, dbl)
    if HAS_S:
        S, dS = tl.load(S_st + tile), tl.load(dS_st + tile)
        hs = dot(kj, dS)
        dD += tl.load(n_last + cj)[:, None] * hs
        tl.store(dn_last + ct, tl.sum(Dj * hs, 1))
        tl.store(df + ct, tl.sum(dyj * dot(qj, S), 1))
        tl.store(df_last + cs * NT + i, tl.sum(tl.sum(dM * S, 1), 0))
        tl.store(dm_last + cs * NT + i, tl.sum(tl.sum(dS * S, 1), 0))
    tl.store(dv + part, -2 * tl.load(rr + cj)[:, None] * dD)


@triton.jit
def _grads_rows(
    q, k, beta, f, G, g_last, n_last, Dl, dy, dv, M_st, S_st, P, dM_st, dS_st, dq, dk, dG,
    K,
    C: tl.constexpr, D: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_S: tl.constexpr,
    HAS_P: tl.constexpr, RESIDUAL: tl.constexpr,
):  # fmt: skip
    """dq and dk of one chunk, input columns [BK pid, BK pid + BK): sums over the output columns
    of what multiplies M_j, P, S_j (dq) and dM_j+1, dS_j+1, M_j (dk), and of dy D^T = d loss /
    d (G o t), whose (G o t) terms come last; the first program also stores dG = dy D^T o t."""
    cs, i = tl.program_id(0), tl.program_id(1)
    b = cs // K
    rc, rk = tl.arange(0, C), i * BK + tl.arange(0, BK)
    cj = cs * C + rc
    cc = cs * C * C + rc[:, None] * C + rc[None, :]
    bt, gl = tl.load(beta + cj)[:, None], tl.load(g_last + cj)[:, None]
    fv, nl = load(f + cj, HAS_S, (C,))[:, None], load(n_last + cj, HAS_S, (C,))[:, None]
    dqi = tl.zeros((C, BK), tl.float32)
    dki = tl.zeros((C, BK), tl.float32)
    dgt = tl.zeros((C, C), tl.float32)
    for j in range(D // BV):
        rv = j * BV + tl.arange(0, BV)
        tile = rk[:, None] * D + rv[None, :]  # (BK, BV) of a state
        part = cs * C * D + rc[:, None] * D + rv[None, :]
        dyj, Dj, de = tl.load(dy + part), tl.load(Dl + part), -tl.load(dv + part)
        M = tl.load(M_st + cs * D * D + tile)
        dqi += dot(bt * dyj, tl.trans(M))
        dki += dot(de, tl.trans(M)) + dot(gl * Dj, tl.trans(tl.load(dM_st + cs * D * D + tile)))
        if HAS_P:
            dqi += dot((1 - bt) * dyj, tl.trans(tl.load(P + b * D * D + tile)))
        if HAS_S:
            dqi += dot(fv * dyj, tl.trans(tl.load(S_st + cs * D * D + tile)))
            dki += dot(nl * Dj, tl.trans(tl.load(dS_st + cs * D * D + tile)))
        dgt += dot(dyj, tl.trans(Dj))
    cols = cs * C * D + rc[:, None] * D + rk[None, :]
    dtj = dgt * tl.load(G + cc)
    dqi += dot(dtj, tl.load(k + cols).to(tl.float32))
    dki += dot(tl.trans(dtj), tl.load(q + cols).to(tl.float32))
    if RESIDUAL:
        dqi += tl.load(dy + cols)
        dki -= tl.load(dv + cols)
    tl.store(dq + cols, dqi)
    tl.store(dk + cols, dki)
    if i == 0:  # dG on the whole (C, C) block, above the diagonal too, as the torch path
        rd = tl.arange(0, D)
        rows = cs * C * D + rc[:, None] * D + rd[None, :]
        t = dot(tl.load(q + rows).to(tl.float32), tl.trans(tl.load(k + rows).to(tl.float32)))
        tl.store(dG + cc, dgt * t)


# ---------------------------------------------------------------------------------------------
# launchers (called by `triton_loop.TritonLoop`)

TILE = 16  # output (BV) and input (BK) columns a program holds (at 32 the backward spilled at d 64)


def forward(q, k, v, co: dict, M, S, P, cap: float, flags: dict):
    """q, k, v (B, K, C, d); co: the coefficient fields (B, K, 1, size) float32 (None: absent);
    M, S, P: 1-tuples of (B, d, d) float32 (S, P may be None). Returns y, the end states and
    what the backward keeps (D, r, the chunk-start states)."""
    B, K, C, d = q.shape
    BV = min(d, TILE)
    has_S, has_P = S is not None, P is not None
    buf = Buffers(q.device)
    Dl, y, r = buf.new(B, K, C, d), buf.new(B, K, C, d), buf.new(B, K, C)
    M_st, S_st = buf.new(B, K, d, d), buf.new(B, K, d, d, on=has_S)
    M_out, S_out = buf.new(B, d, d), buf.new(B, d, d, on=has_S)
    S0, P0 = buf.opt(S and S[0]), buf.opt(P and P[0])
    c = {n: buf.opt(t) for n, t in co.items()}
    sizes = dict(C=C, D=d, BV=BV, HAS_S=has_S, HAS_P=has_P, RESIDUAL=flags["RESIDUAL"])
    _state_fwd[(B, d // BV)](
        k, v, c["theta"], c["beta_last"], c["f_last"], c["neg_g_last"], c["m_last"], c["neg_n_last"], M[0], S0, P0,
        Dl, r, M_out, S_out, M_st, S_st, K, cap, CAP=flags["CAP"], **sizes, **LAUNCH,
    )  # fmt: skip
    _read_fwd[(B * K, d // BV)](q, k, c["beta"], c["f"], c["neg_G"], Dl, M_st, S_st, P0, y, K, **sizes, **LAUNCH)
    return y, (M_out,), (S_out,) if has_S else None, (Dl, r, M_st, S_st)


def backward(q, k, co: dict, P, kept, dy, dM_end, dS_end, flags: dict):
    """The gradients of `forward`'s y and end states dy, dM_end, dS_end (float32 1-tuples; dS_end
    None without momentum): dq, dk, dv, dM_0, dS_0, dP (1-tuples, None where absent) and each
    coefficient field's gradient (B, K, 1, size) (None where the field is absent)."""
    Dl, r, M_st, S_st = kept
    B, K, C, d = q.shape
    BV = BK = min(d, TILE)
    NT = d // BV
    has_S, has_P = flags["HAS_S"], flags["HAS_P"]
    buf = Buffers(q.device)
    c = {n: buf.opt(t) for n, t in co.items()}
    P0 = buf.opt(P and P[0])
    sizes = dict(C=C, D=d, BV=BV, HAS_S=has_S, HAS_P=has_P)
    A = buf.new(B, K, C, d)
    R, Q, U = buf.new(B, K, d, d), buf.new(B, K, d, d, on=has_S), buf.new(B, K, d, d, on=has_P)
    _bwd_reads[(B * K, NT)](q, k, c["beta"], c["f"], c["neg_G"], r, dy, A, R, Q, U, **sizes, **LAUNCH)
    dM_st, dS_st = buf.new(B, K, d, d), buf.new(B, K, d, d, on=has_S)
    dM0, dS0, dP = buf.new(B, d, d), buf.new(B, d, d, on=has_S), buf.new(B, d, d, on=has_P)
    _state_bwd[(B, NT)](
        k, r, c["beta_last"], c["f_last"], c["neg_g_last"], c["m_last"], c["neg_n_last"], R, Q, U,
        dM_end[0], buf.opt(dS_end and dS_end[0]), dM_st, dS_st, dM0, dS0, dP, K, **sizes, **LAUNCH,
    )  # fmt: skip
    dv, dq, dk = buf.new(B, K, C, d), buf.new(B, K, C, d), buf.new(B, K, C, d)
    per_token, per_chunk = (lambda on: buf.new(B, K, NT, C, on=on)), (lambda on: buf.new(B, K, NT, on=on))  # noqa: E731
    part = {
        "beta": per_token(True), "f": per_token(has_S), "beta_last": per_chunk(True), "f_last": per_chunk(has_S),
        "neg_g_last": per_token(True), "m_last": per_chunk(has_S), "neg_n_last": per_token(has_S),
    }  # fmt: skip
    _grads_cols[(B * K, NT)](
        q, k, r, c["neg_g_last"], c["neg_n_last"], Dl, dy, A, M_st, S_st, P0, dM_st, dS_st, dv,
        part["beta"], part["f"], part["beta_last"], part["f_last"], part["neg_g_last"], part["m_last"],
        part["neg_n_last"], K, **sizes, **LAUNCH,
    )  # fmt: skip
    dG = buf.new(B, K, 1, C, C)
    _grads_rows[(B * K, d // BK)](
        q, k, c["beta"], c["f"], c["neg_G"], c["neg_g_last"], c["neg_n_last"], Dl, dy, dv, M_st, S_st, P0,
        dM_st, dS_st, dq, dk, dG, K, BK=BK, RESIDUAL=flags["RESIDUAL"], **sizes, **LAUNCH,
    )  # fmt: skip
    g = {n: None if buf.given(t) is None else t.sum(2, keepdim=True) for n, t in part.items()}  # column tiles add up
    g["neg_G"] = dG
    one = lambda t: None if buf.given(t) is None else (t,)  # noqa: E731
    return dq, dk, dv, (dM0,), one(dS0), one(dP), g
