"""The block every kind shares (Llama macro-architecture, Titans T2 §3.3):
`x = x + mixer(norm(x))`, then `x = x + mlp(norm(x))`. Kinds differ only in the mixer."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from components.base import Mixer


class Block(nn.Module):
    def __init__(
        self, *, mixer: Mixer, norm_mixer: nn.Module, mlp: nn.Module | None, norm_mlp: nn.Module | None
    ) -> None:
        super().__init__()
        self.mixer, self.norm_mixer, self.mlp, self.norm_mlp = mixer, norm_mixer, mlp, norm_mlp

    def init_state(self, batch: int) -> Any:
        return self.mixer.init_state(batch)

    def forward(self, x: Tensor, state: Any = None) -> tuple[Tensor, Any]:
        """(b, n, d) -> (b, n, d), next mixer state (None when `state` is None)."""
        y, state = self.mixer(self.norm_mixer(x), state)
        x = x + y
        if self.mlp is not None:
            x = x + self.mlp(self.norm_mlp(x))
        return x, state
