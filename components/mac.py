"""Block kind `mac`, Memory as a Context (Titans eqs. 21-25), per segment S of C tokens:

    h = f_{W_prev}(q(S))                     read the memory as it was before the segment (eq. 21)
    y = Attn([p ; RMSNorm(h) ; S])           segment token j sees all of p, h_i and S_i for i <= j
                                             (h_i came from token i: this keeps causality; eqs. 22-23)
    m = LMM(RMSNorm(S + y))                  update the memory with the attention layer's output (its
                                             residual included), read after each token (eq. 24)
    o = y * sigmoid(RMSNorm(m))              gated output (eq. 25)

The two RMSNorms put what crosses between memory and attention on the scale of the segment
tokens (unit RMS): without them the memory tokens enter attention at RMS ~0.17 and the memory
stores the attention output at RMS ~0.06. The attention layer's output includes its residual,
as every layer of the paper's blocks (T1 §4.4): the memory stores each token with its context,
not a context average that at initialisation barely holds the token (docs/decisions/0006).

No attention crosses segments: the memory carries everything older. Positions (RoPE) are
segment-local; h_i and S_i share position i. Letters: b batch, n queries, m keys, h heads,
d head feature, p persistent tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from components.attention import Attention, KVCache
from components.base import SpecRuleError
from components.hybrid import HybridSpec
from components.neural_memory import NeuralMemory, NeuralMemoryState
from components.norm import RMSNorm
from components.ops.memory import Weights
from components.persistent import PersistentTokens


class MACSpec(HybridSpec):
    """Titans (MAC): attention inside segments over [persistent ; retrieved memory ; segment],
    the memory updated from the attention output."""

    kind: Literal["mac"] = "mac"
    segment_len: int = Field(512, ge=1, le=2**24)
    """Tokens per attention segment (the paper uses 512); a multiple of memory.chunk_size."""

    def describe(self) -> str:
        """The mixer in words (the model card's first line)."""
        return (
            f"memory as context (MAC): segments of {self.segment_len} tokens attend to"
            " persistent tokens, memory read-outs and the segment"
        )

    def check(self, dim: int, heads: int) -> None:
        super().check(dim, heads)
        if self.segment_len % self.memory.chunk_size:
            raise SpecRuleError(
                "segment_len",
                f"{self.segment_len} is not a multiple of memory.chunk_size {self.memory.chunk_size} "
                "(segment ends must be chunk ends, so each segment reads a finished memory state)",
            )

    def build(self, dim: int, heads: int) -> MemoryAsContext:
        return MemoryAsContext(
            self.attention.build(dim, heads),
            self.memory.build(dim, heads),
            self.persistent.build(dim) if self.persistent is not None else None,
            self.segment_len,
        )


@lru_cache(maxsize=256)
def mac_visibility(start: int, count: int, persistent: int, device: torch.device | None = None) -> Tensor:
    """(count, persistent + 2 (start + count)) bool: which of [p ; h_0..h_m ; S_0..S_m] the segment
    tokens start .. start + count - 1 see (m = start + count - 1): every persistent token, and the
    memory tokens and segment tokens at positions i <= j. Cached: every segment of a sequence
    has the same one (six small ops a segment and layer otherwise); never written to."""
    j = torch.arange(start, start + count, device=device)[:, None]
    i = torch.arange(start + count, device=device)[None, :]
    causal = i <= j
    return torch.cat([causal.new_ones(count, persistent), causal, causal], dim=1)


class Segment(NamedTuple):
    """What a piece of a segment brings that does not depend on the memory, all (b, h, r, d):
    its tokens' rotated queries and keys and their values, and the retrieval queries q(S)."""

    q: Tensor
    k: Tensor
    v: Tensor
    retrieval_q: Tensor


@dataclass
class MACState:
    memory: NeuralMemoryState
    """The memory updated by the attention outputs so far."""
    retrieval: Weights
    """The memory weights at the start of the current segment (what eq. 21 reads)."""
    retrieval_conv: Tensor | None
    """The query convolution's stream over the segment inputs."""
    retrieved: KVCache
    """Keys and values of the current segment's memory tokens h_0 .. h_{f-1}."""
    segment: KVCache
    """Keys and values of the current segment's tokens S_0 .. S_{f-1}; its `pos` is f, the
    tokens of the segment seen so far."""


class MemoryAsContext(nn.Module):
    def __init__(
        self, attention: Attention, memory: NeuralMemory, persistent: PersistentTokens | None, segment_len: int
    ) -> None:
        super().__init__()
        self.attention, self.memory, self.persistent, self.segment_len = attention, memory, persistent, segment_len
        dim = memory.dim
        self.norm_retrieved, self.norm_attended = RMSNorm(dim, eps=1e-6), RMSNorm(dim, eps=1e-6)
        self.norm = RMSNorm(dim, eps=1e-6)

    def init_state(self, batch: int) -> MACState:
        mem = self.memory.init_state(batch)
        empty = self.attention.init_state(batch)
        return MACState(mem, mem.memory.weights, self.memory.init_retrieval_state(batch), empty, empty)

    def forward(self, x: Tensor, state: MACState | None = None) -> tuple[Tensor, MACState | None]:
        """x (b, n, dim) -> (b, n, dim). One pass and streaming share this code: the sequence is
        cut at segment ends and each piece continues the current segment. What does not depend
        on the memory is computed for all of x before the segment loop: the segment tokens'
        q, k, v (positions are segment-local), the retrieval queries q(S) of eq. 21, the
        persistent tokens' keys and values, and the output gate of eq. 25 after it."""
        st = state if state is not None else self.init_state(x.shape[0])
        n = x.shape[1]
        pos = (st.segment.pos + torch.arange(n, device=x.device)) % self.segment_len
        q, k, v = self.attention.project(x, pos)
        rq, conv = self.memory.retrieval_queries(x, st.retrieval_conv)
        prefix = self.attention.project_prefix(self.persistent(x.shape[0])) if self.persistent is not None else None
        # the pieces: the rest of the open segment, whole segments, the start of the next. Cut
        # by one split per tensor, whose backward is one cat: a slice per piece cost a
        # full-size zero gradient, a copy and an add each: MAC steps ran 1.02-1.04x faster at study
        # sizes and at the quickstart's, alternated (docs/benchmarks.md)
        first = min(n, self.segment_len - st.segment.pos)
        whole, rest = divmod(n - first, self.segment_len)
        takes = [t for t in (first, *[self.segment_len] * whole, rest) if t]
        ys, ms = [], []
        pieces = zip(x.split(takes, 1), *(t.split(takes, 2) for t in (q, k, v, rq)))
        for s, *seg in pieces:
            y, m, st = self._piece(s, Segment(*seg), prefix, st)
            ys.append(y)
            ms.append(m)
        if not ys:
            return x, state
        out = torch.cat(ys, 1) * torch.sigmoid(self.norm(torch.cat(ms, 1)))  # eq. 25
        return out, (replace(st, retrieval_conv=conv) if state is not None else None)

    def _piece(
        self, s: Tensor, seg: Segment, prefix: tuple[Tensor, Tensor] | None, st: MACState
    ) -> tuple[Tensor, Tensor, MACState]:
        """Tokens f .. f + r - 1 of the current segment -> attention output y, memory output m."""
        f, r = st.segment.pos, s.shape[1]
        h = self.norm_retrieved(self.memory.read(seg.retrieval_q, st.retrieval, s))  # eq. 21
        k_h, v_h = self.attention.project_kv(h, f)  # h_i sits at position i, like S_i
        retrieved = KVCache(_append(st.retrieved.k, k_h), _append(st.retrieved.v, v_h), f + r)
        segment = KVCache(_append(st.segment.k, seg.k), _append(st.segment.v, seg.v), f + r)
        pk, pv = ([prefix[0]], [prefix[1]]) if prefix is not None else ([], [])
        p = pk[0].shape[2] if pk else 0
        keys = torch.cat([*pk, retrieved.k, segment.k], 2)  # [p ; h ; S] in one copy
        values = torch.cat([*pv, retrieved.v, segment.v], 2)
        mask = mac_visibility(f, r, p, s.device)
        y = self.attention.merge(F.scaled_dot_product_attention(seg.q, keys, values, attn_mask=mask))  # eq. 23
        m, mem = self.memory(self.norm_attended(s + y), st.memory)  # eq. 24: update, read after each token
        if f + r == self.segment_len:  # the segment is done: the next one reads the updated memory
            empty = KVCache(keys[:, :, :0], keys[:, :, :0], 0)
            return y, m, replace(st, memory=mem, retrieval=mem.memory.weights, retrieved=empty, segment=empty)
        return y, m, replace(st, memory=mem, retrieved=retrieved, segment=segment)


def _append(cache: Tensor, new: Tensor) -> Tensor:
    """A segment's keys or values so far, then the new ones (b, h, f + r, d); a fresh segment's
    are the new ones themselves, no copy."""
    return new if cache.shape[2] == 0 else torch.cat([cache, new], 2)
