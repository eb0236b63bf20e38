"""Short causal convolution: equals a padded depthwise conv1d; streams exactly. Every test runs
both ways: in the C++ kernel (where it is built; CPU float32 / float64 take it) and in torch."""

import pytest
import torch
import torch.nn.functional as F

from components.conv import ShortConvSpec
from tests.components.kernel_paths import kernel_or_torch


@pytest.fixture(autouse=True, params=["cpp", "torch"])
def path(request, monkeypatch):
    """Which implementation the test runs; for the kernel, also that it did run."""
    calls = kernel_or_torch(request.param, monkeypatch, ("conv_forward", "conv_backward"))
    yield calls
    if request.param == "cpp":
        assert "conv_forward" in calls, "the kernel was not taken"


@pytest.mark.parametrize("n", [11, 4, 2, 1])  # shorter than the kernel too
def test_equals_padded_depthwise_conv1d(float64, n, path):
    """Outputs and every gradient (input, filters, bias) against autograd of a padded conv1d."""
    conv = ShortConvSpec(kernel=4).build(6)
    x = torch.randn(2, n, 6, requires_grad=True)
    g = torch.randn(2, n, 6)
    y, _ = conv(x)
    ref = F.conv1d(F.pad(x.transpose(1, 2), (3, 0)), conv.weight, conv.bias, groups=6).transpose(1, 2)
    torch.testing.assert_close(y, ref, atol=1e-12, rtol=0)
    grads = torch.autograd.grad((y * g).sum(), (x, conv.weight, conv.bias))
    expected = torch.autograd.grad((ref * g).sum(), (x, conv.weight, conv.bias))
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    assert path in ([], ["conv_forward", "conv_backward"])  # the kernel's backward where it ran forward


def test_streams_in_pieces(float64):
    conv = ShortConvSpec(kernel=3).build(5)
    x = torch.randn(2, 13, 5)
    whole, _ = conv(x)
    state, outs = conv.init_state(2), []
    for a, b in [(0, 1), (1, 2), (2, 9), (9, 13)]:
        y, state = conv(x[:, a:b], state)
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), whole, atol=1e-12, rtol=0)


def test_gradients_equal_the_padded_depthwise_conv1d(float64, path):
    """The hand-written backward (every tap into one buffer) against autograd of conv1d: the
    input, the filters, the bias, and the streamed state."""
    conv = ShortConvSpec(kernel=4).build(6)
    x = torch.randn(2, 11, 6, requires_grad=True)
    past = torch.randn(2, 3, 6, requires_grad=True)
    g = torch.randn(2, 11, 6)
    y, _ = conv(x, past)
    grads = torch.autograd.grad((y * g).sum(), (x, past, conv.weight, conv.bias))
    full = torch.cat([past, x], 1).transpose(1, 2)
    ref = F.conv1d(full, conv.weight, conv.bias, groups=6).transpose(1, 2)
    expected = torch.autograd.grad((ref * g).sum(), (x, past, conv.weight, conv.bias))
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    assert path in ([], ["conv_forward", "conv_backward"])
    torch.autograd.gradcheck(lambda t: conv(t)[0], (x.detach().clone().requires_grad_(),))


def test_float32_at_a_layers_size_equals_torch(path):
    """float32 at the q/k/v projection's shape of a study model, against conv1d in float64."""
    conv = ShortConvSpec(kernel=4).build(192)
    x = torch.randn(3, 67, 192, requires_grad=True)
    g = torch.randn(3, 67, 192)
    y, _ = conv(x)
    grads = torch.autograd.grad((y * g).sum(), (x, conv.weight, conv.bias))
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, conv.weight, conv.bias))
    ref = F.conv1d(F.pad(x64.transpose(1, 2), (3, 0)), w64, b64, groups=192).transpose(1, 2)
    expected = torch.autograd.grad((ref * g.double()).sum(), (x64, w64, b64))
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-5)
