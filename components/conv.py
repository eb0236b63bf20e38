"""Causal depthwise 1D convolution after the q/k/v projections (Titans §4.4, kernel 4).
Letters: b batch, n sequence, d channels."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from components.base import Spec
from components.ops.memory import cpu_loop


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
        w, b, pad = self.weight[channels, 0], self.bias[channels], self.kernel - 1
        if state is None:  # the zeros before the sequence stay implicit: no concatenated copy
            return _ShiftedTaps.apply(x, w, b, pad), None
        full = torch.cat([state, x], dim=1)
        return _ShiftedTaps.apply(full, w, b, 0), full[:, full.shape[1] - pad :]


class _ShiftedTaps(torch.autograd.Function):
    """y_t = bias + sum_i w_i z_{t + i} over z = [lead zeros ; src] (b, n + kernel - 1, d), src
    being x (lead = kernel - 1) or [past ; x] (lead = 0): a few shifted multiply-adds, much
    faster on CPU than a depthwise conv1d for kernel 4. The backward is written out because
    autograd's gives every tap's slice its own zero-filled full-size gradient and adds them up
    (1.2-1.9x slower forward+backward at (2, 1024, 768) and 2.5-4x at study sizes,
    docs/benchmarks.md); here all taps accumulate into one. On CPU in float32 / float64 the C++
    kernel (cpu_kernel.cpp) computes both in one pass over the rows instead."""

    @staticmethod
    def forward(ctx, src: Tensor, w: Tensor, bias: Tensor, lead: int) -> Tensor:
        ctx.save_for_backward(src, w)
        ctx.lead = lead
        if cpu_loop.unavailable(src, w, bias) is None:
            return cpu_loop.conv_forward(src, w, bias, lead)
        k = w.shape[1]
        n = src.shape[1] + lead - (k - 1)
        last = k - 1 - lead  # the last tap's offset into src: >= 0, its slice has all n rows
        y = torch.addcmul(bias, src[:, last : last + n], w[:, k - 1])
        for i in range(k - 1):
            o = i - lead  # tap i reads src[t + o]; rows before src are zeros
            if o + n > 0:  # a sequence shorter than the kernel: the tap sees only zeros
                y[:, max(-o, 0) :].addcmul_(src[:, max(o, 0) : o + n], w[:, i])
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        src, w = ctx.saved_tensors
        lead, k, n = ctx.lead, w.shape[1], dy.shape[1]
        if cpu_loop.unavailable(src, w, dy) is None:
            grads = cpu_loop.conv_backward(src, w, dy, lead)
            return *(g if need else None for g, need in zip(grads, ctx.needs_input_grad)), None
        dsrc = dw = None
        if ctx.needs_input_grad[0]:  # the last tap covers all of src when the zeros are implicit
            dsrc = dy * w[:, k - 1] if src.shape[1] == n else torch.zeros_like(src)
        if ctx.needs_input_grad[1]:
            dw = torch.empty_like(w)
        for i in range(k):
            o = i - lead
            if o + n <= 0:  # this tap saw only the zeros before the sequence
                if dw is not None:
                    dw[:, i] = 0
                continue
            rows, out = slice(max(o, 0), o + n), slice(max(-o, 0), None)
            if dsrc is not None and (i < k - 1 or src.shape[1] != n):
                dsrc[:, rows].addcmul_(dy[:, out], w[:, i])
            if dw is not None:
                dw[:, i] = (dy[:, out] * src[:, rows]).sum((0, 1))
        return dsrc, dw, dy.sum((0, 1)) if ctx.needs_input_grad[2] else None, None
