"""The memory's surprise along a sequence: a diagnostic for the metrics (memory health)."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from components.ops.memory.common import Granularity, MemoryModel, MemoryState, flat, flat_weights, forward, norm_params
from components.ops.memory.token import memory_update


def chunk_surprise(
    k: Tensor,
    v: Tensor,
    lr: Tensor,
    momentum: Tensor | None,
    decay: Tensor | None,
    state: MemoryState,
    *,
    chunk_size: int,
    model: MemoryModel,
    granularity: Granularity = "token",
    omega: Tensor | None = None,
) -> Tensor:
    """The inner loss (eq. 12) of every whole chunk's tokens at the weights the chunk starts from,
    i.e. the momentary surprise the chunk's gradients are taken at: (b, h, chunks), the mean
    over the chunk's tokens of ||f_{W_{t'}}(k_t) - v_t||^2. A diagnostic (no gradients): a memory
    that learns the sequence shows it falling along the chunks. Tokens before the first chunk
    boundary (a stream cut mid-chunk) are fed but not measured. omega: the Omega rule's gates."""
    b, h, n, _ = k.shape
    norm = norm_params(model, b)
    cut = lambda g, sl: None if g is None else g[:, :, sl]  # noqa: E731
    read = "chunk_start" if granularity == "chunk" else "after_update"
    losses, pos = [], (chunk_size - state.offset) % chunk_size
    with torch.no_grad():
        if pos:
            sl = slice(0, min(pos, n))
            _, state = memory_update(
                k[:, :, sl], k[:, :, sl], v[:, :, sl], cut(lr, sl), cut(momentum, sl), cut(decay, sl), state,
                chunk_size=chunk_size, model=model, read=read, granularity=granularity, omega=cut(omega, sl),
            )  # fmt: skip
        while pos + chunk_size <= n:
            sl = slice(pos, pos + chunk_size)
            pred = forward(flat_weights(state.weights), flat(k[:, :, sl]), model, norm)
            losses.append(model.objective.loss(pred, flat(v[:, :, sl])).mean(-1))
            _, state = memory_update(
                k[:, :, sl], k[:, :, sl], v[:, :, sl], cut(lr, sl), cut(momentum, sl), cut(decay, sl), state,
                chunk_size=chunk_size, model=model, read=read, granularity=granularity, omega=cut(omega, sl),
            )  # fmt: skip
            pos += chunk_size
    if not losses:
        return k.new_zeros(b, h, 0)
    return rearrange(torch.stack(losses, -1), "(b h) k -> b h k", b=b)
