"""The autograd.Function that runs whole chunks through the Triton kernels (`triton_linear` for
a depth-1 memory, `triton_mlp` for depth 2): the same contract as `backward.ChunkLoop`.

Both kernel sets take the same inputs, per memory layer l = 1..L: q, k, v (B, K, c, d), the
coefficients as (B, K, L, size) float32 (one set per layer; shared gate slots are expanded here
and their gradients summed back), then M_1..M_L, S_1..S_L, P_1..P_L in float32.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from components.ops.memory import triton_linear, triton_mlp
from components.ops.memory.common import setting_reach
from components.ops.memory.triton_parts import GRAD_FIELDS

FIELDS = ("theta", *GRAD_FIELDS)
_KERNELS = {1: triton_linear, 2: triton_mlp}

# `auto` takes the Triton kernels up to these sizes (head dim, state floats a layer, chunk): the
# largest they are compiled for sm_90 at in the tests (every launch within an H100 block's shared
# memory; bench/triton_sm90.py reports registers and spills). Larger ones run, tile by tile, and
# are for `backend: triton` to ask for until a GPU has measured them.
AUTO_MAX_HEAD, AUTO_MAX_STATE, AUTO_MAX_CHUNK = 64, 64 * 256, 64


def supported(setting, M: tuple[torch.Tensor, ...], q: torch.Tensor) -> str | None:
    """Why the kernels cannot run whole chunks q (B, K, c, d) from states M (None: they can)."""
    return setting_reach("triton", setting, M, q)


def chosen_by_auto(M: tuple[torch.Tensor, ...], chunk: int) -> bool:
    """Whether `auto` runs states M (B, i, o) at this chunk size through the kernels."""
    small = all(w.shape[-2] * w.shape[-1] <= AUTO_MAX_STATE for w in M)
    return small and M[0].shape[-2] <= AUTO_MAX_HEAD and chunk <= AUTO_MAX_CHUNK


def flags(model, has_S: bool, has_P: bool) -> dict:
    """A kernel set's fixed settings (the MLP kernels also take the activation)."""
    return {"CAP": model.step_cap is not None, "RESIDUAL": model.residual, "HAS_S": has_S, "HAS_P": has_P,
            "SILU": model.activation == "silu"}  # fmt: skip


def _to_slots(g, shape, B: int, K: int, L: int):
    """A field's gradient (B, K, L, ...) -> the field's (B, K, L', ...): shared slots add up."""
    if g is None:
        return None
    t = g.reshape(B, K, L, *shape[3:])
    return t.sum(2, keepdim=True) if shape[2] == 1 else t


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
        B, K = q.shape[:2]
        q, k, v = (t.contiguous() for t in (q, k, v))  # the kernels cast bf16 inputs on load
        cast = lambda t: t.detach().float().contiguous()  # noqa: E731
        fields = {n: None if t is None else cast(t.expand(B, K, L, *t.shape[3:]).reshape(B, K, L, -1))
                  for n, t in co.items()}  # fmt: skip
        model = setting.model  # the step cap's r (detached) is kept, so the backward needs no cap
        Pc = tuple(map(cast, P)) if has_P else None
        ctx.flags = flags(model, has_S, has_P)
        y, M_out, S_out, ctx.kept = _KERNELS[L].forward(
            q, k, v, fields, tuple(map(cast, M)), tuple(map(cast, S)) if has_S else None, Pc,
            float(model.step_cap or 0.0), ctx.flags,
        )  # fmt: skip
        ctx.L, ctx.has, ctx.dtypes, ctx.fields = L, (has_S, has_P), (q.dtype, M[0].dtype), fields
        ctx.shapes = {n: None if t is None else t.shape for n, t in co.items()}
        ctx.save_for_backward(q, k, *(Pc or ()))
        to = lambda ws: (None,) * L if ws is None else tuple(w.to(M[0].dtype) for w in ws)  # noqa: E731
        return (y.to(q.dtype), *to(M_out), *to(S_out))

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, *dstate):
        L, (has_S, has_P), (in_dtype, wt) = ctx.L, ctx.has, ctx.dtypes
        q, k, *P = ctx.saved_tensors
        B, K = q.shape[:2]
        cast = lambda t: t.float().contiguous()  # noqa: E731
        dq, dk, dv, dM0, dS0, dP, g = _KERNELS[L].backward(
            q, k, ctx.fields, tuple(P) if has_P else None, ctx.kept, cast(dy), tuple(map(cast, dstate[:L])),
            tuple(map(cast, dstate[L:])) if has_S else None, ctx.flags,
        )  # fmt: skip
        grads = [_to_slots(g.get(n), ctx.shapes[n], B, K, L) for n in FIELDS]
        to = lambda ts: (None,) * L if ts is None else tuple(t.to(wt) for t in ts)  # noqa: E731
        return (
            None, None, dq.to(in_dtype), dk.to(in_dtype), dv.to(in_dtype), *grads, *to(dM0), *to(dS0), *to(dP),
        )  # fmt: skip
