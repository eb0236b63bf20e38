"""The autograd.Function that runs whole chunks through a fused kernel, one launch per call and
direction: the Triton kernels on GPU (`triton_loop`), the C++ kernel on CPU (`cpu_loop`). Same
contract as `backward.ChunkLoop`.

Every kernel takes the same argument layout, per memory layer l = 1..L: inputs q, k, v
(B, K, c, d), the coefficients as (B, K, L, size) (one set per layer; shared gate slots are
expanded here and their gradients summed back), then M_1..M_L, S_1..S_L, P_1..P_L; the forward
writes the reads, the end states and the chunk-start states the backward reads. A `Launcher`
says in which dtype a kernel computes and runs it.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch.autograd.function import once_differentiable

FIELDS = ("theta", "beta", "f", "neg_G", "beta_last", "f_last", "neg_g_last", "m_last", "neg_n_last")
_PER_TOKEN = ("theta", "beta", "f", "neg_g_last", "neg_n_last")


class Launcher(Protocol):
    def dtype(self, state_dtype: torch.dtype) -> torch.dtype: ...

    def inputs(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor: ...

    def forward(self, L: int, B: int, tensors: list[torch.Tensor], K: int, cap: float, flags: dict) -> None: ...

    def backward(self, L: int, B: int, tensors: list[torch.Tensor], K: int, cap: float, flags: dict) -> None: ...


def reach(kernel: str, setting, M, q) -> str | None:
    """`common.kernel_reach` of a call: chunks q (B, K, c, d) from states M, at token granularity."""
    from components.ops.memory.common import beyond_plain_rule, kernel_reach

    m = setting.model
    beyond = beyond_plain_rule(m, setting.channelwise)
    dims = (q.shape[-2], M[0].shape[-2], *(w.shape[-1] for w in M))
    return kernel_reach(kernel, len(M), m.norm is not None, "token", setting.read, dims, m.objective.kind, beyond)


def flags(model, C: int, d: int, M, has_S: bool, has_P: bool) -> dict:
    """A kernel's fixed settings (the MLP kernels also take their hidden width and activation)."""
    out = {"C": C, "D": d, "CAP": model.step_cap is not None, "RESIDUAL": model.residual}
    out |= {"HAS_S": has_S, "HAS_P": has_P}
    if len(M) == 2:
        out |= {"E": M[0].shape[-1], "SILU": model.activation == "silu"}
    return out


class KernelLoop(torch.autograd.Function):
    @staticmethod
    def run(launcher: Launcher, setting, q, k, v, co, M, S):
        L = len(M)
        prior = setting.prior or (None,) * L
        out = KernelLoop.apply(launcher, setting, L, q, k, v, *co, *M, *(S or (None,) * L), *prior)
        B, K, c, d = q.shape
        return out[0].reshape(B, K * c, d), tuple(out[1 : 1 + L]), tuple(out[1 + L :]) if S is not None else None

    @staticmethod
    def forward(ctx, launcher, setting, L, q, k, v, *rest):
        co = dict(zip(FIELDS, rest[:9]))
        M, S, P = rest[9 : 9 + L], rest[9 + L : 9 + 2 * L], rest[9 + 2 * L :]
        has_S, has_P = S[0] is not None, P[0] is not None
        B, K, C, d = q.shape
        dt = launcher.dtype(M[0].dtype)
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
        qkv = [launcher.inputs(t, dt) for t in (q, k, v)]
        tensors = [*qkv, *coefs, *Mc, *map(arg, Sc), *map(arg, Pc), y, *ends, *starts]
        launcher.forward(L, B, tensors, K, float(model.step_cap or 0.0), flags(model, C, d, M, has_S, has_P))
        ctx.launcher, ctx.setting, ctx.L, ctx.has, ctx.dtypes = launcher, setting, L, (has_S, has_P), (q.dtype, dt)
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
        ctx.launcher.backward(L, B, tensors, K, cap, flags(model, C, d, starts[:L], has_S, has_P))

        def to_slots(name):  # (B, K, L, ...) -> the field's (B, K, L', ...): shared slots add up
            if g[name] is None:
                return None
            shape = ctx.shapes[name]
            t = g[name].reshape(B, K, L, *shape[3:])
            return t.sum(2, keepdim=True) if shape[2] == 1 else t

        dM0, dS0, dP = d0[:L], d0[L : 2 * L], d0[2 * L :]
        wt = ctx.state_dtype
        return (
            None, None, None, dq.to(in_dtype), dk.to(in_dtype), dv.to(in_dtype), *(to_slots(n) for n in FIELDS),
            *(t.to(wt) for t in dM0), *(t.to(wt) if has_S else None for t in dS0),
            *(t.to(wt) if has_P else None for t in dP),
        )  # fmt: skip
