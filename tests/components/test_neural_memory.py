"""The memory layer: spec -> module, causality, streaming, switches, stability at 16K tokens."""

import pytest
import torch

from components.neural_memory import NeuralMemorySpec
from components.ops.memory import cpu_loop
from tests.components.kernel_paths import record_calls
from tests.components.test_memory_op import needs_cpp


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
    assert bare.conv is None and bare.out_gate is None and not bare.gates.momentum and not bare.gates.decay
    assert count(bare) < count(full)
    assert bare.init_state(1).memory.momentum is None
    x = torch.randn(1, 20, 16)
    no_mom = layer(momentum=None)
    assert (no_mom(x)[0] - full(x)[0]).abs().max() > 1e-4  # same seed: only momentum differs


def _optional_mechanisms() -> dict[str, type]:
    """Every `XSpec | None` field of the memory: a mechanism that can be switched off."""
    from titans_nas.config import models_in

    return {
        name: models_in(field.annotation)[0]
        for name, field in NeuralMemorySpec.model_fields.items()
        if type(None) in getattr(field.annotation, "__args__", ()) and models_in(field.annotation)
    }


@pytest.mark.parametrize("name", list(_optional_mechanisms()))
def test_every_optional_mechanism_switched_off_is_truly_off(name, float64):
    """Off (null) = no parameters of its own and another output; on or off, the layer stays
    causal and streams exactly. Read off the spec, so a new optional mechanism is covered."""
    cls = _optional_mechanisms()[name]
    on, off = layer(**{name: cls()}).double(), layer(**{name: None}).double()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(off) <= count(on)
    x = torch.randn(2, 21, 16)
    assert (on(x)[0] - off(x)[0]).abs().max() > 1e-6, f"switching {name} off changed nothing"
    for mem in (on, off):
        whole, _ = mem(x)
        x2 = x.clone()
        x2[:, 9] += 1.0
        assert torch.equal(mem(x2)[0][:, :9], whole[:, :9])
        state, outs = mem.init_state(2), []
        for piece in x.split([5, 1, 15], dim=1):
            y, state = mem(piece, state)
            outs.append(y)
        torch.testing.assert_close(torch.cat(outs, 1), whole, atol=1e-10, rtol=0)


def test_per_layer_lr_shapes():
    mem = layer()
    lr, mom, dec, _ = mem.gates(torch.randn(2, 5, 16))
    assert lr.shape == (2, 2, 5, 2) and mom.shape == dec.shape == (2, 2, 5)
    assert (lr > 0).all() and (lr < 0.1).all()
    shared = layer(lr={"per_layer": False})
    assert shared.gates(torch.randn(2, 5, 16))[0].shape == (2, 2, 5)


@pytest.mark.parametrize(
    "model, momentum",
    [({"kind": "mlp"}, 0.1), ({"kind": "linear"}, 0.1), ({"kind": "mlp", "depth": 3}, 0.1), ({"kind": "mlp"}, 0.9)],
)
def test_inner_loop_stays_bounded_at_its_largest_step(model, momentum):
    """theta at its bound (gate bias at 0.99 of theta_max), momentum and decay on: over 16K random
    tokens and over 4K copies of one token (every gradient of a chunk points the same way: the case
    the default theta_max = 1 / chunk guards) every weight stays within 2x the larger of
    |W_0| and sqrt(heads * d_out) (the norm of a map taking unit keys to unit values), and the
    raw reads f_W(q) (before any output norm) stay O(1)."""
    from components.ops.memory import memory_read

    mem = layer(dim=64, heads=4, model=model, lr={"init": 0.99}, momentum={"init": momentum})
    start = [max(w.norm(), (w.shape[0] * w.shape[2]) ** 0.5) for w in mem.net.initial]
    g = torch.Generator().manual_seed(0)
    for x in (torch.randn(1, 16384, 64, generator=g), torch.randn(1, 1, 64, generator=g).expand(1, 4096, 64)):
        with torch.no_grad():
            _, state = mem(x, mem.init_state(1))
            weights = state.memory.weights
            for w, w0 in zip(weights, start):
                assert w.norm() < 2 * w0, f"|W| {w.norm():.3g} vs bound {2 * w0:.3g}"
            q = torch.nn.functional.normalize(torch.randn(1, 4, 64, 16, generator=g), dim=-1)
            reads = memory_read(q, weights, mem.memory_model()).norm(dim=-1)
        assert torch.isfinite(reads).all() and reads.max() < 10


@pytest.mark.parametrize("capped", [True, False])
def test_the_step_cap_keeps_a_grown_deep_memory_bounded(capped):
    """A deep memory whose W_0 the outer loop has grown (here x2: curvature ~4x) fed 2K similar
    tokens with theta at its bound: with the curvature cap (lr.curvature_cap 2) the weights stay near W_0;
    without it theta_max alone is 4x too large for this curvature and the inner loop diverges
    (what MAL and MAC did in training at theta_max 1 / chunk: docs/decisions/0006 §4)."""
    mem = layer(dim=64, heads=4, model={"kind": "mlp"}, lr={"init": 0.99, "curvature_cap": 2.0 if capped else None})
    with torch.no_grad():
        for w in mem.net.initial:
            w.mul_(2.0)
    start = [w.norm() for w in mem.net.initial]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 64, generator=g) + 0.3 * torch.randn(1, 2048, 64, generator=g)
    with torch.no_grad():
        _, state = mem(x, mem.init_state(1))
    bounded = all(w.norm() < 2 * max(w0, 4.0) for w, w0 in zip(state.memory.weights, start))
    assert bounded == capped, [f"{w0:.3g} -> {w.norm():.3g}" for w, w0 in zip(state.memory.weights, start)]


def test_bf16_autocast_keeps_the_state_in_float32():
    mem = layer(dim=32, heads=2, chunk_size=8)
    x = torch.randn(2, 21, 32)
    ref, _ = mem(x, mem.init_state(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, state = mem(x, mem.init_state(2))
    assert all(w.dtype == torch.float32 for w in state.memory.weights + state.memory.momentum)
    err = (y.float() - ref).abs().max() / ref.abs().max()
    assert err < 0.05, f"bf16 autocast drifted {err:.3f} from float32"


def test_recorded_surprise_falls_on_a_sequence_the_memory_learns():
    """The health record measures each chunk at the weights it starts from, from the state the
    forward started in: on 16 tokens repeated 8 times a fresh memory's surprise falls from the
    first quarter of the chunks to the last (measured 0.88 -> 0.34); measured at the weights
    after the forward the first chunks would already look learned."""
    from components.neural_memory import recording, summarize_health

    torch.manual_seed(0)
    mem = NeuralMemorySpec.model_validate({"chunk_size": 8}).build(32, 2)
    x = torch.randn(2, 16, 32).repeat(1, 8, 1)
    with torch.no_grad(), recording([mem]) as logs:
        mem(x)
    health = summarize_health(logs[0])
    assert health["surprise_start"] > 2 * health["surprise_end"], health


def test_health_over_an_unfinished_last_chunk_sees_the_state_after_every_token():
    """Training drops the end state, so the kernel may pad an unfinished last chunk into its one
    call and return none (`final_state`); recording health needs that state: its weight norm
    is the one a streamed forward ends in, 21 tokens at chunk 8."""
    from components.neural_memory import recording

    mem = layer(dim=32, chunk_size=8)
    x = torch.randn(2, 21, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, state = mem(x, mem.init_state(2))
        with recording([mem]) as logs:
            mem(x)
    w_norm = torch.stack([w.pow(2).sum((-2, -1)) for w in state.memory.weights]).sum(0).sqrt().mean()
    assert logs[0][0].w_norm == pytest.approx(float(w_norm), rel=1e-5)


@pytest.mark.parametrize(
    "overrides, path, words",
    [
        (["block.memory.objective.kind=dot"], "block.memory.lr.curvature_cap", ["dot objective", "cap: null"]),
        (["block.memory.objective.kind=huber", "block.memory.backend=triton"], "block.memory.backend", ["l2"]),
        (["block.memory.objective.kind=lp", "block.memory.objective.p=5"], "block.memory.objective.p", ["less than"]),
        (["block.memory.optimizer.kind=muon"], "block.memory.lr.curvature_cap", ["Muon", "cap: null"]),
        (
            ["block.memory.omega.window=3", "block.memory.granularity=chunk", "block.memory.read=chunk_start"],
            "block.memory.omega",
            ["granularity 'token'"],
        ),
        (["block.memory.omega.window=3", "block.memory.backend=triton"], "block.memory.backend", ["Omega rule"]),
        (
            ["block.memory.optimizer.kind=muon", "block.memory.lr.curvature_cap=null", "block.memory.backend=triton"],
            "block.memory.backend",
            ["Muon"],
        ),
        (["block.memory.retention.kind=kl", "block.memory.backend=triton"], "block.memory.backend", ["KL retention"]),
        (["block.memory.decay.per=channel", "block.memory.backend=triton"], "block.memory.backend", ["per channel"]),
        (["block.memory.omega.window=0"], "block.memory.omega.window", ["greater than"]),
    ],
)
def test_combinations_the_memory_cannot_run_are_refused_at_validation(overrides, path, words):
    from titans_nas.config import SpecError, load_spec

    with pytest.raises(SpecError) as e:
        load_spec("lmm-tiny", overrides)
    assert e.value.path == path and all(w in e.value.reason for w in words), e.value.reason


@pytest.mark.parametrize("kind", ["polynomial", "exponential"])
@pytest.mark.parametrize("degree", [1, 2, 3])
def test_feature_maps_are_their_kernels(kind, degree, float64):
    """<phi(x), phi(y)> = sum_{j <= p} (x . y)^j (polynomial) or sum_{j <= p} (x . y)^j / j!
    (exponential: exp's Taylor polynomial), with C(d + p, p) features."""
    import math

    from components.feature_map import FeatureMapSpec
    from titans_nas.config import union_members

    spec = union_members(FeatureMapSpec)[kind](degree=degree)
    phi = spec.build(6)
    x, y = torch.randn(3, 4, 6), torch.randn(3, 4, 6)
    assert phi(x).shape == (3, 4, spec.features(6)) == (3, 4, math.comb(6 + degree, degree))
    weight = (lambda j: 1 / math.factorial(j)) if kind == "exponential" else (lambda j: 1.0)
    kernel = sum(weight(j) * (x * y).sum(-1) ** j for j in range(degree + 1))
    torch.testing.assert_close((phi(x) * phi(y)).sum(-1), kernel, atol=1e-12, rtol=0)


def test_feature_mapped_keys_widen_the_memory_and_refuse_a_residual():
    from titans_nas.config import SpecError, load_spec

    mem = layer(feature_map={"kind": "polynomial", "degree": 2})
    assert mem.net.initial[0].shape == (2, 45, 32) and mem.net.initial[-1].shape[-1] == 8  # C(8 + 2, 2) = 45
    with pytest.raises(SpecError) as e:
        load_spec("lmm-tiny", ["block.memory.feature_map.kind=polynomial", "block.memory.model.residual=true"])
    assert e.value.path == "block.memory.feature_map" and "residual" in e.value.reason


def test_retrieval_reads_through_the_memorys_own_query_path(float64):
    """MAC's retrieval (eq. 21) is the memory's own read without the update: with reads at the
    chunk start, the first chunk's outputs are f_{W_0}(q(x)), exactly what `retrieval_queries` + `read` give at
    W_0 (projection, conv, SiLU, norm and feature map all on the query path)."""
    for extra in ({}, {"feature_map": {"kind": "polynomial", "degree": 2}}):
        mem = layer(read="chunk_start", chunk_size=8, **extra).double()
        x = torch.randn(2, 8, 16)
        y, _ = mem(x)
        weights = mem.init_state(2).memory.weights
        q, _ = mem.retrieval_queries(x, mem.init_retrieval_state(2))
        retrieved = mem.read(q, weights, x)
        torch.testing.assert_close(retrieved, y, atol=1e-12, rtol=0)


def test_an_omega_window_of_one_is_eq_12s_rule_and_wider_windows_write_more(float64):
    """window 1 builds the null model (no gate, same outputs); window 3 changes the output and
    its gate gamma learns (it gets a gradient); the default step bound shrinks with the window."""
    x = torch.randn(2, 21, 16, dtype=torch.float64)
    off, one = layer().double(), layer(omega={"window": 1}).double()
    assert [p.shape for p in one.parameters()] == [p.shape for p in off.parameters()]
    torch.testing.assert_close(one(x)[0], off(x)[0], atol=0, rtol=0)
    three = layer(omega={"window": 3}).double()
    assert three.gates.sizes[3] == 2  # one gamma per head
    three(x)[0].square().sum().backward()
    assert three.gates.proj.weight.grad[-2:].abs().sum() > 0  # gamma's rows of the gate projection
    spec = NeuralMemorySpec(omega={"window": 3}, chunk_size=8)
    assert spec.theta_max() == pytest.approx(1 / 24)


def test_a_decay_per_channel_gives_every_layer_its_own_gates():
    """The gate projection's slots map to (layer, channel): raising one slot's bias moves that
    layer's channel alone; channels past a layer's width are padding (zero)."""
    mem = layer(decay={"per": "channel"})
    widths = [w.shape[-1] for w in mem.net.initial]  # (32, 8) for a 2-layer memory at head dim 8
    heads, start = 2, sum(mem.gates.sizes[:2])
    with torch.no_grad():
        slot = start + widths[0] + 1  # head 0's layer 1, channel 1 (per head: layer 0's channels, then layer 1's)
        mem.gates.proj.bias[slot] = 10.0
    dec = mem.gates(torch.randn(2, 5, 16)).decay
    assert dec.shape == (2, heads, 5, len(widths), max(widths))
    assert (dec[:, 0, :, 1, 1] > 0.99).all() and (dec[:, 0, :, 1, 0] < 0.01).all()
    assert (dec[:, 0, :, 0] < 0.01).all() and (dec[:, 1] < 0.01).all()
    assert (dec[..., 1, widths[1] :] == 0).all()


def test_muons_newton_schulz_steps_are_the_specs():
    """ns_steps reaches the op: 1 and 5 steps give other outputs (both orthogonalise, differently)."""
    x = torch.randn(2, 21, 16)
    spec = lambda k: {"optimizer": {"kind": "muon", "ns_steps": k}, "lr": {"curvature_cap": None}}  # noqa: E731
    one, five = layer(**spec(1)), layer(**spec(5))
    assert one.rule.inner.muon_steps == 1 and five.rule.inner.muon_steps == 5
    assert (one(x)[0] - five(x)[0]).abs().max() > 1e-5


@needs_cpp
def test_the_default_layer_on_cpu_runs_its_conv_norm_and_memory_in_the_cpp_kernel(monkeypatch):
    """Forward and backward of the default layer in float32 on CPU go through the C++ kernel's
    convolution, SiLU + l2 norm and MLP memory (each equals torch's code in its own tests; this
    one fails if the layer stops taking them)."""
    calls = record_calls(monkeypatch, cpu_loop, ("conv_forward", "conv_backward", "silu_l2", "silu_l2_backward"))
    record_calls(monkeypatch, cpu_loop.CpuMlpLoop, ("run",), calls)
    y, _ = layer()(torch.randn(2, 35, 16))
    y.square().mean().backward()
    assert set(calls) == {"conv_forward", "conv_backward", "silu_l2", "silu_l2_backward", "run"}
