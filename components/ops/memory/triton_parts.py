"""The pieces both Triton kernels are built from: one read layer and one layer's end-of-chunk
state, forward and backward, on (C, .) row tiles of a chunk and on-chip state tiles.

Per layer (names as in `coefficients.Coefficients`; D the capped deltas, a the layer's key-side
input, x its query-side input, bt / fv / gl / nl the chunk's beta, f, g_last, n_last columns,
bl / fl / ml its beta_last, f_last, m_last):

    read    z  = (G o x a^T) D + bt o xM + (1 - bt) o xP + fv o xS
    state   M' = bl M + (1 - bl) P + fl S + a^T (gl o D),   S' = ml S + a^T (nl o D)
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def dot(a, b):
    """Matmul in full float32 (tests compare against float64 at 1e-4)."""
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def read(x, a, Dl, M, Pm, S, G, bt, fv, HAS_S: tl.constexpr, HAS_P: tl.constexpr):
    """z of one read layer, and t = x a^T (its backward needs it)."""
    t = dot(x, tl.trans(a))
    z = dot(G * t, Dl) + bt[:, None] * dot(x, M)
    if HAS_P:
        z += (1 - bt)[:, None] * dot(x, Pm)
    if HAS_S:
        z += fv[:, None] * dot(x, S)
    return z, t


@triton.jit
def read_backward(x, a, Dl, M, Pm, S, G, t, bt, fv, dz, HAS_S: tl.constexpr, HAS_P: tl.constexpr):
    """Gradients of one read layer for d loss / d z = dz: of x, of M, P, S (to add), of D and
    a (to add), and of its coefficients G, beta and f."""
    xm = dot(x, M)
    up = xm
    bdz = bt[:, None] * dz
    gM = dot(tl.trans(x), bdz)
    dx = dot(bdz, tl.trans(M))
    dP = tl.zeros_like(M)
    gS = tl.zeros_like(M)
    dfv = tl.zeros_like(bt)
    if HAS_P:
        up -= dot(x, Pm)
        pdz = dz - bdz  # (1 - beta) dz
        dP = dot(tl.trans(x), pdz)
        dx += dot(pdz, tl.trans(Pm))
    if HAS_S:
        dfv = tl.sum(dz * dot(x, S), 1)
        fdz = fv[:, None] * dz
        gS = dot(tl.trans(x), fdz)
        dx += dot(fdz, tl.trans(S))
    dbt = tl.sum(dz * up, 1)
    dD = dot(tl.trans(G * t), dz)
    dgt = dot(dz, tl.trans(Dl))  # d loss / d (G o t)
    dG = dgt * t  # also above the diagonal (where G is 0): the gradient of the function of G
    dt = dgt * G
    dx += dot(dt, a)
    da = dot(tl.trans(dt), x)
    return dx, gM, dP, gS, dD, da, dG, dbt, dfv


@triton.jit
def state(a, Dl, M, Pm, S, bl, gl, fl, ml, nl, HAS_S: tl.constexpr, HAS_P: tl.constexpr):
    """The layer's state after the chunk: M', S'."""
    newM = bl * M + dot(tl.trans(a), gl[:, None] * Dl)
    newS = S
    if HAS_P:
        newM += (1 - bl) * Pm
    if HAS_S:
        newM += fl * S
        newS = ml * S + dot(tl.trans(a), nl[:, None] * Dl)
    return newM, newS


@triton.jit
def state_backward(a, Dl, M, Pm, S, bl, gl, fl, ml, nl, dM, dS, HAS_S: tl.constexpr, HAS_P: tl.constexpr):
    """Gradients of the state step for d loss / d M' = dM, d S' = dS: of M and S (the previous
    chunk's dM, dS), of P (to add), of D and a (to add) and of bl, gl, fl, ml, nl."""
    gM = bl * dM
    dbl = tl.sum(tl.sum(dM * M, 1), 0)
    dP = tl.zeros_like(M)
    if HAS_P:
        dbl -= tl.sum(tl.sum(dM * Pm, 1), 0)
        dP = (1 - bl) * dM
    hm = dot(a, dM)
    dD = gl[:, None] * hm
    dgl = tl.sum(Dl * hm, 1)
    da = dot(gl[:, None] * Dl, tl.trans(dM))
    gS = dS
    dfl = dbl * 0
    dml = dbl * 0
    dnl = dgl * 0
    if HAS_S:
        gS = fl * dM + ml * dS
        dfl = tl.sum(tl.sum(dM * S, 1), 0)
        dml = tl.sum(tl.sum(dS * S, 1), 0)
        hs = dot(a, dS)
        dD += nl[:, None] * hs
        dnl = tl.sum(Dl * hs, 1)
        da += dot(nl[:, None] * Dl, tl.trans(dS))
    return gM, gS, dP, dD, da, dbl, dgl, dfl, dml, dnl


@triton.jit
def store_layer_grads(
    dbeta_last, dg_last, dbeta, dG, df_last, dm_last, dn_last, df, s, C: tl.constexpr,
    dbl, dgl, dbt, dGj, dfl, dml, dnl, dfv, HAS_S: tl.constexpr,
):  # fmt: skip
    """One layer's coefficient gradients of one chunk into the (B, K, L, ...) gradient buffers;
    s = (b K + j) L + l, the chunk-and-layer slot."""
    rc = tl.arange(0, C)
    tl.store(dbeta_last + s, dbl)
    tl.store(dg_last + s * C + rc, dgl)
    tl.store(dbeta + s * C + rc, dbt)
    tl.store(dG + s * C * C + rc[:, None] * C + rc[None, :], dGj)
    if HAS_S:
        tl.store(df_last + s, dfl)
        tl.store(dm_last + s, dml)
        tl.store(dn_last + s * C + rc, dnl)
        tl.store(df + s * C + rc, dfv)
