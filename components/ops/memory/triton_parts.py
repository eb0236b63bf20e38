"""What both Triton kernel sets share: the float32 product, the launch options, one read layer
and one layer's end-of-chunk state on a (C, .) chunk and a column tile of its states.

Per layer (names as in `coefficients.Coefficients`; D the capped deltas, a the layer's key-side
input, x its query-side input, bt / fv / gl / nl the chunk's beta, f, g_last, n_last columns,
bl / fl / ml its beta_last, f_last, m_last):

    read    z  = (G o x a^T) D + bt o xM + (1 - bt) o xP + fv o xS
    state   M' = bl M + (1 - bl) P + fl S + a^T (gl o D),   S' = ml S + a^T (nl o D)
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# the coefficient fields a kernel set returns gradients of, in `triton_loop.FIELDS` order (theta
# has none: the cap's r is detached and the rest of theta reaches G, g, n through torch)
GRAD_FIELDS = ("beta", "f", "neg_G", "beta_last", "f_last", "neg_g_last", "m_last", "neg_n_last")

# tl.dot in float32: "tf32x3" (three TF32 tensor-core products, ~float32 accuracy) on a GPU,
# "ieee" under the interpreter (numpy float32; it has no TF32). Plain ieee on a GPU lowers
# every product to scalar FMAs: tiles of 64 then spill and take minutes to compile.
PRECISION: tl.constexpr = tl.constexpr("ieee" if os.environ.get("TRITON_INTERPRET") == "1" else "tf32x3")

# Every launch: 4 warps, no software pipelining of the loops' loads (its buffers took the largest
# backward kernels past the 227 KB of shared memory an H100 block may have)
LAUNCH = {"num_warps": 4, "num_stages": 1}


class Buffers:
    """float32 buffers on one device, and the 1-element stand-in a launch passes for an absent
    tensor (the argument must be a pointer even where a constexpr switches its use off)."""

    def __init__(self, device):
        self.device, self.dummy = device, torch.zeros(1, device=device)

    def opt(self, t):
        return self.dummy if t is None else t

    def new(self, *shape, on: bool = True):
        return torch.empty(*shape, dtype=torch.float32, device=self.device) if on else self.dummy

    def given(self, t):
        """t, or None where it is the stand-in."""
        return None if t is self.dummy else t


@triton.jit
def load(p, ON: tl.constexpr, shape: tl.constexpr):
    """A float32 tile at pointers p, or zeros when not ON."""
    t = tl.zeros(shape, tl.float32)
    if ON:
        t = tl.load(p)
    return t


@triton.jit
def dot(a, b):
    """A product to float32 accuracy (`PRECISION`; the tests compare with float64 at 1e-4)."""
    return tl.dot(a, b, input_precision=PRECISION)


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
