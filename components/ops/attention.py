"""Causal attention ops: full, sliding-window (blocked, O(n*w)), with an always-visible prefix.

Alignment is lower-right: with `n` queries and `m >= n` keys, query `i` sits at key position
`m - n + i` (the keys before the queries are a cache). Query at position t sees key j iff
`j <= t` and, with a window w, `t - w < j` (itself and the w - 1 tokens before it). Prefix keys
(persistent memory, Titans eq. 19) are seen by every query and carry no position.

Shapes: q (b, h, n, d); k, v (b, h, m, d); prefix_k, prefix_v (b, h, p, d) or None.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor


def _visible(n: int, m: int, window: int | None, device: torch.device) -> Tensor:
    """(n, m) bool: query i (at position m - n + i) may see key j."""
    t = torch.arange(m - n, m, device=device)[:, None]
    j = torch.arange(m, device=device)[None, :]
    ok = j <= t
    if window is not None:
        ok = ok & (j > t - window)
    return ok


def naive_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window: int | None = None,
    prefix_k: Tensor | None = None,
    prefix_v: Tensor | None = None,
) -> Tensor:
    """Reference: one dense (n, p + m) mask and an explicit softmax. O(n * m) time and memory."""
    n, m = q.shape[-2], k.shape[-2]
    mask = _visible(n, m, window, q.device)
    if prefix_k is not None:
        k, v = torch.cat([prefix_k, k], dim=-2), torch.cat([prefix_v, v], dim=-2)
        mask = torch.cat([mask.new_ones(n, prefix_k.shape[-2]), mask], dim=-1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window: int | None = None,
    prefix_k: Tensor | None = None,
    prefix_v: Tensor | None = None,
) -> Tensor:
    """Causal attention through SDPA; with a window, blocked so that cost is O(n * (2w + p)).
    On CUDA, windows and prefixes go through FlexAttention (a sparse block mask)."""
    n, m = q.shape[-2], k.shape[-2]
    if q.is_cuda and (window is not None or prefix_k is not None):
        return flex_attention_causal(q, k, v, window=window, prefix_k=prefix_k, prefix_v=prefix_v)
    if window is not None and m > 2 * window:
        return _windowed(q, k, v, window, prefix_k, prefix_v)
    if prefix_k is None and window is None and n == m:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    mask = _visible(n, m, window, q.device)
    if prefix_k is not None:
        k, v = torch.cat([prefix_k, k], dim=-2), torch.cat([prefix_v, v], dim=-2)
        mask = torch.cat([mask.new_ones(n, prefix_k.shape[-2]), mask], dim=-1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _windowed(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    w: int,
    prefix_k: Tensor | None,
    prefix_v: Tensor | None,
) -> Tensor:
    """Query block i (w queries) attends to the 2w keys ending with its own block, plus the prefix.

    Keys are left-padded by w so that block i's keys are one strided window of the padded keys.
    """
    n, m = q.shape[-2], k.shape[-2]
    off = m - n  # position of the first query
    nb = -(-n // w)
    # padded key index of original key j is j + w; block i covers original [off + (i-1)w, off + (i+1)w)
    pad = (0, 0, w, nb * w - n)
    kp, vp = F.pad(k, pad), F.pad(v, pad)
    # block i's 2w keys: padded blocks i and i + 1 side by side (a cat, whose backward is two
    # slices, where `unfold`'s scatters: the op 1.10-1.17x faster forward+backward, docs/benchmarks.md)
    kb, vb = (rearrange(t[..., off : off + (nb + 1) * w, :], "b h (k c) d -> b h k c d", c=w) for t in (kp, vp))
    kb, vb = (torch.cat([t[:, :, :-1], t[:, :, 1:]], dim=-2) for t in (kb, vb))  # (b, h, k, 2w, d)
    qb = rearrange(F.pad(q, (0, 0, 0, nb * w - n)), "b h (k c) d -> b h k c d", c=w)
    # mask: local query r, local key s: allowed iff r < s <= r + w and the key is a real one
    r = torch.arange(w, device=q.device)[:, None]
    s = torch.arange(2 * w, device=q.device)[None, :]
    first = off + (torch.arange(nb, device=q.device) - 1) * w  # original index of local key 0
    real = ((first[:, None] + s) >= 0) & ((first[:, None] + s) < m)  # (k, 2w)
    mask = ((s > r) & (s <= r + w))[None] & real[:, None, :]  # (k, c, 2w)
    if prefix_k is not None:
        p = prefix_k.shape[-2]
        pk = prefix_k[:, :, None].expand(-1, -1, nb, -1, -1)
        pv = prefix_v[:, :, None].expand(-1, -1, nb, -1, -1)
        kb, vb = torch.cat([pk, kb], dim=-2), torch.cat([pv, vb], dim=-2)
        mask = torch.cat([mask.new_ones(nb, w, p), mask], dim=-1)
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask)
    return rearrange(out, "b h k c d -> b h (k c) d")[..., :n, :]


_flex = None


def flex_attention_causal(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window: int | None = None,
    prefix_k: Tensor | None = None,
    prefix_v: Tensor | None = None,
    compiled: bool | None = None,
) -> Tensor:
    """The same mask as `attention` through FlexAttention: `prefix | (causal & in window)` as a
    block mask, so the kernel skips blocks no query sees. The GPU fast path; its forward also
    runs on CPU (eager, unfused), its backward does not (torch 2.13)."""
    global _flex
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    n, m = q.shape[-2], k.shape[-2]
    p = prefix_k.shape[-2] if prefix_k is not None else 0
    if p:
        k, v = torch.cat([prefix_k, k], dim=-2), torch.cat([prefix_v, v], dim=-2)
    offset = m - n

    def mask_mod(b, h, q_idx, kv_idx):
        t, j = q_idx + offset, kv_idx - p
        seen = j <= t
        if window is not None:
            seen = seen & (j > t - window)
        return (kv_idx < p) | seen

    block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=n, KV_LEN=p + m, device=q.device)
    if compiled is None:
        compiled = q.is_cuda
    if compiled and _flex is None:
        _flex = torch.compile(flex_attention, dynamic=False)
    return (_flex if compiled else flex_attention)(q, k, v, block_mask=block_mask)
