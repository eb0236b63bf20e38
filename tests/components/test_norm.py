"""The memory's SiLU + l2 norm (norm.silu_l2_normalize): the C++ kernel's and torch's equal
F.normalize(F.silu(x)) with their gradients, zero rows included. The blocks' RMSNorm
(norm.RMSNorm): the kernel's equals torch's, the gain's gradient included."""

import pytest
import torch
import torch.nn.functional as F

from components.norm import RMSNorm, silu_l2_normalize
from tests.components.kernel_paths import kernel_or_torch, needs_cpp


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


@pytest.fixture(params=["cpp", "torch"])
def rms_path(request, monkeypatch):
    return request.param, kernel_or_torch(request.param, monkeypatch, ("rms_norm", "rms_norm_backward"))


def reference_rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("shape", [(3, 5, 37), (2, 33, 64), (4, 16)])
def test_rmsnorm_equals_its_definition_with_gradients(rms_path, dtype, tol, shape):
    """Odd widths and row counts (the kernel's vector tails; rows split over threads), rows of
    very different scale, a zero row (all eps), gain and input gradients against the formula in
    float64."""
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64) * torch.logspace(-3, 2, shape[-2], dtype=torch.float64)[:, None]
    x[..., 0, :] = 0
    norm = RMSNorm(shape[-1], eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1]))
    g = torch.randn(shape, dtype=torch.float64)
    a, b, w = x.to(dtype).requires_grad_(), x.clone().requires_grad_(), norm.weight.detach().double().requires_grad_()
    y, ref = norm(a), reference_rms(b, w, 1e-6)
    da, dw = torch.autograd.grad((y * g.to(dtype)).sum(), (a, norm.weight))
    db, dwr = torch.autograd.grad((ref * g).sum(), (b, w))
    torch.testing.assert_close(y.double(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(da.double(), db, atol=tol * 10, rtol=tol * 10)
    torch.testing.assert_close(dw.double(), dwr, atol=tol * 100, rtol=tol * 10)
    kind, calls = rms_path
    assert calls == (["rms_norm", "rms_norm_backward"] if kind == "cpp" else [])


def test_rmsnorm_gradcheck_and_strided_inputs(rms_path):
    """torch's gradcheck (float64), and an input and incoming gradient that are transposes."""
    norm = RMSNorm(7).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
    x = torch.randn(5, 4, 7, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(norm, (x,))
    xt = x.detach().transpose(0, 1).requires_grad_()
    g = torch.randn(5, 4, 7, dtype=torch.float64)
    dx, dw = torch.autograd.grad((norm(xt).transpose(0, 1) * g).sum(), (xt, norm.weight))
    xr = xt.detach().requires_grad_()
    w = norm.weight.detach().requires_grad_()
    ref_dx, ref_dw = torch.autograd.grad((reference_rms(xr, w, norm.eps).transpose(0, 1) * g).sum(), (xr, w))
    torch.testing.assert_close(dx, ref_dx, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(dw, ref_dw, atol=1e-12, rtol=1e-12)


@needs_cpp
@pytest.mark.parametrize("threads", [1, 2])
def test_rmsnorm_gain_gradient_sums_every_row_on_every_thread(threads):
    """The gain's gradient sums rows that several threads computed (per-thread partial sums):
    with 2 threads, each half of the rows must reach it."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        norm = RMSNorm(24).double()
        x = torch.randn(101, 24, dtype=torch.float64, requires_grad=True)
        (dw,) = torch.autograd.grad(norm(x).sum(), norm.weight)
        w = norm.weight.detach().requires_grad_()
        (ref,) = torch.autograd.grad(reference_rms(x, w, norm.eps).sum(), w)
        torch.testing.assert_close(dw, ref, atol=1e-12, rtol=1e-12)
    finally:
        torch.set_num_threads(before)


@needs_cpp
def test_every_block_kind_norms_through_the_kernel():
    """A model of each kind on CPU in float32: every RMSNorm in it is `norm.RMSNorm`, and its
    output comes from the kernel's autograd function."""
    from titans_nas.builder import build_model
    from titans_nas.config import union_members, validate
    from titans_nas.spec import BlockSpec, ModelSpec

    for kind in union_members(BlockSpec):
        spec = validate({"vocab_size": 32, "dim": 16, "depth": 1, "heads": 2, "block": {"kind": kind}}, ModelSpec)
        model = build_model(spec)
        norms = [m for m in model.modules() if isinstance(m, torch.nn.RMSNorm)]
        assert norms and all(type(m) is RMSNorm for m in norms), kind
        out = norms[0](torch.randn(2, 3, norms[0].weight.shape[0]))
        assert type(out.grad_fn).__name__ == "_RMSNormBackward", kind
