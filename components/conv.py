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
        n = x.shape[1]
        w, b = self.weight[channels, 0], self.bias[channels]
        # y_t = bias + sum_i w_i x_{t - kernel + 1 + i}: a few shifted multiply-adds, much faster
        # on CPU than a depthwise conv1d (forward and backward) for kernel 4
        y = torch.addcmul(b, full[:, :n], w[:, 0])
        for i in range(1, self.kernel):
            y = torch.addcmul(y, full[:, i : i + n], w[:, i])
        new_state = full[:, full.shape[1] - (self.kernel - 1) :] if state is not None else None
        return y, new_state
