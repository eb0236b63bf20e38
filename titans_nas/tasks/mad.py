"""MAD's recall and memorization tasks (Poli et al. 2024, "Mechanistic Design and Scaling of
Hybrid Architectures", arXiv 2403.17844), written from the paper's descriptions:

- `recall`: in-context recall. A sequence of key-value pairs whose mapping is fixed within the
  sequence and random across sequences; at the end a copy prefix and a key seen earlier, and the
  model must emit its value. `noise` > 0 is MAD's *noisy* recall (pairs replaced by tokens from a
  separate noise vocabulary); `key_len` / `value_len` > 1 is its *fuzzy* recall (keys and values
  are runs of 1..len distinct tokens, so the model must find where a key starts and ends).
- `memorization`: one key-value mapping shared by every sequence (seeded by `map_seed`): the
  model stores it in its weights, not its context; each key is followed by an insert token,
  where the value is due.
- `compression`: random tokens, then a compression token; a small decoder the task trains with
  the model (`CompressionDecoder`) must rebuild the whole sequence from the model's output at
  the compression token alone: what one position's state holds of the sequence.

As in MAD, recall trains on every next token (the keys are noise to it, the repeated values are
signal) and is scored on the probe's value only; its evaluation targets are the probe alone.
MAD's selective copying is `selective_copy`. Letters: b batch, n sequence, d model width, v vocabulary.
"""

from __future__ import annotations

import math
import random
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from components.base import SpecRuleError
from titans_nas.tasks.base import IGNORE, Batch, TaskBase


class RecallSpec(TaskBase):
    """MAD in-context recall; with `noise` its noisy variant, with `key_len` / `value_len` > 1
    its fuzzy variant. Ids: keys, then values (each half of what is left), then the noise
    vocabulary, then pad and the copy prefix (the last id)."""

    kind: Literal["recall"] = "recall"
    seq_len: int = Field(128, ge=8)
    """Tokens the model reads (MAD: 128)."""
    vocab: int = Field(16, ge=6)
    """All ids (MAD: 16 for recall and fuzzy recall, 32 for noisy recall)."""
    noise: float = Field(0.0, ge=0.0, lt=1.0)
    """Chance that a pair's slot holds noise tokens instead (MAD's noisy recall: 0.2)."""
    noise_vocab: int = Field(0, ge=0)
    """Ids reserved for noise (MAD's noisy recall: 16)."""
    key_len: int = Field(1, ge=1, le=4)
    """Longest key, in tokens (MAD's fuzzy recall: 3); evaluation keys have this length."""
    value_len: int = Field(1, ge=1, le=4)
    """Longest value, in tokens (MAD's fuzzy recall: 3)."""

    @model_validator(mode="after")
    def _fits(self) -> RecallSpec:
        if self.noise > 0 and self.noise_vocab == 0:
            raise SpecRuleError("noise_vocab", "noise needs its own ids (noise_vocab > 0)")
        half = self._content // 2
        if half < max(self.key_len, self.value_len) or half < 2:
            raise SpecRuleError("vocab", f"{self.vocab} ids leave {half} for keys and values: too few")
        if self.seq_len < 4 * (self.key_len + self.value_len) + 1:
            raise SpecRuleError("seq_len", f"{self.seq_len} tokens hold too few pairs of this length")
        return self

    @property
    def _content(self) -> int:
        return self.vocab - 2 - self.noise_vocab  # pad and copy prefix are the last two ids

    @property
    def vocab_size(self) -> int:
        return self.vocab

    def sample(self, batch: int, generator: torch.Generator, split: str = "train") -> Batch:
        rows = [self._row(generator, split) for _ in range(batch)]
        seq = torch.tensor([r[0] for r in rows])  # (b, n + 1)
        probe = torch.tensor([r[1] for r in rows])  # (b, n + 1) bool: the probe's value tokens
        inputs, scored = seq[:, :-1], probe[:, 1:]
        if split == "train":  # every next token, except after padding (nothing is learnable there)
            targets = torch.where(inputs == self.vocab - 2, IGNORE, seq[:, 1:])
        else:  # the probe's value only
            targets = torch.where(scored, seq[:, 1:], IGNORE)
        return Batch(inputs, targets, scored)

    def _row(self, g: torch.Generator, split: str) -> tuple[list[int], list[bool]]:
        rng = random.Random(int(torch.randint(2**62, (1,), generator=g)))  # one draw per row: fast, seeded
        half, pad, prefix = self._content // 2, self.vocab - 2, self.vocab - 1
        fixed = self.key_len if split == "eval" else None  # MAD evaluates at the longest keys

        def motif(first: int, longest: int, length: int | None = None) -> tuple[int, ...]:
            return tuple(rng.sample(range(first, first + half), length or rng.randint(1, longest)))

        probe_key, probe_value = motif(0, self.key_len, fixed), motif(half, self.value_len)
        values = {probe_key: probe_value}
        longest = self.key_len + self.value_len
        budget = self.seq_len + 1 - (1 + len(probe_key) + len(probe_value))  # room before the probe
        at = rng.randrange(budget - 2 * longest)  # where the probe's pair sits (always fits there)
        body: list[int] = []
        placed = False
        while True:
            if not placed and len(body) >= at:
                pair, placed = [*probe_key, *probe_value], True
            elif self.noise > 0 and rng.random() < self.noise:
                size = rng.randint(1, self.key_len) + rng.randint(1, self.value_len)
                pair = [2 * half + rng.randrange(self.noise_vocab) for _ in range(size)]
            else:
                key = motif(0, self.key_len, fixed)
                pair = [*key, *values.setdefault(key, motif(half, self.value_len))]
            if len(body) + len(pair) > budget:  # after the probe's pair: the rest is padding
                break
            body += pair
        seq = [pad] * (budget - len(body)) + body + [prefix, *probe_key, *probe_value]
        mark = [False] * (len(seq) - len(probe_value)) + [True] * len(probe_value)
        return seq, mark


class MemorizationSpec(TaskBase):
    """MAD memorization: `key, insert` pairs whose values come from one fixed mapping of the
    first half of the ids onto the second (seeded by `map_seed`), scored at every insert token."""

    kind: Literal["memorization"] = "memorization"
    seq_len: int = Field(32, ge=2)
    """Tokens the model reads (MAD: 32): seq_len / 2 keys."""
    vocab: int = Field(256, ge=5)
    """All ids (MAD: 256); the last is the insert token."""
    map_seed: int = Field(12345, ge=0)
    """Seed of the key -> value mapping (the fact base every sequence shares)."""

    @model_validator(mode="after")
    def _even(self) -> MemorizationSpec:
        if self.seq_len % 2:
            raise SpecRuleError("seq_len", f"must be even (key, insert pairs), got {self.seq_len}")
        return self

    @property
    def vocab_size(self) -> int:
        return self.vocab

    def mapping(self) -> torch.Tensor:
        """(keys,) the value of each key id 0 .. half - 1: a random bijection onto the upper half."""
        half = (self.vocab - 1) // 2
        return torch.randperm(half, generator=torch.Generator().manual_seed(self.map_seed)) + half

    def sample(self, batch: int, generator: torch.Generator, split: str = "train") -> Batch:
        table = self.mapping()
        keys = torch.randint(len(table), (batch, self.seq_len // 2), generator=generator)
        insert = torch.full_like(keys, self.vocab - 1)
        inputs = torch.stack([keys, insert], dim=-1).flatten(1)  # k_1 I k_2 I ...
        targets = torch.stack([torch.full_like(keys, IGNORE), table[keys]], dim=-1).flatten(1)
        return Batch(inputs, targets)


class CompressionSpec(TaskBase):
    """MAD compression: `seq_len - 1` random tokens and a compression token; the task's decoder
    reads the model's features at the compression token only and must emit every token of the
    sequence at its position (the compression token included, as in MAD). Scored on all."""

    kind: Literal["compression"] = "compression"
    seq_len: int = Field(32, ge=2)
    """Tokens the model reads (MAD: 32), the compression token last."""
    vocab: int = Field(16, ge=3)
    """All ids (MAD: 16); the last is the compression token."""

    @property
    def vocab_size(self) -> int:
        return self.vocab

    def sample(self, batch: int, generator: torch.Generator, split: str = "train") -> Batch:
        tokens = torch.randint(self.vocab - 1, (batch, self.seq_len - 1), generator=generator)
        inputs = torch.cat([tokens, torch.full((batch, 1), self.vocab - 1)], dim=1)
        return Batch(inputs, inputs.clone())  # target i: the token at position i, rebuilt

    def readout(self, dim: int) -> nn.Module:
        return CompressionDecoder(dim, self.vocab)


class CompressionDecoder(nn.Module):
    """MAD's compression decoder: the feature at the last position plus a fixed sinusoidal code of
    each position, through a two-layer MLP (RMSNorm, Linear, GELU, twice) and an unembedding:
    logits for every position from one vector (b, n, d) -> (b, n, v)."""

    def __init__(self, dim: int, vocab: int) -> None:
        super().__init__()
        layer = lambda: [nn.RMSNorm(dim), nn.Linear(dim, dim), nn.GELU()]  # noqa: E731
        self.mlp = nn.Sequential(*layer(), *layer())
        self.unembed = nn.Sequential(nn.RMSNorm(dim), nn.Linear(dim, vocab))

    def forward(self, features: Tensor) -> Tensor:
        _, n, d = features.shape
        code = sinusoid(n, d).to(features)
        return self.unembed(self.mlp(features[:, -1:] + code))  # (b, 1, d) + (n, d) -> (b, n, d)


def sinusoid(n: int, d: int) -> Tensor:
    """(n, d): sin / cos of each position at d / 2 geometric frequencies (Vaswani et al. 2017)."""
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, d - d % 2, 2) / d)
    angle = torch.arange(n)[:, None] * freq[None]
    code = torch.zeros(n, d)
    code[:, 0 : d - d % 2 : 2], code[:, 1 : d - d % 2 : 2] = angle.sin(), angle.cos()
    return code
