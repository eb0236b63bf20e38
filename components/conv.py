"""Causal depthwise 1D convolution after the q/k/v projections (Titans §4.4, kernel 4).
Letters: b batch, n sequence, d channels."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from components.base import Spec


class ShortConvSpec(Spec):
    """Causal depthwise convolution over the sequence, one filter per channel."""

    kernel: int = Field(4, ge=1, le=64)
    """Taps: output t mixes inputs t - kernel + 1 .. t."""

    def build(self, channels: int) -> ShortConv:
        return ShortConv(channels, self.kernel)


class ShortConv(nn.Module):
    def __init__(self, channels: int, kernel: int) -> None:
        super().__init__()
        self.kernel = kernel
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel))
        self.bias = nn.Parameter(torch.zeros(channels))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # nn.Conv1d's default

    def init_state(self, batch: int) -> Tensor:
        """The last kernel - 1 inputs (zeros before the sequence starts)."""
        return self.weight.new_zeros(batch, self.kernel - 1, self.weight.shape[0])

    def forward(
        self, x: Tensor, state: Tensor | None = None, channels: slice = slice(None)
    ) -> tuple[Tensor, Tensor | None]:
        """(b, n, d) -> (b, n, d) and the next state (None when state is None). `channels`
        selects the filters to use when x holds only those channels."""
        past = state if state is not None else x.new_zeros(x.shape[0], self.kernel - 1, x.shape[2])
        full = torch.cat([past, x], dim=1)
        y = _ShiftedTaps.apply(full, self.weight[channels, 0], self.bias[channels], x.shape[1])
        new_state = full[:, full.shape[1] - (self.kernel - 1) :] if state is not None else None
        return y, new_state


class _ShiftedTaps(torch.autograd.Function):
    """y_t = bias + sum_i w_i full_{t + i} over full = [past ; x] (b, n + kernel - 1, d): a few
    shifted multiply-adds, much faster on CPU than a depthwise conv1d for kernel 4. The backward
    is written out because autograd's gives every tap's slice its own zero-filled full-size
    gradient and adds them up (1.2-1.9x slower forward+backward at (2, 1024, 768) and 2.5-4x at
    study sizes, docs/benchmarks.md); here all taps accumulate into one."""

    @staticmethod
    def forward(ctx, full: Tensor, w: Tensor, bias: Tensor, n: int) -> Tensor:
        y = torch.addcmul(bias, full[:, :n], w[:, 0])
        for i in range(1, w.shape[1]):
            y.addcmul_(full[:, i : i + n], w[:, i])
        ctx.save_for_backward(full, w)
        ctx.n = n
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        full, w = ctx.saved_tensors
        n = ctx.n
        dfull = torch.zeros_like(full) if ctx.needs_input_grad[0] else None
        dw = torch.empty_like(w) if ctx.needs_input_grad[1] else None
        for i in range(w.shape[1]):
            if dfull is not None:
                dfull[:, i : i + n].addcmul_(dy, w[:, i])
            if dw is not None:
                dw[:, i] = (dy * full[:, i : i + n]).sum((0, 1))
        return dfull, dw, dy.sum((0, 1)) if ctx.needs_input_grad[2] else None, None
