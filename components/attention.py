"""Multi-head causal attention with rotary positions (RoPE), optional sliding window and an
optional always-visible prefix (persistent memory, Titans eq. 19), streaming through a KV cache.

Letters: b batch, n queries, m keys, h heads, d head feature, p prefix tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from pydantic import Field
from torch import Tensor, nn

from components.base import Spec, SpecRuleError
from components.ops.attention import attention
from components.ops.memory import cpu_loop
from components.persistent import PersistentTokens


class RopeSpec(Spec):
    """Rotary position embedding (Su et al. 2021) on queries and keys."""

    base: float = Field(10000.0, gt=1.0)
    """Frequency base: pair i of a head rotates by position * base^(-2i/head_dim)."""

    def build(self, head_dim: int) -> Rotary:
        return Rotary(head_dim, self.base)


class Rotary(nn.Module):
    def __init__(self, head_dim: int, base: float) -> None:
        super().__init__()
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        """x (b, n, g, d): g feature rows per token (the queries and keys of every head) at
        positions pos (n,) -> rotated x. Rotating q and k in one pass, before heads move in
        front of the sequence, keeps the product on contiguous rows (MAC calls this per segment)."""
        # angles in float64: at position 1e6 a float32 angle would be off by ~0.06 rad
        ang = torch.outer(pos.to(torch.float64), self.inv_freq.to(x.device))  # (n, d/2)
        cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
        if cpu_loop.unavailable(x) is None:  # on CPU one pass each way in the C++ kernel
            return _Rotate.apply(x, cos, sin)
        cos, sin = cos[:, None], sin[:, None]  # (n, 1, d/2): the same turn for each of the g rows
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class _Rotate(torch.autograd.Function):
    """Rotary's turn by the kernel; back, the turn's transpose: the same turn with -sin."""

    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        ctx.save_for_backward(cos, sin)
        return cpu_loop.rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        return cpu_loop.rotate(dy, cos, -sin), None, None


def positions(start: int | Tensor, n: int, device: torch.device) -> Tensor:
    """Positions of n tokens: start .. start + n - 1, or start itself when it is a tensor (n,)."""
    return start if isinstance(start, Tensor) else torch.arange(start, start + n, device=device)


class AttentionSpec(Spec):
    """Multi-head causal attention (scaled dot product, no biases)."""

    heads: int | None = Field(None, ge=1, le=4096)
    """Number of heads; null = the model's `heads`."""
    rope: RopeSpec | None = RopeSpec()
    """Rotary positions; null = no positional signal in attention (NoPE)."""

    def check(self, dim: int, heads: int) -> None:
        """Cross-field rules that need the model's dim and heads."""
        if self.heads is not None and dim % self.heads:
            raise SpecRuleError("heads", f"{self.heads} heads do not divide the model dim {dim}")
        head_dim = dim // (self.heads or heads)
        if self.rope is not None and head_dim % 2:
            raise SpecRuleError("rope", f"rotary positions need an even head dim, got {head_dim}")

    def build(self, dim: int, heads: int, window: int | None = None) -> Attention:
        heads = self.heads or heads
        rope = self.rope.build(dim // heads) if self.rope is not None else None
        return Attention(dim, heads, rope=rope, window=window)


@dataclass
class KVCache:
    """Keys (rotated) and values of the tokens a future query may still see; `pos` = tokens seen."""

    k: Tensor
    v: Tensor
    pos: int


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, *, rope: Rotary | None, window: int | None) -> None:
        super().__init__()
        self.heads, self.window, self.rope = heads, window, rope
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def init_state(self, batch: int) -> KVCache:
        w = self.qkv.weight
        empty = w.new_zeros(batch, self.heads, 0, w.shape[1] // self.heads)
        return KVCache(empty, empty, 0)

    def project(self, x: Tensor, start: int | Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (b, n, dim) at positions start.. (or at the positions (n,) given) -> q, k, v
        (b, h, n, d), q and k rotated."""
        qkv = self.qkv(x).unflatten(-1, (3 * self.heads, -1))  # b n (t h) d
        qk, v = qkv[:, :, : 2 * self.heads], qkv[:, :, 2 * self.heads :]
        if self.rope is not None:
            qk = self.rope(qk, positions(start, x.shape[1], x.device))
        q, k = rearrange(qk, "b n (t h) d -> t b h n d", t=2)
        return q, k, rearrange(v, "b n h d -> b h n d")

    def project_kv(self, x: Tensor, start: int | Tensor | None) -> tuple[Tensor, Tensor]:
        """Keys and values alone (b, h, n, d), the query rows of the projection not computed;
        keys rotated unless start is None (a prefix: persistent tokens have no position,
        docs/decisions/0004)."""
        dim = self.qkv.in_features
        kv = F.linear(x, self.qkv.weight[dim:]).unflatten(-1, (2 * self.heads, -1))  # b n (t h) d
        k, v = kv[:, :, : self.heads], kv[:, :, self.heads :]
        if self.rope is not None and start is not None:
            k = self.rope(k, positions(start, x.shape[1], x.device))
        return rearrange(k, "b n h d -> b h n d"), rearrange(v, "b n h d -> b h n d")

    def project_prefix(self, prefix: Tensor) -> tuple[Tensor, Tensor]:
        """Prefix tokens (b, p, dim) -> keys, values (b, h, p, d), not rotated."""
        return self.project_kv(prefix, None)

    def merge(self, o: Tensor) -> Tensor:
        """(b, h, n, d) -> output projection (b, n, dim)."""
        return self.out(rearrange(o, "b h n d -> b n (h d)"))

    def forward(
        self, x: Tensor, state: KVCache | None = None, prefix: Tensor | None = None
    ) -> tuple[Tensor, KVCache | None]:
        """x (b, n, dim), prefix (b, p, dim) seen by every query -> (b, n, dim), next cache."""
        q, k, v = self.project(x, state.pos if state is not None else 0)
        if state is not None:
            k, v = torch.cat([state.k, k], dim=-2), torch.cat([state.v, v], dim=-2)
        pk = pv = None
        if prefix is not None:
            pk, pv = self.project_prefix(prefix)
        y = self.merge(attention(q, k, v, window=self.window, prefix_k=pk, prefix_v=pv))
        if state is None:
            return y, None
        if self.window is not None:  # a future query sees at most window - 1 past tokens
            keep = min(self.window - 1, k.shape[-2])
            k, v = k[..., k.shape[-2] - keep :, :], v[..., v.shape[-2] - keep :, :]
        return y, KVCache(k, v, state.pos + x.shape[1])


class AttentionMixer(nn.Module):
    """Attention as the whole sequence mixer (kinds `attention` and `swa`), with optional
    persistent tokens as a prefix every query sees."""

    def __init__(self, attention: Attention, persistent: PersistentTokens | None) -> None:
        super().__init__()
        self.attention, self.persistent = attention, persistent

    def init_state(self, batch: int) -> KVCache:
        return self.attention.init_state(batch)

    def forward(self, x: Tensor, state: KVCache | None = None) -> tuple[Tensor, KVCache | None]:
        prefix = self.persistent(x.shape[0]) if self.persistent is not None else None
        return self.attention(x, state, prefix)
