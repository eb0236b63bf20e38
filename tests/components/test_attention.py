"""Attention op: SDPA / blocked sliding window == dense naive reference (float64)."""

import pytest
import torch

from components.attention import AttentionSpec, RopeSpec
from components.ops.attention import attention, naive_attention
from tests.components.kernel_paths import kernel_or_torch


def qkv(n, m, p=0, b=2, h=3, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)  # noqa: E731
    q, k, v = mk(b, h, n, d), mk(b, h, m, d), mk(b, h, m, d)
    pk, pv = (mk(b, h, p, d), mk(b, h, p, d)) if p else (None, None)
    return q, k, v, pk, pv


CASES = [  # (n queries, m keys, window, prefix)
    (37, 37, None, 0),
    (37, 37, None, 4),
    (37, 37, 5, 0),
    (37, 37, 5, 3),
    (64, 64, 16, 2),
    (10, 10, 32, 0),
    (10, 10, 32, 2),  # window larger than the sequence
    (7, 30, 8, 0),
    (7, 30, 8, 2),
    (1, 12, 4, 1),
    (1, 12, None, 0),  # queries after a cache
    (50, 50, 1, 0),
]


@pytest.mark.parametrize("n,m,window,p", CASES)
def test_fast_equals_naive_outputs_and_gradients(n, m, window, p):
    q, k, v, pk, pv = qkv(n, m, p)
    fast = attention(q, k, v, window=window, prefix_k=pk, prefix_v=pv)
    ref = naive_attention(q, k, v, window=window, prefix_k=pk, prefix_v=pv)
    torch.testing.assert_close(fast, ref, atol=1e-12, rtol=0)
    g = torch.randn_like(ref)
    leaves = [t for t in (q, k, v, pk, pv) if t is not None]
    grads_fast = torch.autograd.grad(fast, leaves, g)
    grads_ref = torch.autograd.grad(ref, leaves, g)
    for a, b in zip(grads_fast, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_window_limits_what_a_query_sees():
    q, k, v, _, _ = qkv(20, 20)
    out = attention(q, k, v, window=4)
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[:, :, 10], v2[:, :, 10] = 5.0, 5.0  # only queries 10..13 see key 10
    out2 = attention(q, k2, v2, window=4)
    changed = (out2 - out).abs().amax(dim=(0, 1, 3)) > 0
    assert changed.nonzero().flatten().tolist() == [10, 11, 12, 13]


@pytest.mark.parametrize("window", [None, 6])
def test_module_streaming_with_cache_equals_one_pass(window, float64):
    attn = AttentionSpec().build(dim=16, heads=2, window=window)
    x = torch.randn(2, 29, 16)
    prefix = torch.randn(2, 3, 16)
    whole, _ = attn(x, None, prefix)
    state, outs, start = attn.init_state(2), [], 0
    for size in [1, 4, 9, 1, 14]:
        out, state = attn(x[:, start : start + size], state, prefix)
        outs.append(out)
        start += size
    torch.testing.assert_close(torch.cat(outs, 1), whole, atol=1e-12, rtol=0)
    if window is not None:
        assert state.k.shape[-2] == window - 1


@pytest.mark.parametrize("n,m,window,p", [(37, 37, 5, 3), (7, 30, 8, 2), (20, 20, None, 4), (130, 130, 16, 0)])
def test_flex_attention_path_forward_equals_naive(n, m, window, p):
    """The CUDA fast path's mask, checked through FlexAttention's eager forward on CPU (its
    backward is CUDA-only in torch 2.13)."""
    from components.ops.attention import flex_attention_causal

    q, k, v, pk, pv = qkv(n, m, p)
    with torch.no_grad():
        fast = flex_attention_causal(
            q.float(),
            k.float(),
            v.float(),
            window=window,
            prefix_k=None if pk is None else pk.float(),
            prefix_v=None if pv is None else pv.float(),
            compiled=False,
        )
        ref = naive_attention(q, k, v, window=window, prefix_k=pk, prefix_v=pv)
    torch.testing.assert_close(fast.double(), ref, atol=1e-5, rtol=1e-5)


def test_rotary_scores_depend_on_the_offset_and_only_on_it(float64):
    """RoPE: the score of a query at position i and a key at j is a function of i - j. The same
    token pair shifted by 5 positions scores the same; moved 3 positions apart it scores
    differently (positions switched off, or the same for every token, would fail the second).
    Explicit position tensors (MAC's segment-local positions) rotate like a start offset."""
    attn = AttentionSpec().build(dim=16, heads=2)
    x = torch.randn(1, 2, 16).repeat(1, 3, 1)  # tokens a b a b a b: positions 0-5
    score = lambda q, k, i, j: (q[..., i, :] * k[..., j, :]).sum(-1)  # noqa: E731
    q, k, _ = attn.project(x, 0)
    q5, k5, _ = attn.project(x, 5)
    torch.testing.assert_close(score(q, k, 2, 1), score(q5, k5, 2, 1), atol=1e-12, rtol=0)  # (7, 6) as (2, 1)
    torch.testing.assert_close(score(q, k, 2, 1), score(q, k, 4, 3), atol=1e-12, rtol=0)  # a->b at offset 1
    assert (score(q, k, 2, 1) - score(q, k, 2, 3)).abs().min() > 1e-3  # a->b at offset 1 against -1
    qt, kt, _ = attn.project(x, torch.arange(5, 11))
    torch.testing.assert_close((qt, kt), (q5, k5), atol=0, rtol=0)
    kv = attn.project_kv(x, 5)
    torch.testing.assert_close(kv, attn.project(x, 5)[1:], atol=1e-12, rtol=0)


@pytest.fixture(params=["cpp", "torch"])
def rope_path(request, monkeypatch):
    return request.param, kernel_or_torch(request.param, monkeypatch, ("rotate",))


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_rotary_turns_each_pair_by_its_angle_with_gradients(rope_path, dtype, tol):
    """RoPE's definition: the pair (x_i, x_{i + d/2}) of a token at position p, as the complex
    number x_i + i x_{i + d/2}, times e^{i p base^(-2i/d)}; its gradient is the turn back.
    Queries and keys are the leading rows of a qkv projection (the kernel reads them in place),
    the rows after them get no gradient; explicit positions, out of order and far out (1e6)."""
    d, base = 12, 500.0
    rotary = RopeSpec(base=base).build(d)
    qkv = torch.randn(2, 5, 7, d, dtype=torch.float64).to(dtype).requires_grad_()
    pos = torch.tensor([0, 3, 1, 10**6, 17])
    y = rotary(qkv[:, :, :4], pos)
    g = torch.randn(y.shape, dtype=torch.float64)
    (dx,) = torch.autograd.grad((y * g.to(dtype)).sum(), qkv)
    ang = pos.double()[:, None] * base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # (n, d/2)

    def turn(t: torch.Tensor, sign: int) -> torch.Tensor:
        z = torch.complex(t[..., : d // 2], t[..., d // 2 :]) * torch.polar(torch.ones_like(ang), sign * ang)[:, None]
        return torch.cat([z.real, z.imag], -1)

    torch.testing.assert_close(y.double(), turn(qkv[:, :, :4].detach().double(), 1), atol=tol, rtol=tol)
    torch.testing.assert_close(dx[:, :, :4].double(), turn(g, -1), atol=tol, rtol=tol)
    assert not dx[:, :, 4:].any()
    kind, calls = rope_path
    assert calls == (["rotate", "rotate"] if kind == "cpp" else [])
