"""Single needle in a haystack, RULER's three S-NIAH forms (Hsieh et al. 2024), byte level:

- `passkey` (S-NIAH-1): a number hidden in repeated filler sentences;
- `number`  (S-NIAH-2): a number hidden in real text (Shakespeare instead of Paul Graham's essays);
- `uuid`    (S-NIAH-3): a UUID hidden in real text.

Needle: "One of the special magic numbers for {key} is: {value}." placed at `depth` of the
haystack (at a sentence boundary); the sequence ends with the question and the answer. Scored on
the answer's bytes; the metric is exact match (every byte of the answer right).
"""

from __future__ import annotations

import uuid as uuidlib
from functools import cache
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator

from components.base import SpecRuleError
from titans_nas.tasks.base import IGNORE, Batch, TaskBase
from titans_nas.tasks.text import split_bytes

NOISE = b"The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
ADJECTIVES = (
    "amber brave calm damp eager faint gentle hollow icy jolly keen loud mellow narrow odd pale quiet rapid "
    "silent tidy upper vivid warm young"
).split()
NOUNS = (
    "anchor basket candle desert engine falcon garden harbor island jacket kettle lantern meadow needle "
    "orchard pepper quarry river saddle tunnel valley wagon yard zebra"
).split()


class NIAHSpec(TaskBase):
    """RULER S-NIAH at byte level; `context_len` bytes in all (the model reads context_len - 1)."""

    kind: Literal["niah"] = "niah"
    variant: Literal["passkey", "number", "uuid"] = "passkey"
    """S-NIAH-1 (passkey in filler), -2 (number in text) or -3 (UUID in text)."""
    context_len: int = Field(1024, ge=64)
    """Total bytes: haystack, needle, question and answer."""
    depth: float | None = Field(None, ge=0.0, le=1.0)
    """Where the needle sits in the haystack (0 = start, 1 = end); null = uniform per example."""
    digits: int = Field(7, ge=1, le=32)
    """Digits of the number (passkey and number variants; RULER uses 7)."""
    text_loss: bool = False
    """Also train on predicting every byte of the text, not only the answer (a denser signal;
    the metric still reads the answer bytes only)."""

    metric: ClassVar[str] = "exact_match"

    @model_validator(mode="after")
    def _fits(self) -> NIAHSpec:
        longest_key = "x" * (max(map(len, ADJECTIVES)) + 1 + max(map(len, NOUNS)))
        value = "0" * (36 if self.variant == "uuid" else self.digits)
        need = sum(map(len, self._parts(longest_key, value))) + 16
        if self.context_len < need:
            raise SpecRuleError("context_len", f"{self.context_len} bytes cannot hold the needle and question ({need})")
        return self

    @property
    def vocab_size(self) -> int:
        return 256

    def _parts(self, key: str, value: str) -> tuple[bytes, bytes, bytes]:
        kind = "uuid" if self.variant == "uuid" else "number"
        needle = f"One of the special magic {kind}s for {key} is: {value}. ".encode()
        question = f"\nWhat is the special magic {kind} for {key}? The special magic {kind} for {key} is: ".encode()
        return needle, question, value.encode()

    def example(
        self, generator: torch.Generator, split: str = "train", depth: float | None = None
    ) -> tuple[bytes, int]:
        """One example's bytes and the length of its answer (the last bytes)."""
        pick = lambda n: int(torch.randint(0, n, (1,), generator=generator))  # noqa: E731
        key = f"{ADJECTIVES[pick(len(ADJECTIVES))]}-{NOUNS[pick(len(NOUNS))]}"
        if self.variant == "uuid":
            value = str(
                uuidlib.UUID(
                    int=int.from_bytes(torch.randint(0, 256, (16,), generator=generator).byte().numpy().tobytes()),
                    version=4,
                )
            )
        else:
            value = "".join(str(pick(10)) for _ in range(self.digits))
        needle, question, answer = self._parts(key, value)
        room = self.context_len - len(needle) - len(question) - len(answer)
        hay = self._haystack(room, generator, split)
        depth = self.depth if depth is None else depth
        if depth is None:
            depth = float(torch.rand((), generator=generator))
        cut = _sentence_boundary(hay, round(depth * room))
        text = hay[:cut] + needle + hay[cut:] + question + answer
        return text, len(answer)

    def _haystack(self, size: int, generator: torch.Generator, split: str) -> bytes:
        if self.variant == "passkey":
            reps = NOISE * (size // len(NOISE) + 2)
            start = int(torch.randint(0, len(NOISE), (1,), generator=generator))
            # start at a sentence of the block so the filler reads naturally
            start = _sentence_boundary(reps, start)
            return reps[start : start + size]
        text = _text(split)
        start = int(torch.randint(0, len(text) - size - 1, (1,), generator=generator))
        return text[start : start + size]

    def sample(self, batch: int, generator: torch.Generator, split: str = "train", depth: float | None = None) -> Batch:
        rows, answers = [], []
        for _ in range(batch):
            text, n = self.example(generator, split, depth)
            rows.append(torch.frombuffer(bytearray(text), dtype=torch.uint8).long())
            answers.append(n)
        seq = torch.stack(rows)
        answer = torch.zeros_like(seq, dtype=torch.bool)
        for i, n in enumerate(answers):
            answer[i, -n:] = True
        targets = seq if self.text_loss else seq.masked_fill(~answer, IGNORE)
        return Batch(seq[:, :-1], targets[:, 1:], answer[:, 1:])

    def score(self, logits: torch.Tensor, batch: Batch) -> dict[str, tuple[float, float]]:
        scored = batch.metric_mask()
        right = (logits.argmax(-1) == batch.targets) | ~scored
        exact = right.all(dim=1)
        return {
            "exact_match": (float(exact.sum()), float(exact.numel())),
            "accuracy": (float((right & scored).sum()), float(scored.sum())),
        }


@cache
def _text(split: str) -> bytes:
    return bytes(split_bytes("shakespeare", split).numpy())


def _sentence_boundary(text: bytes, pos: int) -> int:
    """The start of the sentence at or after `pos` (just after ". "), or the end of the text."""
    if pos <= 0:
        return 0
    found = text.find(b". ", pos - 1)
    return len(text) if found < 0 else found + 2
