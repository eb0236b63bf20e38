"""The memory layer: spec -> module, causality, streaming, switches, stability at 16K tokens."""

import pytest
import torch

from components.neural_memory import NeuralMemorySpec


def layer(dim=16, heads=2, seed=0, **spec):
    torch.manual_seed(seed)
    return NeuralMemorySpec(**spec).build(dim, heads)


VARIANTS = {
    "default": {},
    "linear, no momentum, no conv": {"model": {"kind": "linear"}, "momentum": None, "conv": None, "chunk_size": 4},
    "chunk granularity": {"granularity": "chunk", "read": "chunk_start", "chunk_size": 4},
    "no gate, no decay, online": {"gate": None, "decay": None, "chunk_size": 1},
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_causal_bit_exact(name):
    mem = layer(**VARIANTS[name])
    x = torch.randn(2, 35, 16)
    base, _ = mem(x)
    for j in [0, 4, 17, 34]:
        x2 = x.clone()
        x2[:, j] += 1.0
        out, _ = mem(x2)
        assert torch.equal(out[:, :j], base[:, :j]), f"output before {j} changed"
        assert not torch.equal(out[:, j:], base[:, j:])


@pytest.mark.parametrize("name", list(VARIANTS))
def test_streaming_equals_one_pass(name, float64):
    mem = layer(**VARIANTS[name]).double()
    x = torch.randn(2, 35, 16)
    whole, _ = mem(x)
    state, outs, pos = mem.init_state(2), [], 0
    for size in [1, 2, 9, 1, 16, 6]:
        y, state = mem(x[:, pos : pos + size], state)
        outs.append(y)
        pos += size
    torch.testing.assert_close(torch.cat(outs, 1), whole, atol=1e-10, rtol=0)


def test_switched_off_mechanisms_have_no_parameters_and_change_the_output():
    full = layer()
    bare = layer(momentum=None, decay=None, conv=None, gate=None)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert bare.conv is None and bare.out_gate is None and bare.gates.sizes[1:] == [0, 0]
    assert count(bare) < count(full)
    assert bare.init_state(1).memory.momentum is None
    x = torch.randn(1, 20, 16)
    no_mom = layer(momentum=None)
    assert (no_mom(x)[0] - full(x)[0]).abs().max() > 1e-4  # same seed: only momentum differs


def test_per_layer_lr_shapes():
    mem = layer()
    lr, mom, dec = mem.gates(torch.randn(2, 5, 16))
    assert lr.shape == (2, 2, 5, 2) and mom.shape == dec.shape == (2, 2, 5)
    assert (lr > 0).all() and (lr < 0.1).all()
    shared = layer(lr={"per_layer": False})
    assert shared.gates(torch.randn(2, 5, 16))[0].shape == (2, 2, 5)


def test_default_layer_stays_finite_over_16k_tokens():
    """l2-normalised keys and a bounded lr keep the inner loop finite (DESIGN §4)."""
    mem = layer(dim=64, heads=4)
    with torch.no_grad():
        y, _ = mem(torch.randn(1, 16384, 64))
    assert torch.isfinite(y).all()
    # and the last tokens are not dominated by a blown-up memory
    assert y[:, -1024:].abs().max() < 100


def test_bf16_autocast_keeps_the_state_in_float32():
    mem = layer(dim=32, heads=2, chunk_size=8)
    x = torch.randn(2, 21, 32)
    ref, _ = mem(x, mem.init_state(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, state = mem(x, mem.init_state(2))
    assert all(w.dtype == torch.float32 for w in state.memory.weights + state.memory.momentum)
    err = (y.float() - ref).abs().max() / ref.abs().max()
    assert err < 0.05, f"bf16 autocast drifted {err:.3f} from float32"
