"""The autograd.Function that runs whole chunks through the Triton kernels (`triton_linear` for
a depth-1 memory, `triton_mlp` for depth 2): the same contract as `backward.ChunkLoop`.

Both kernels take the same argument layout, per memory layer l = 1..L: inputs q, k, v
(B, K, c, d), the coefficients as (B, K, L, size) float32 (one set per layer; shared gate slots
are expanded here and their gradients summed back), then M_1..M_L, S_1..S_L, P_1..P_L; the
forward writes the reads, the end states and the chunk-start states the backward reads.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from components.ops.memory.common import setting_reach
from components.ops.memory.triton_linear import _linear_bwd, _linear_fwd
from components.ops.memory.triton_mlp import _mlp_bwd, _mlp_fwd

FIELDS = ("theta", "beta", "f", "neg_G", "beta_last", "f_last", "neg_g_last", "m_last", "neg_n_last")
_PER_TOKEN = ("theta", "beta", "f", "neg_g_last", "neg_n_last")
_KERNELS = {1: (_linear_fwd, _linear_bwd), 2: (_mlp_fwd, _mlp_bwd)}

# `auto` takes the Triton kernels only where each layer's whole state tile is at most this many
# floats: they keep every state tile on chip (no tiling over the hidden width yet), so larger
# memories would spill or fail to compile, and no GPU has measured them (docs/decisions/0007)
AUTO_MAX_TILE = 64 * 64


def supported(setting, M: tuple[torch.Tensor, ...], q: torch.Tensor) -> str | None:
    """Why the kernels cannot run whole chunks q (B, K, c, d) from states M (None: they can)."""
    return setting_reach("triton", setting, M, q)


def chosen_by_auto(M: tuple[torch.Tensor, ...]) -> bool:
    return all(w.shape[-2] * w.shape[-1] <= AUTO_MAX_TILE for w in M)


def _flags(model, C: int, d: int, M, has_S: bool, has_P: bool) -> dict:
    """A kernel's fixed settings (the MLP kernels also take their hidden width and activation)."""
    out = {"C": C, "D": d, "CAP": model.step_cap is not None, "RESIDUAL": model.residual}
    out |= {"HAS_S": has_S, "HAS_P": has_P}
    if len(M) == 2:
        out |= {"E": M[0].shape[-1], "SILU": model.activation == "silu"}
    return out


class TritonLoop(torch.autograd.Function):
    @staticmethod
    def run(setting, q, k, v, co, M, S):
        L = len(M)
        prior = setting.prior or (None,) * L
        out = TritonLoop.apply(setting, L, q, k, v, *co, *M, *(S or (None,) * L), *prior)
        B, K, c, d = q.shape
        return out[0].reshape(B, K * c, d), tuple(out[1 : 1 + L]), tuple(out[1 + L :]) if S is not None else None

    @staticmethod
    def forward(ctx, setting, L, q, k, v, *rest):
        co = dict(zip(FIELDS, rest[:9]))
        M, S, P = rest[9 : 9 + L], rest[9 + L : 9 + 2 * L], rest[9 + 2 * L :]
        has_S, has_P = S[0] is not None, P[0] is not None
        B, K, C, d = q.shape
        dt = torch.float32  # on chip; the inputs as they come (bf16 is cast on load)
        q, k, v = (t.contiguous() for t in (q, k, v))
        dummy = q.new_zeros(1, dtype=dt)
        arg = lambda t: dummy if t is None else t  # noqa: E731
        cast = lambda t: None if t is None else t.detach().to(dt).contiguous()  # noqa: E731

        def per_layer(t):  # slot min(l, L' - 1) for every layer, flattened to (B, K, L, size)
            return None if t is None else cast(t.expand(B, K, L, *t.shape[3:]).reshape(B, K, L, -1))

        coefs = [arg(per_layer(co[name])) for name in FIELDS]
        Mc, Sc, Pc = [cast(w) for w in M], [cast(w) for w in S], [cast(w) for w in P]
        y = torch.empty(B, K, C, d, dtype=dt, device=q.device)
        ends = [torch.empty_like(w) for w in Mc + Mc]  # M_out..., S_out...
        starts = [torch.empty(B, K, *w.shape[1:], dtype=dt, device=q.device) for w in Mc]
        starts += [torch.empty_like(w) for w in starts] if has_S else [dummy] * L
        model = setting.model
        qkv = [q, k, v]
        tensors = [*qkv, *coefs, *Mc, *map(arg, Sc), *map(arg, Pc), y, *ends, *starts]
        _KERNELS[L][0][(B,)](*tensors, K, K * C, float(model.step_cap or 0.0), **_flags(model, C, d, M, has_S, has_P))
        ctx.setting, ctx.L, ctx.has, ctx.dtypes = setting, L, (has_S, has_P), (q.dtype, dt)
        ctx.state_dtype = M[0].dtype
        ctx.shapes = {name: None if t is None else t.shape for name, t in co.items()}
        ctx.save_for_backward(*qkv, *coefs, *map(arg, Pc), *starts)
        wt = M[0].dtype
        return (y.to(q.dtype), *(w.to(wt) for w in ends[:L]), *(w.to(wt) if has_S else None for w in ends[L:]))

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, *dstate):
        L, (has_S, has_P), (in_dtype, dt), model = ctx.L, ctx.has, ctx.dtypes, ctx.setting.model
        q, k, v, *rest = ctx.saved_tensors
        coefs, Pc, starts = rest[:9], rest[9 : 9 + L], rest[9 + L :]
        B, K, C, d = q.shape
        dev = q.device
        dummy = q.new_zeros(1, dtype=dt)
        cast = lambda t: t.to(dt).contiguous()  # noqa: E731
        dq, dk, dv = (torch.empty(B, K, C, d, dtype=dt, device=dev) for _ in range(3))
        size = lambda name: (C, C) if name == "neg_G" else (C,) if name in _PER_TOKEN else ()  # noqa: E731
        g = {
            name: None
            if ctx.shapes[name] is None or name == "theta"
            else torch.empty(B, K, L, *size(name), dtype=dt, device=dev)
            for name in FIELDS
        }
        d0 = [torch.empty(B, *w.shape[2:], dtype=dt, device=dev) for w in starts[:L] * 3]  # dM_0.., dS_0.., dP..
        dM, dS = dstate[:L], dstate[L:]
        tensors = [
            q, k, v, *coefs, *Pc, *starts, cast(dy), *map(cast, dM), *(cast(t) if has_S else dummy for t in dS),
            dq, dk, dv, *(dummy if g[name] is None else g[name] for name in FIELDS[1:]), *d0,
        ]  # fmt: skip
        cap = float(model.step_cap or 0.0)
        _KERNELS[L][1][(B,)](*tensors, K, K * C, cap, **_flags(model, C, d, starts[:L], has_S, has_P))

        def to_slots(name):  # (B, K, L, ...) -> the field's (B, K, L', ...): shared slots add up
            if g[name] is None:
                return None
            shape = ctx.shapes[name]
            t = g[name].reshape(B, K, L, *shape[3:])
            return t.sum(2, keepdim=True) if shape[2] == 1 else t

        dM0, dS0, dP = d0[:L], d0[L : 2 * L], d0[2 * L :]
        wt = ctx.state_dtype
        return (
            None, None, dq.to(in_dtype), dk.to(in_dtype), dv.to(in_dtype), *(to_slots(n) for n in FIELDS),
            *(t.to(wt) for t in dM0), *(t.to(wt) if has_S else None for t in dS0),
            *(t.to(wt) if has_P else None for t in dP),
        )  # fmt: skip
