"""The blocks' SwiGLU MLP: the C++ kernel's product and torch's equal W_down (silu(W_gate x) * W_up x)
with the gradients of the input and both weights."""

import pytest
import torch
import torch.nn.functional as F

from components.mlp import SwiGLU
from tests.components.kernel_paths import kernel_or_torch


@pytest.fixture(params=["cpp", "torch"])
def path(request, monkeypatch):
    return request.param, kernel_or_torch(request.param, monkeypatch, ("swiglu", "swiglu_backward"))


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("hidden", [37, 88])
def test_swiglu_equals_its_definition_with_gradients(path, dtype, tol, hidden):
    """Hidden widths that end in a vector tail (37) and on a half vector (88 = 5 x 16 + 8), gates
    deep in SiLU's tails, against the formula in float64 (gate and up are the first and second
    halves of the fused projection)."""
    torch.manual_seed(0)
    mlp = SwiGLU(16, hidden).to(dtype)
    x = torch.randn(3, 5, 16, dtype=torch.float64) * 3
    x[0, 0] = 40  # every gate far into one of SiLU's tails
    w_gu, w_down = (p.detach().double().requires_grad_() for p in (mlp.gate_up.weight, mlp.down.weight))
    a, b = x.to(dtype).requires_grad_(), x.clone().requires_grad_()
    y = mlp(a)
    gate, up = F.linear(b, w_gu).chunk(2, dim=-1)
    ref = F.linear(F.silu(gate) * up, w_down)
    g = torch.randn(y.shape, dtype=torch.float64)
    got = torch.autograd.grad((y * g.to(dtype)).sum(), (a, mlp.gate_up.weight, mlp.down.weight))
    want = torch.autograd.grad((ref * g).sum(), (b, w_gu, w_down))
    torch.testing.assert_close(y.double(), ref, atol=tol * 10, rtol=tol)
    for have, expect in zip(got, want):
        torch.testing.assert_close(have.double(), expect, atol=tol * 100, rtol=tol * 10)
    kind, calls = path
    assert calls == (["swiglu", "swiglu_backward"] if kind == "cpp" else [])
