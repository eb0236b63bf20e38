"""TitansLM: token embedding -> blocks -> final norm -> LM head, with streaming state.
No mechanism logic lives here; the blocks carry it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class ModelState:
    """Per-block mixer states after the tokens fed so far."""

    blocks: list[Any]


class TitansLM(nn.Module):
    def __init__(
        self, *, vocab_size: int, dim: int, blocks: nn.ModuleList, norm: nn.Module, tie_embeddings: bool
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim)
        # std dim^-1/2: with a tied head, unit-RMS features then give unit-scale logits
        nn.init.normal_(self.embedding.weight, std=dim**-0.5)
        self.blocks, self.norm = blocks, norm
        self.head = None if tie_embeddings else nn.Linear(dim, vocab_size, bias=False)
        self.readout: nn.Module | None = None
        """A task's own head in place of the LM head (`TaskBase.readout`; the builder sets it)."""

    def init_state(self, batch: int) -> ModelState:
        return ModelState([block.init_state(batch) for block in self.blocks])

    def forward(
        self, tokens: Tensor, state: ModelState | None = None, *, positions: Tensor | None = None
    ) -> tuple[Tensor, ModelState | None]:
        """tokens (b, n) -> logits (b, n, v). With `state`, continue a stream and return its next
        state; feeding a sequence in pieces gives the logits of one pass. With `positions` (b, n)
        bool, the LM head reads those positions alone: logits (k, v) for its k True entries in
        row-major order (training on a task that scores a few positions, as MQAR's 4 of 63, skips
        the head and loss everywhere else)."""
        x = self.embedding(tokens)
        states = []
        for i, block in enumerate(self.blocks):
            x, s = block(x, None if state is None else state.blocks[i])
            states.append(s)
        if positions is not None:
            if self.readout is not None:
                raise ValueError("positions select the LM head's inputs; a task's own readout reads every position")
            x = x[positions]
        x = self.norm(x)
        if self.readout is not None:
            logits = self.readout(x)
        else:
            logits = x @ self.embedding.weight.t() if self.head is None else self.head(x)
        return logits, None if state is None else ModelState(states)

    @torch.no_grad()
    def generate(
        self, prompt: Tensor, steps: int, *, temperature: float = 0.0, generator: torch.Generator | None = None
    ) -> Tensor:
        """Continue `prompt` (b, n) by `steps` tokens through the streaming state; greedy when
        temperature is 0. Returns (b, n + steps)."""
        state = self.init_state(prompt.shape[0])
        logits, state = self(prompt, state)
        out = [prompt]
        for _ in range(steps):
            last = logits[:, -1]
            if temperature > 0:
                nxt = torch.multinomial((last / temperature).softmax(-1), 1, generator=generator)
            else:
                nxt = last.argmax(-1, keepdim=True)
            out.append(nxt)
            logits, state = self(nxt, state)
        return torch.cat(out, dim=1)
