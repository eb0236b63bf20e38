"""The fast chunked memory update with per-token gates (granularity "token", the paper's rule).

A loop over chunks with matmuls inside: keys forward at the chunk-start weights, a
hand-derived inner backward (per-token gradients are outer products and are never built),
per-token coefficients from log-space cumulative sums (`coefficients`), the TTT dual form for
per-token reads, and one matmul per weight for the end-of-chunk state. Whole chunks run
through `ChunkLoop` (its outer backward written by hand, `backward.py`; compiled, its step and
backward are each compiled) unless the memory has a LayerNorm or autocast is on; then autograd
differentiates `chunk_step` (compiled, the step is).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from components.ops.memory.backward import ChunkLoop, hand_backward_applies
from components.ops.memory.chunk import memory_update_chunkwise
from components.ops.memory.coefficients import coefficients, per_chunk
from components.ops.memory.common import (
    Activation,
    Granularity,
    MemoryModel,
    MemoryState,
    Read,
    check,
    compile_once,
    flat,
    flat_weights,
    gate_logs,
    norm_params,
    prior_weights,
    retained,
    unflat_outputs,
    unflat_weights,
)
from components.ops.memory.mirror import materialized_step
from components.ops.memory.muon import muon_coefficients, muon_step
from components.ops.memory.omega import Rows, band
from components.ops.memory.step import Backend, Setting, chunk_step


class Inputs(NamedTuple):
    """One call's per-token tensors in bmm layout: q, k, v (B, n, d), gates (B, L', n), a decay per
    channel (B, L', n, O)."""

    q: Tensor
    k: Tensor
    v: Tensor
    lr: Tensor
    log_eta: Tensor | None
    log_keep: Tensor | None


def _step(setting: Setting):
    """The chunk step (Muon's when the inner optimiser is Muon, the materialised one for the KL and
    l_q retentions' per-token reads), or its torch.compile'd version (`common.compile_once`)."""
    step = chunk_step
    if setting.model.muon_steps:
        step = muon_step
    elif setting.model.mirrored and setting.read == "after_update":  # reads through primal(A_t)
        step = materialized_step
    return compile_once(step) if setting.compiled else step


def _coefficients(setting: Setting):
    """The chunk step's coefficients from the gates (`coefficients`, or Muon's)."""
    return muon_coefficients if setting.model.muon_steps else coefficients


def memory_update(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr: Tensor,
    momentum: Tensor | None,
    decay: Tensor | None,
    state: MemoryState,
    *,
    chunk_size: int,
    activation: Activation = "gelu",
    read: Read = "after_update",
    model: MemoryModel | None = None,
    granularity: Granularity = "token",
    checkpoint_chunks: int | None = None,
    compiled: bool = False,
    backend: Backend = "auto",
    omega: Tensor | None = None,
    final_state: bool = True,
) -> tuple[Tensor, MemoryState | None]:
    """Run the memory over n tokens from `state`: outputs (b, h, n, d) and the state after them.

    `model` describes f_W around the weights (activation, residual, LayerNorm); `activation`
    is kept for the plain MLP case. checkpoint_chunks: recompute groups of that many chunks in
    the backward pass (torch.utils.checkpoint) instead of storing their activations.
    compiled: run the chunk step through torch.compile (GPU, or CPU with a C++ compiler).
    backend: whole chunks through a fused kernel, the Triton kernels ("triton") or the C++ kernel
    on CPU ("cpp"; `common.kernel_reach` says what they cover), through torch ("torch"), or the
    fused kernel where one covers the call ("auto": `_kernel_loop`).
    omega: the Omega rule's gates gamma (b, h, n) in [0, 1] (`model.omega_window` > 1; None = 1).
    final_state: False when the caller drops the state after the call (training without a
    stream): the C++ kernel may then take an unfinished last chunk padded to a whole one in the
    same call (`_padded`), and the state returned is None.
    """
    model = model or MemoryModel(activation=activation)
    check(q, k, v, lr, momentum, decay, state, model, omega)
    if granularity == "chunk":
        if read != "chunk_start":
            raise ValueError('granularity "chunk" needs read="chunk_start"')
        return memory_update_chunkwise(q, k, v, lr, momentum, decay, state, chunk_size, model, compiled)
    b, h, n, _ = q.shape
    setting = Setting(
        model, norm_params(model, b), prior_weights(model, b), read, chunk_size, checkpoint_chunks, compiled, backend,
        channelwise=decay is not None and decay.ndim == 5,
    )  # fmt: skip
    inputs = Inputs(flat(q), flat(k), flat(v), *gate_logs(lr, momentum, decay, b, h))
    w = model.omega_window
    rows = Rows(state, k, v, omega if omega is not None else torch.ones_like(k[..., 0]), lr, w) if w > 1 else None
    M, S = flat_weights(state.weights), flat_weights(state.momentum)
    anchor = flat_weights(state.anchor) if state.anchor is not None else M
    offset, outs, pos = state.offset, [], 0

    def piece(M, S, anchor, start: int, c: int):
        """Tokens [start, start + c) of one chunk, gradients at `anchor`."""
        sl = slice(start, start + c)
        gates, window = [None if t is None else t[:, :, sl][:, None] for t in inputs[3:]], None
        chunk = [t[:, sl] for t in inputs[:3]]
        if rows is not None:  # the keys of the chunk and of the w - 1 tokens before it
            k_rows, v_rows, gamma, lr_rows = rows.piece(start, c)
            chunk[1:], window = [k_rows, v_rows], (band(gamma[:, None], c), lr_rows[:, None])
        co = _coefficients(setting)(*gates, window)
        return _step(setting)(anchor, M, S, *chunk, per_chunk(co, len(M))[0], setting)[:3]

    # the unfinished chunk of the previous call, with gradients still at its anchor
    if offset and n:
        c = min(n, chunk_size - offset)
        y, M, S = piece(M, S, anchor, 0, c)  # anchor is not M here: no shared bmm
        outs.append(y)
        pos, offset = c, (offset + c) % chunk_size
        if offset == 0:  # the chunk is complete
            M = retained(M, model, setting.prior, chunk_size)
            anchor = M
    if pos < n:
        full = (n - pos) // chunk_size
        fused_tail = (
            (n - pos) % chunk_size > 0 and rows is None and _kernel_loop(setting, q, M, strict=False) is not None
        )
        if fused_tail and not final_state and pos == 0 and q.device.type == "cpu":
            # one kernel call instead of two: a call costs ~1.1 ms (linear) to ~4.5 ms (MLP of
            # depth 3) beyond its chunks at the quickstart's sizes (docs/benchmarks.md). The
            # padding comes after every real token, so their reads and gradients are exact; it
            # moves only the end state, which nobody reads.
            y, _, _ = _full_chunks(_padded(inputs, (full + 1) * chunk_size - n), rows, M, S, 0, full + 1, setting)
            return unflat_outputs([y[:, :n]], q, v), None
        # whole chunks, then the tail: each input cut once, at `cut` (0: not cut)
        cut = full * chunk_size if pos == 0 and full and fused_tail else 0
        chunks, last = _split_tokens(inputs, cut) if cut else (inputs, inputs)
        if full:
            y, M, S = _full_chunks(chunks, rows, M, S, pos, full, setting)
            outs.append(y)
            pos += full * chunk_size
        anchor = M
        if pos < n:
            tail = n - pos
            if fused_tail:
                # a fused kernel takes any chunk size: the unfinished last chunk is one chunk of
                # `tail` tokens from M, its anchor, with no retention at its end (the chunk goes
                # on in the next call). Through torch's autograd instead, a training sequence of
                # 63 tokens at chunk 8 paid for its last 7 as much as for two whole chunks.
                y, M, S = _full_chunks(last, rows, M, S, pos - cut, 1, setting._replace(chunk_size=tail))
            else:
                y, M, S = piece(M, S, anchor, pos, tail)
            outs.append(y)
            offset = tail
    new_state = MemoryState(
        unflat_weights(M, b),
        unflat_weights(S, b),
        unflat_weights(anchor, b) if offset else None,
        offset,
        history=rows.history() if rows is not None else None,
    )
    return unflat_outputs(outs, q, v), new_state


def _padded(inputs: Inputs, pad: int) -> Inputs:
    """Every input with `pad` zeros after its last token (dim 1 of q, k, v; dim 2 of the gates):
    zero queries, keys, values and learning rates, and log eta = log keep = 0 (finite, and
    nothing after them reads them). The padding's gradients are dropped by F.pad's backward."""
    more = lambda t, dim: None if t is None else F.pad(t, (0, 0) * (t.ndim - 1 - dim) + (0, pad))  # noqa: E731
    return Inputs(*[more(t, 1) for t in inputs[:3]], *[more(t, 2) for t in inputs[3:]])


def _split_tokens(inputs: Inputs, at: int) -> tuple[Inputs, Inputs]:
    """Tokens [0, at) and [at, n) of every input, each tensor cut by one split: its backward is
    one cat, where two narrows cost a full-size zero tensor, a copy and an add each."""

    def cut(t: Tensor | None, dim: int) -> tuple[Tensor | None, Tensor | None]:
        return (None, None) if t is None else t.split([at, t.shape[dim] - at], dim)

    parts = [cut(t, 1) for t in inputs[:3]] + [cut(t, 2) for t in inputs[3:]]
    return Inputs(*(a for a, _ in parts)), Inputs(*(b for _, b in parts))


def _full_chunks(inputs: Inputs, rows: Rows | None, M, S, pos: int, count: int, setting: Setting):
    """`count` whole chunks from `pos`: coefficients for all of them at once, then the loop,
    in checkpointed groups of `setting.group` chunks if asked."""
    C = setting.chunk_size
    end = pos + count * C
    whole = pos == 0 and end == inputs.q.shape[1]  # no slicing then: a slice's backward is a full-size copy
    cut = lambda t, dim: t if whole else t.narrow(dim, pos, end - pos)  # noqa: E731
    split = lambda t: None if t is None else rearrange(cut(t, 2), "B l (k c) ... -> B k l c ...", c=C)  # noqa: E731
    q, k, v = (rearrange(cut(t, 1), "B (k c) d -> B k c d", c=C) for t in inputs[:3])
    window = None
    if rows is not None:  # each chunk's keys with the w - 1 before it (overlapping windows)
        k, v, gamma, lr_rows = rows.chunks(pos, count, C)
        window = (band(gamma, C), lr_rows)
    kernel = _kernel_loop(setting, q, M)
    gates = [split(t) for t in inputs[3:]]
    if getattr(kernel, "takes_gates", False):  # the C++ kernel computes the coefficients itself
        co, bundle = tuple(gates), lambda *t: t
    else:
        co = _coefficients(setting)(*gates, window)
        bundle = type(co)
    hand = hand_backward_applies(q, setting)

    def steps(M, S, q, k, v, *co):
        co = bundle(*co)
        if kernel is not None:
            return kernel.run(setting, q, k, v, co, M, S)
        if hand:
            return ChunkLoop.run(setting, q, k, v, co, M, S)
        step, ys = _step(setting), []
        # unbind: one stack in the backward pass instead of a full-size zero tensor per chunk
        for args in zip(q.unbind(1), k.unbind(1), v.unbind(1), per_chunk(co, len(M))):
            y, M, S, _ = step(M, M, S, *args, setting)
            M = retained(M, setting.model, setting.prior, C)
            ys.append(y)
        return torch.cat(ys, 1), M, S

    group = setting.group or count
    outs = []
    for lo in range(0, count, group):
        sl = slice(lo, min(count, lo + group))
        part = [t if group >= count or t is None else t[:, sl] for t in (q, k, v, *co)]
        if group < count and torch.is_grad_enabled():
            y, M, S = checkpoint(steps, M, S, *part, use_reentrant=False)
        else:
            y, M, S = steps(M, S, *part)
        outs.append(y)
    return torch.cat(outs, 1), M, S


def _kernel_loop(setting: Setting, q: Tensor, M, strict: bool = True):
    """The fused kernel for whole chunks, or None for the torch path: the C++ kernel on CPU
    ("cpp", or "auto" where it covers the call: `cpu_loop.reach`), the Triton kernels ("triton",
    or "auto" on CUDA where they cover the call at sizes they were compiled for:
    `triton_loop.chosen_by_auto`). strict: a backend asked for by name that
    cannot take the call raises (else None: the unfinished last chunk, say, where Triton's
    chunk sizes are powers of two)."""
    if setting.backend == "torch":
        return None
    if setting.backend == "cpp" or (setting.backend == "auto" and q.device.type == "cpu"):
        from components.ops.memory import cpu_loop

        reason = cpu_loop.reach(setting, M, q)
        if strict and setting.backend == "cpp" and reason is not None:
            raise ValueError(reason)
        return None if reason is not None else cpu_loop.CpuLoop if len(M) == 1 else cpu_loop.CpuMlpLoop
    if setting.backend == "auto" and not q.is_cuda:
        return None
    try:
        from components.ops.memory import triton_loop
    except ImportError as e:
        if strict and setting.backend == "triton":
            raise ValueError(f'backend "triton" needs the triton package ({e})') from e
        return None
    reason = triton_loop.supported(setting, M, q)
    if strict and setting.backend == "triton" and reason is not None:
        raise ValueError(reason)
    if reason is not None or (setting.backend == "auto" and not triton_loop.chosen_by_auto(M, q.shape[-2])):
        return None
    return triton_loop.TritonLoop
