"""Which path runs the memory on CPU: the C++ kernel (cpu_kernel.cpp) where it covers the call,
torch otherwise, and what happens without a compiler. Its exactness is in test_memory_op.py
(`test_the_cpp_kernel_equals_naive_*`)."""

from dataclasses import replace

import pytest
import torch

from components.ops.memory import cpu_loop, memory_update, naive_memory_update
from tests.components.kernel_paths import record_calls
from tests.components.test_memory_op import CASES, Case, assert_rel_close, make, needs_cpp, outputs_state_grads


def launches(monkeypatch) -> list[str]:
    calls = record_calls(monkeypatch, cpu_loop.CpuLoop, ("run",))
    return record_calls(monkeypatch, cpu_loop.CpuMlpLoop, ("run",), calls)


@needs_cpp
@pytest.mark.parametrize(
    "case, expected",
    [
        # the kernel: one call for the whole chunks, one for the unfinished last chunk (n % chunk)
        (CASES["linear, momentum+decay+prior, chunk 8"], 2),  # linear
        (CASES["mlp plain, decay toward the prior, chunk 16"], 2),  # MLP
        (CASES["mlp depth 3 plain silu, everything on, chunk 4"], 2),
        (CASES["linear residual, prior, step cap, chunk 16"], 2),
        (replace(CASES["mlp plain, decay toward the prior, chunk 16"], n=32), 1),  # no unfinished chunk
        (replace(CASES["mlp plain, decay toward the prior, chunk 16"], n=9), 1),  # nothing but one
        (Case(), 0),  # a LayerNorm'd MLP: torch
        (CASES["omega 3, linear, momentum+decay, chunk 16"], 0),  # beyond the plain rule: torch
    ],
)
def test_auto_takes_the_cpp_kernel_on_cpu_where_it_covers_the_memory(case, expected, monkeypatch):
    calls = launches(monkeypatch)
    inputs, weights, model, leaves = make(case)
    outputs_state_grads(memory_update, case, inputs, weights, model, leaves)
    assert len(calls) == expected
    outputs_state_grads(memory_update, case, inputs, weights, model, leaves, backend="torch")
    assert len(calls) == expected  # torch means torch


@needs_cpp
def test_keys_wider_than_values_stay_on_torch(monkeypatch):
    calls = launches(monkeypatch)
    case = Case(depth=1, chunk=8, n=16, norm=False, residual=False)
    q, k, v, lr, mom, dec = make(case)[0]
    widen = lambda t: torch.cat([t, t], -1).detach()  # noqa: E731
    from components.ops.memory import init_memory_state

    weights = (torch.randn(2, 16, 8, dtype=torch.float64) * 0.1,)
    memory_update(widen(q), widen(k), v, lr, mom, dec, init_memory_state(weights, 2, True), chunk_size=8)
    assert not calls
    with pytest.raises(ValueError, match="keys as wide as values"):
        memory_update(widen(q), widen(k), v, lr, mom, dec, init_memory_state(weights, 2, True), chunk_size=8,
                      backend="cpp")  # fmt: skip


def test_without_a_compiler_auto_keeps_torch_and_cpp_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("TITANS_NAS_KERNEL_CACHE", str(tmp_path / "cache"))
    cpu_loop.library.cache_clear()
    try:
        assert isinstance(cpu_loop.library(), str)
        calls = launches(monkeypatch)
        case = CASES["linear, momentum+decay+prior, chunk 8"]
        inputs, weights, model, leaves = make(case)
        y, _, g = outputs_state_grads(memory_update, case, inputs, weights, model, leaves)
        y0, _, g0 = outputs_state_grads(naive_memory_update, case, inputs, weights, model, leaves)
        assert not calls
        assert_rel_close(y, y0, 1e-9, "outputs on the torch path")
        with pytest.raises(ValueError, match="did not build"):
            outputs_state_grads(memory_update, case, inputs, weights, model, leaves, backend="cpp")
    finally:
        monkeypatch.undo()
        cpu_loop.library.cache_clear()


def test_the_spec_refuses_cpp_where_the_kernel_does_not_reach():
    from components.base import SpecRuleError
    from components.neural_memory import NeuralMemorySpec

    for model in ({"kind": "linear"}, {"kind": "mlp"}, {"kind": "mlp", "depth": 3}):
        NeuralMemorySpec.model_validate({"model": model, "backend": "cpp"}).check(32, 2)
    with pytest.raises(SpecRuleError, match="C\\+\\+ kernel cover the linear memory"):
        NeuralMemorySpec.model_validate({"model": {"kind": "mlp", "norm": True}, "backend": "cpp"}).check(32, 2)


def test_the_launcher_refuses_tensors_of_other_sizes():
    """The kernel trusts the sizes it is given: a tensor of any other size is refused before."""
    flags = (3, 4, 8, 0, 0, 0, 0, 0.0)  # K, C, d, momentum, prior, cap, residual, cap value
    good = [torch.zeros(2, 3, 4, 8)] * 3
    with pytest.raises(ValueError, match="another size"):
        cpu_loop._launch("linear_forward", 2, flags, [*good, torch.zeros(5)])


@needs_cpp
def test_a_flop_counter_sees_the_torch_path_not_an_invisible_kernel():
    """FlopCounterMode cannot see inside the C++ kernel: under any dispatch mode the op takes
    the torch path, so counts (the benchmarks' GFLOP/s, `inspect`) are those of the math."""
    from titans_nas.flops import flop_counter

    case = CASES["mlp plain, decay toward the prior, chunk 16"]
    counts = {}
    for backend in ("auto", "torch"):
        inputs, weights, model, leaves = make(case)
        with flop_counter() as counter:
            outputs_state_grads(memory_update, case, inputs, weights, model, leaves, backend=backend)
        counts[backend] = counter.get_total_flops()
    assert counts["auto"] == counts["torch"] > 0


@needs_cpp
@pytest.mark.parametrize("activation", ["gelu", "silu"])
def test_the_kernels_float32_activations_are_exact_to_float32_rounding(activation):
    """The MLP kernel computes act, act' and act'' in float32 by its own exp and erfc (libm's are
    scalar calls, 13x slower there); each is within a few float32 roundings of the float64 value,
    over the whole range a pre-activation takes, both tails included."""
    zf = torch.linspace(-12, 12, 24001)
    z = zf.double()
    x = z.clone().requires_grad_()
    act = torch.nn.functional.gelu if activation == "gelu" else torch.nn.functional.silu
    (d1,) = torch.autograd.grad(act(x).sum(), x, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), x)
    out = [torch.empty(len(z), dtype=torch.float32) for _ in range(3)]
    cpu_loop.library().activations(int(activation == "silu"), len(z), *(t.data_ptr() for t in (zf, *out)))
    for got, want in zip(out, (act(z), d1.detach(), d2)):
        err = (got.double() - want).abs() / (1 + want.abs())
        assert err.max() < 3e-7, (activation, err.max().item(), z[err.argmax()].item())


@needs_cpp
@pytest.mark.parametrize("depth", [1, 2])
def test_the_kernel_flushes_denormals_and_leaves_the_callers_mode(depth):
    """The memory loops run with float32 denormals flushed to zero (cpu_kernel.cpp,
    FlushDenormals: a chunk's gate products fall below 1.2e-38, and every product they entered
    ran 3x slower on an Intel Xeon). Weights of 1e-39 are read as zero there, not on the torch
    path; the calling thread's own mode is restored, so torch's arithmetic after the call keeps
    its denormals."""
    from components.ops.memory import MemoryModel, init_memory_state

    b, n, d = 4, 8, 8  # 4 rows over the suite's threads: every thread of the loop flushes
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, 1, n, d, generator=g) for _ in range(3))
    lr = torch.zeros(b, 1, n)  # no writes: the reads see the initial weights alone
    weights = (torch.full((1, d, d if depth == 1 else 16), 1e-39),)
    if depth == 2:
        weights += (torch.randn(1, 16, d, generator=g),)
    model = MemoryModel(activation="gelu")
    ys = {}
    for backend in ("cpp", "torch"):
        state = init_memory_state(weights, b, False)
        ys[backend], _ = memory_update(q, k, v, lr, None, None, state, chunk_size=8, model=model, backend=backend)
    assert (ys["torch"] != 0).any() and ys["torch"].abs().max() < 1e-36
    assert (ys["cpp"] == 0).all()
    assert (torch.full((4,), 1e-39) * torch.ones(4) != 0).all()
