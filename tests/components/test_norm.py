"""The memory's SiLU + l2 norm (norm.silu_l2_normalize): the C++ kernel's and torch's equal
F.normalize(F.silu(x)) with their gradients, zero rows included."""

import pytest
import torch
import torch.nn.functional as F

from components.norm import silu_l2_normalize
from tests.components.kernel_paths import kernel_or_torch


@pytest.fixture(params=["cpp", "torch"])
def path(request, monkeypatch):
    return request.param, kernel_or_torch(request.param, monkeypatch, ("silu_l2", "silu_l2_backward"))


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_equals_normalize_of_silu_with_gradients(path, dtype, tol):
    x = (torch.randn(3, 5, 6, 16, dtype=torch.float64) * 4).to(dtype)
    x[0, 1, 2] = 0  # a row whose SiLU is zero: below the norm's eps
    x[1, 2, 3, :4] = -90  # far into SiLU's tail
    g = torch.randn(x.shape, dtype=dtype)
    a, b = x.clone().requires_grad_(), x.double().requires_grad_()
    y, ref = silu_l2_normalize(a), F.normalize(F.silu(b), dim=-1)
    (da,) = torch.autograd.grad((y * g).sum(), a)
    (db,) = torch.autograd.grad((ref * g.double()).sum(), b)
    torch.testing.assert_close(y.double(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(da.double(), db, atol=tol * 10, rtol=tol * 10)
    kind, calls = path
    assert calls == (["silu_l2", "silu_l2_backward"] if kind == "cpp" else [])


def test_gradcheck(path):
    x = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(silu_l2_normalize, (x,))


def test_gradients_that_arrive_non_contiguous(path):
    """The backward's incoming gradient strided (a transpose after the norm, as MAC's retrieval
    reads its queries): the kernel gets a contiguous copy that must live through the call."""
    x = torch.randn(6, 5, 4, 8, requires_grad=True)
    g = torch.randn(5, 6, 4, 8)
    (dx,) = torch.autograd.grad((silu_l2_normalize(x).transpose(0, 1) * g).sum(), x)
    x64 = x.detach().double().requires_grad_()
    (ref,) = torch.autograd.grad((F.normalize(F.silu(x64), dim=-1).transpose(0, 1) * g.double()).sum(), x64)
    torch.testing.assert_close(dx.double(), ref, atol=1e-5, rtol=1e-5)
