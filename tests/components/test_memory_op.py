"""memory_update (fast, chunked) against naive_memory_update (token loop + autograd) and an
independent gated-delta-rule oracle; streaming; checkpointing; stability at 16K tokens."""

from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F

from components.ops.memory import (
    MemoryModel,
    MemoryState,
    Objective,
    init_memory_state,
    memory_update,
    naive_memory_update,
)
from tests.components.kernel_paths import needs_cpp, record_calls


@dataclass(frozen=True)
class Case:
    depth: int = 2
    momentum: bool = True
    decay: bool = True
    chunk: int = 16
    n: int = 37
    read: str = "after_update"
    granularity: str = "token"
    act: str = "gelu"
    norm: bool = True
    residual: bool = True
    per_layer_lr: bool = False
    prior: bool = False
    cap: float | None = None
    objective: Objective = Objective()
    omega: int = 1  # the Omega rule's window
    gated: bool = True  # with gamma gates (the window's tokens weighted)
    muon: int | None = None  # Newton-Schulz steps (the inner optimiser is Muon)
    l1: float | None = None  # the elastic-net retention's soft threshold per token
    channel_decay: bool = False  # one forget gate per output channel of each layer
    kl: float | None = None  # the KL retention's scale c: W = c softmax(A)
    lq: float | None = None  # the l_q retention's q: W = A / ||A||_q^(q-2)
    eta_floor: float = 0.0  # momentum gates drawn in [floor, floor + 0.6 (1 - floor)]; near 1, a
    # chunk's momentum reaches the next chunks (below 0.6, 16 tokens' product is ~1e-8)


CASES = {
    "linear online, momentum+decay": Case(depth=1, chunk=1, n=23, norm=False, residual=False),
    "linear, all off, chunk 16": Case(depth=1, momentum=False, decay=False, chunk=16, n=37, norm=False, residual=False),
    "linear, momentum, chunk 64": Case(depth=1, decay=False, chunk=64, n=70, norm=False, residual=False),
    "mlp x+LN, momentum+decay, chunk 1": Case(chunk=1, n=19),
    "mlp x+LN, momentum+decay, chunk 16": Case(chunk=16, n=37, per_layer_lr=True),
    "mlp x+LN, momentum+decay, chunk 64": Case(chunk=64, n=70),
    "mlp silu plain, momentum only": Case(act="silu", norm=False, residual=False, decay=False, chunk=16, n=37),
    "mlp silu LN (no residual), decay only": Case(act="silu", residual=False, momentum=False, chunk=5, n=23),
    "mlp depth 3, per-layer lr": Case(depth=3, chunk=5, n=23, per_layer_lr=True),
    "read chunk_start": Case(read="chunk_start", chunk=16, n=37),
    "read chunk_start, linear, no momentum": Case(
        depth=1, momentum=False, read="chunk_start", chunk=5, n=23, norm=False, residual=False
    ),
    "granularity chunk": Case(read="chunk_start", granularity="chunk", chunk=16, n=37),
    "mlp plain, decay toward the prior, chunk 16": Case(norm=False, residual=False, prior=True, per_layer_lr=True),
    "linear, decay toward the prior, chunk 5": Case(depth=1, chunk=5, n=23, norm=False, residual=False, prior=True),
    "mlp plain, prior, read chunk_start": Case(
        norm=False, residual=False, prior=True, read="chunk_start", chunk=5, n=23
    ),
    "granularity chunk, prior": Case(read="chunk_start", granularity="chunk", chunk=5, n=23, prior=True),
    "mlp plain, step cap, prior, chunk 16": Case(norm=False, residual=False, prior=True, per_layer_lr=True, cap=0.5),
    "mlp x+LN, step cap, chunk 5": Case(chunk=5, n=23, cap=0.5),
    "linear, step cap, chunk 1": Case(depth=1, chunk=1, n=23, norm=False, residual=False, cap=0.5),
    "step cap, read chunk_start": Case(norm=False, residual=False, read="chunk_start", chunk=5, n=23, cap=0.5),
    "granularity chunk, step cap": Case(
        read="chunk_start", granularity="chunk", chunk=5, n=23, per_layer_lr=True, cap=0.5
    ),
    "mlp plain residual, everything on, chunk 8": Case(
        norm=False, chunk=8, n=29, per_layer_lr=True, prior=True, cap=0.5
    ),
    "mlp depth 3 plain silu, everything on, chunk 4": Case(
        depth=3, act="silu", norm=False, residual=False, chunk=4, n=18, prior=True, cap=0.05
    ),
    "linear, momentum+decay+prior, chunk 8": Case(depth=1, chunk=8, n=27, norm=False, residual=False, prior=True),
    "linear residual, prior, step cap, chunk 16": Case(depth=1, chunk=16, n=40, norm=False, prior=True, cap=0.5),
    "granularity chunk, no momentum, linear": Case(
        depth=1, momentum=False, read="chunk_start", granularity="chunk", chunk=5, n=23, norm=False, residual=False
    ),
    # the inner objectives (MIRAS attentional biases): the hand backward through their jacobians
    "lp 3, mlp plain, momentum+decay, chunk 16": Case(norm=False, residual=False, objective=Objective("lp", p=3.0)),
    "lp 1.5, linear online": Case(depth=1, chunk=1, n=23, norm=False, residual=False, objective=Objective("lp", p=1.5)),
    "lp 1, mlp plain residual, prior, chunk 5": Case(
        norm=False, chunk=5, n=23, prior=True, objective=Objective("lp", p=1.0)
    ),
    "lp 4, granularity chunk": Case(
        read="chunk_start", granularity="chunk", chunk=5, n=23, objective=Objective("lp", p=4.0)
    ),
    "huber 0.3, mlp plain, step cap, chunk 16": Case(
        norm=False, residual=False, per_layer_lr=True, cap=0.05, objective=Objective("huber", delta=0.3)
    ),
    "huber 0.5, mlp x+LN, chunk 16": Case(objective=Objective("huber", delta=0.5)),
    "huber 0.3, linear, read chunk_start, chunk 5": Case(
        depth=1, read="chunk_start", chunk=5, n=23, norm=False, residual=False, objective=Objective("huber", delta=0.3)
    ),
    "dot, linear, momentum+decay, chunk 16": Case(depth=1, norm=False, residual=False, objective=Objective("dot")),
    "dot, mlp plain residual, prior, chunk 8": Case(
        norm=False, chunk=8, n=29, prior=True, per_layer_lr=True, objective=Objective("dot")
    ),
    "dot, granularity chunk, linear": Case(
        depth=1,
        read="chunk_start",
        granularity="chunk",
        chunk=5,
        n=23,
        norm=False,
        residual=False,
        objective=Objective("dot"),
    ),  # fmt: skip
    # the Omega rule (ATLAS eq. 9): windows of key rows, through autograd
    "omega 3, linear, momentum+decay, chunk 16": Case(depth=1, norm=False, residual=False, omega=3),
    "omega 4, mlp plain, prior, step cap, chunk 16": Case(
        norm=False, residual=False, prior=True, per_layer_lr=True, cap=0.5, omega=4
    ),
    "omega 2, mlp x+LN, chunk 1": Case(chunk=1, n=19, omega=2),
    "omega 3 ungated, linear, all off, chunk 5": Case(
        depth=1, momentum=False, decay=False, chunk=5, n=23, norm=False, residual=False, omega=3, gated=False
    ),
    "omega 3, read chunk_start, chunk 5": Case(read="chunk_start", chunk=5, n=23, omega=3),
    "omega 2, lp 1.5, mlp plain (padding rows have e = 0)": Case(
        norm=False, residual=False, chunk=4, n=13, omega=2, objective=Objective("lp", p=1.5)
    ),
    "omega 5, huber, mlp plain residual, chunk 8": Case(
        norm=False, chunk=8, n=29, omega=5, objective=Objective("huber", delta=0.3)
    ),
    # Muon (ATLAS eqs. 32-33): per-token momenta orthogonalised, through autograd
    "muon 5, linear, momentum+decay, chunk 16": Case(depth=1, norm=False, residual=False, muon=5),
    "muon 2, mlp plain, prior, per-layer lr, chunk 16": Case(
        norm=False, residual=False, prior=True, per_layer_lr=True, muon=2
    ),
    "muon 3, mlp x+LN, chunk 1": Case(chunk=1, n=19, muon=3),
    "muon 2, no momentum, read chunk_start, chunk 5": Case(momentum=False, read="chunk_start", chunk=5, n=23, muon=2),
    "muon 2, granularity chunk": Case(read="chunk_start", granularity="chunk", chunk=5, n=23, muon=2),
    "atlas: omega 3 + muon 3, mlp plain, prior, chunk 8": Case(
        norm=False, residual=False, chunk=8, n=29, prior=True, omega=3, muon=3
    ),
    # the elastic-net retention (MIRAS eqs. 22-23): a soft threshold at every chunk's end
    "l1, linear, momentum+decay, chunk 16": Case(depth=1, norm=False, residual=False, l1=2e-3),
    "l1, mlp plain, prior, step cap, chunk 5": Case(
        norm=False, residual=False, prior=True, chunk=5, n=23, cap=0.5, l1=1e-3
    ),
    "l1, mlp x+LN, chunk 1": Case(chunk=1, n=19, l1=1e-2),
    "l1, read chunk_start, chunk 5": Case(norm=False, read="chunk_start", chunk=5, n=23, l1=1e-3),
    "l1, granularity chunk, prior": Case(read="chunk_start", granularity="chunk", chunk=5, n=23, prior=True, l1=2e-3),
    "l1 + omega 2 + muon 2, mlp plain, chunk 8": Case(
        norm=False, residual=False, chunk=8, n=29, omega=2, muon=2, l1=1e-3
    ),
    # a forget gate per output channel (Titans T2's channel-wise alpha; MIRAS's channel-wise gates)
    "channel decay, linear, momentum, chunk 16": Case(depth=1, norm=False, residual=False, channel_decay=True),
    "channel decay, mlp plain, prior, cap, chunk 5": Case(
        norm=False, residual=False, prior=True, cap=0.5, chunk=5, n=23, per_layer_lr=True, channel_decay=True
    ),
    "channel decay, mlp x+LN, no momentum, chunk 1": Case(momentum=False, chunk=1, n=19, channel_decay=True),
    "channel decay, omega 3, read chunk_start, chunk 5": Case(
        read="chunk_start", chunk=5, n=23, omega=3, channel_decay=True
    ),
    "channel decay, muon 2, prior, chunk 8": Case(
        norm=False, residual=False, prior=True, chunk=8, n=29, muon=2, channel_decay=True
    ),
    "channel decay, granularity chunk, prior": Case(
        read="chunk_start", granularity="chunk", chunk=5, n=23, prior=True, channel_decay=True
    ),
    # the KL retention (MIRAS eqs. 19-21, Memora): W = c softmax(A), mirror descent on A
    "kl 1, linear, momentum+decay, chunk 16": Case(depth=1, norm=False, residual=False, kl=1.0),
    "kl 2, mlp x+LN, prior, chunk 5": Case(prior=True, chunk=5, n=23, kl=2.0),
    "kl 1, mlp plain, step cap, chunk 1": Case(norm=False, residual=False, chunk=1, n=19, cap=0.05, kl=1.0),
    "kl 1, read chunk_start, prior, chunk 5": Case(norm=False, read="chunk_start", prior=True, chunk=5, n=23, kl=1.0),
    "kl 1, granularity chunk": Case(read="chunk_start", granularity="chunk", chunk=5, n=23, kl=1.0),
    "kl 1 + muon 2, mlp plain, chunk 8": Case(norm=False, residual=False, chunk=8, n=29, muon=2, kl=1.0),
    "kl 1 + channel decay + omega 2, chunk 8": Case(
        norm=False, residual=False, chunk=8, n=29, omega=2, channel_decay=True, per_layer_lr=True, kl=1.0
    ),
    # the l_q retention (MIRAS eqs. 24-25, Moneta): W = A / ||A||_q^(q-2)
    "lq 4, linear, momentum+decay, chunk 16": Case(depth=1, norm=False, residual=False, lq=4.0),
    "lq 4, lp 3, mlp x+LN, prior, chunk 5 (Moneta)": Case(
        prior=True, chunk=5, n=23, momentum=False, objective=Objective("lp", p=3.0), lq=4.0
    ),
    "lq 3, mlp plain, cap, chunk 1": Case(norm=False, residual=False, chunk=1, n=19, cap=0.05, lq=3.0),
    "lq 4, read chunk_start, granularity chunk": Case(read="chunk_start", granularity="chunk", chunk=5, n=23, lq=4.0),
}


def make(case: Case, dtype=torch.float64, b=2, h=2, d=8, e=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, scale=1.0: (scale * torch.randn(*s, generator=g, dtype=dtype)).requires_grad_()  # noqa: E731
    uni = lambda *s, scale=1.0: (scale * torch.rand(*s, generator=g, dtype=dtype)).requires_grad_()  # noqa: E731
    n = case.n
    q = F.normalize(torch.randn(b, h, n, d, generator=g, dtype=dtype), dim=-1).requires_grad_()
    k = F.normalize(torch.randn(b, h, n, d, generator=g, dtype=dtype), dim=-1).requires_grad_()
    v = rnd(b, h, n, d)
    widths = [d] + [e] * (case.depth - 1) + [d]
    weights = tuple(rnd(h, a, c, scale=a**-0.5) for a, c in zip(widths[:-1], widths[1:]))
    lr = uni(b, h, n, case.depth, scale=0.2) if case.per_layer_lr else uni(b, h, n, scale=0.2)
    mom = None
    if case.momentum:
        mom = uni(b, h, n, scale=0.6 * (1 - case.eta_floor))
        mom = (mom.detach() + case.eta_floor).requires_grad_() if case.eta_floor else mom
    dec = None
    if case.decay:  # per channel: (b, h, n, L, widest layer's outputs); narrower layers read their first o
        dec = uni(b, h, n, case.depth, max(widths[1:]), scale=0.1) if case.channel_decay else uni(b, h, n, scale=0.1)
    norm = (rnd(h, d, scale=0.1) + 1, rnd(h, d, scale=0.1)) if case.norm else None
    prior = tuple(rnd(h, a, c, scale=a**-0.5) for a, c in zip(widths[:-1], widths[1:])) if case.prior else None
    gamma = uni(b, h, n) if case.omega > 1 and case.gated else None
    model = MemoryModel(
        case.act, case.residual, norm, prior=prior, step_cap=case.cap, objective=case.objective,
        omega_window=case.omega, muon_steps=case.muon, l1=case.l1, kl_scale=case.kl,
        lq=case.lq,
    )  # fmt: skip
    leaves = [t for t in (q, k, v, lr, mom, dec, gamma, *weights, *(norm or ()), *(prior or ())) if t is not None]
    return (q, k, v, lr, mom, dec, *([gamma] if gamma is not None else [])), weights, model, leaves


def run(fn, case: Case, inputs, weights, model, **kw):
    q, k, v, lr, mom, dec, *gamma = inputs
    if gamma:
        kw["omega"] = gamma[0]
    state = init_memory_state(weights, q.shape[0], case.momentum)
    return fn(
        q,
        k,
        v,
        lr,
        mom,
        dec,
        state,
        chunk_size=case.chunk,
        model=model,
        read=case.read,
        granularity=case.granularity,
        **kw,
    )


def rel_error(a, b) -> float:
    """max |a - b| / max |b|."""
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def assert_rel_close(a, b, rtol, what=""):
    err = rel_error(a, b)
    assert err <= rtol, f"{what}: relative error {err:.3e} (scale {float(b.abs().max()):.3e})"


def as_dtype(dtype, inputs, weights, model, device=None):
    """The same draw in another dtype (fresh leaves; on `device` if given), so both sides see
    identical numbers."""
    cast = lambda t: None if t is None else t.detach().to(device=device, dtype=dtype).requires_grad_()  # noqa: E731
    inputs, weights = tuple(cast(t) for t in inputs), tuple(cast(w) for w in weights)
    prior = None if model.prior is None else tuple(cast(w) for w in model.prior)
    model = replace(model, prior=prior)
    leaves = [t for t in (*inputs, *weights, *(prior or ())) if t is not None]
    return inputs, weights, model, leaves


def outputs_state_grads(fn, case, inputs, weights, model, leaves, **kw):
    """Outputs, final state and the gradients of a loss on both; the output cotangent is drawn
    in float64 whatever the dtype, so runs in two dtypes see the same loss."""
    y, state = run(fn, case, inputs, weights, model, **kw)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(y.device, y.dtype)
    loss = (y * g).sum() + sum((w * w).sum() for w in state.weights + (state.momentum or ()))
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return y, state, grads


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.cap is not None])
def test_the_step_cap_bites_and_an_infinite_cap_is_off(name):
    """The cap cases are not vacuous: the cap changes the outputs; a cap too large to bind gives
    exactly the uncapped update."""
    import dataclasses

    case = CASES[name]
    inputs, weights, model, _ = make(case)
    with torch.no_grad():
        y = run(memory_update, case, inputs, weights, model)[0]
        off = run(memory_update, case, inputs, weights, dataclasses.replace(model, step_cap=None))[0]
        huge = run(memory_update, case, inputs, weights, dataclasses.replace(model, step_cap=1e12))[0]
    assert (y - off).abs().max() > 1e-2 * off.abs().max()
    assert torch.equal(huge, off)


def assert_fast_equals_naive(case: Case, rtol: float = 1e-9, backend: str = "torch", d: int = 8, e: int = 16) -> None:
    """Outputs, final state (weights, momentum, offset) and every input's gradient, float64."""
    inputs, weights, model, leaves = make(case, d=d, e=e)
    y, s, g = outputs_state_grads(memory_update, case, inputs, weights, model, leaves, backend=backend)
    y0, s0, g0 = outputs_state_grads(naive_memory_update, case, inputs, weights, model, leaves)
    assert_rel_close(y, y0, rtol, "outputs")
    for a, b in zip(s.weights, s0.weights):
        assert_rel_close(a, b, rtol, "final weights")
    if case.momentum:
        for a, b in zip(s.momentum, s0.momentum):
            assert_rel_close(a, b, rtol, "final momentum")
    assert s.offset == s0.offset == case.n % case.chunk
    for leaf, a, b in zip(leaves, g, g0):
        assert (a is None) == (b is None)
        if a is not None:
            assert_rel_close(a, b, rtol, f"gradient of a {tuple(leaf.shape)} input")


@pytest.mark.parametrize("name", list(CASES))
def test_fast_equals_naive_float64(name):
    assert_fast_equals_naive(CASES[name])


@pytest.mark.parametrize(
    "name",
    [
        "linear online, momentum+decay",
        "mlp x+LN, momentum+decay, chunk 16",
        "granularity chunk",
        "mlp plain residual, everything on, chunk 8",
        "lp 3, mlp plain, momentum+decay, chunk 16",
        "huber 0.3, mlp plain, step cap, chunk 16",
        "dot, mlp plain residual, prior, chunk 8",
        "omega 3, linear, momentum+decay, chunk 16",
        "muon 2, mlp plain, prior, per-layer lr, chunk 16",
        "atlas: omega 3 + muon 3, mlp plain, prior, chunk 8",
        "l1, mlp plain, prior, step cap, chunk 5",
        "channel decay, mlp plain, prior, cap, chunk 5",
        "kl 1 + channel decay + omega 2, chunk 8",
        "lq 4, linear, momentum+decay, chunk 16",
    ],
)
def test_fast_equals_naive_float32(name):
    case = CASES[name]
    inputs, weights, model, leaves = make(case, dtype=torch.float32)
    y, s, g = outputs_state_grads(memory_update, case, inputs, weights, model, leaves, backend="torch")
    y0, s0, g0 = outputs_state_grads(naive_memory_update, case, inputs, weights, model, leaves)
    assert_rel_close(y, y0, 1e-4, "outputs")
    for a, b in zip(s.weights, s0.weights):
        assert_rel_close(a, b, 1e-4, "final weights")
    for a, b in zip(g, g0):
        assert_rel_close(a, b, 1e-4, "gradient")


def cpp_reaches(case: Case) -> bool:
    """Whether the C++ kernel covers a case (`common.kernel_reach`, the statement the op uses)."""
    from components.ops.memory.common import beyond_plain_rule, kernel_reach

    m = make(case)[2]
    beyond = beyond_plain_rule(m, case.channel_decay)
    dims = (case.chunk, 8, 8)  # make()'s head dim, keys as wide as values
    why = kernel_reach("cpp", case.depth, case.norm, case.granularity, case.read, dims, m.objective.kind, beyond)
    return why is None


CPP_CASES = [name for name, case in CASES.items() if cpp_reaches(case)]


@needs_cpp
@pytest.mark.parametrize("name", CPP_CASES)
def test_the_cpp_kernel_equals_naive_float64(name):
    """The C++ kernel (cpu_kernel.cpp) on every case it covers, to 1e-9 as the torch path."""
    assert_fast_equals_naive(CASES[name], backend="cpp")


def assert_kernel_equals_naive(case: Case, backend: str, d: int = 16, e: int = 16) -> None:
    """A float32 fused kernel against the float64 reference on the same numbers: 1e-4 relative
    for outputs, state and gradients, 1e-3 for the gates' gradients, which pass through the
    float32 log-space coefficients the torch path computes for every backend (for eta near 0
    ~5e-4 off the float64 reference: torch 5.2e-4, Triton 4.4e-4; everything else ~1e-6)."""
    inputs, weights, model, _ = make(case, d=d, e=e)
    f32 = as_dtype(torch.float32, inputs, weights, model)
    y, s, g = outputs_state_grads(memory_update, case, *f32, backend=backend)
    y0, s0, g0 = outputs_state_grads(naive_memory_update, case, *as_dtype(torch.float64, inputs, weights, model))
    assert y.dtype == torch.float32
    assert_rel_close(y.double(), y0, 1e-4, "outputs")
    for a, b in zip(s.weights + (s.momentum or ()), s0.weights + (s0.momentum or ())):
        assert_rel_close(a.double(), b, 1e-4, "final state")
    for i, (a, b) in enumerate(zip(g, g0)):
        assert (a is None) == (b is None)
        if a is not None:
            assert_rel_close(a.double(), b, 1e-3 if 3 <= i <= 5 else 1e-4, f"gradient of a {tuple(b.shape)} input")


@needs_cpp
@pytest.mark.parametrize("name", CPP_CASES)
def test_the_cpp_kernel_equals_naive_float32(name):
    assert_kernel_equals_naive(CASES[name], "cpp")


@needs_cpp
@pytest.mark.parametrize("name", [name for name in CPP_CASES if CASES[name].n % CASES[name].chunk])
def test_without_the_final_state_the_unfinished_chunk_joins_the_kernel_call(name, monkeypatch):
    """final_state=False (training, no stream): the unfinished last chunk is padded into the
    kernel's one call (one launch forward and one back, where it took a second of each), and no
    state comes back. The padding follows every real token, so the reads and every gradient
    equal the float64 reference's to 1e-9."""
    from components.ops.memory import cpu_loop

    case = CASES[name]
    drawn = make(case)[:3]
    inputs, weights, model, leaves = as_dtype(torch.float64, *drawn)
    launches = record_calls(monkeypatch, cpu_loop, ("_launch", "_mlp_launch"))
    y, state = run(memory_update, case, inputs, weights, model, backend="cpp", final_state=False)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad((y * g).sum(), leaves, allow_unused=True)
    assert state is None and len(launches) == 2, launches
    inputs0, weights0, model0, leaves0 = as_dtype(torch.float64, *drawn)
    y0, _ = run(naive_memory_update, case, inputs0, weights0, model0)
    grads0 = torch.autograd.grad((y0 * g).sum(), leaves0, allow_unused=True)
    assert_rel_close(y, y0, 1e-9, "outputs")
    for leaf, a, b in zip(leaves, grads, grads0):
        assert (a is None) == (b is None)
        if a is not None:
            assert_rel_close(a, b, 1e-9, f"gradient of a {tuple(leaf.shape)} input")


@needs_cpp
@pytest.mark.parametrize("chunk, n", [(16, 37), (5, 23)])
def test_the_cpp_kernel_equals_naive_at_a_wide_hidden_layer(chunk, n):
    """A hidden layer of 130 sends the kernel's A B^T through its transposed copy with B up to
    16 x 130 (the reads' C x C scores, the backward's products with a weight's transpose), at
    odd row and column counts, rows no multiple of the vector width or of the transpose's 8 x 8
    tiles: float64 to 1e-9, float32 to 1e-4."""
    case = replace(CASES["mlp plain, decay toward the prior, chunk 16"], chunk=chunk, n=n)
    assert_fast_equals_naive(case, backend="cpp", d=8, e=130)
    assert_kernel_equals_naive(case, "cpp", d=8, e=130)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_coefficients_hold_no_denormals(dtype):
    """A chunk of 64 momentum and decay gates of 0.2: their running products fall below float32's
    smallest normal within the chunk. The exponentials the coefficients are built from are then
    exactly 0 (`normal_exp`), not denormals that slow every product they enter, and equal to exp
    wherever it is normal."""
    from components.ops.memory.coefficients import coefficients, decay_matrix

    tiny = torch.finfo(torch.float32).tiny
    log_gate = torch.full((2, 1, 1, 64), 0.2).log().to(dtype)
    co = coefficients(torch.full((2, 1, 1, 64), 0.1, dtype=dtype), log_gate, log_gate)
    cum = torch.cumsum(log_gate, -1)
    exps = (cum[..., :, None] - cum[..., None, :]).exp().tril()
    assert (exps[exps < tiny] > 0).any()  # plain exp leaves denormals here
    for got, want in ((decay_matrix(cum), exps), (co.beta[..., 0], cum.exp()), (co.m_last, cum[..., -1:, None].exp())):
        got, want = got.float(), want.float()
        assert ((got == 0) | (got.abs() >= tiny)).all()
        assert torch.equal(got[want >= tiny], want[want >= tiny])


def test_linear_online_without_momentum_is_the_gated_delta_rule():
    """Independent oracle (research/efficient_memory.md §1): Titans-linear with eta = 0 at chunk 1
    is Gated DeltaNet with gate a = 1 - alpha, beta = 2 theta / a (our loss has no 1/2) and
    values a * v, written here in GDN's own column convention S (d_k x d_v)."""
    case = Case(depth=1, momentum=False, chunk=1, n=29, norm=False, residual=False)
    (q, k, v, lr, _, dec), weights, model, _ = make(case)
    y, state = run(memory_update, case, (q, k, v, lr, None, dec), weights, model)
    with torch.no_grad():
        S = weights[0].expand(q.shape[0], -1, -1, -1).clone()  # (b, h, d_k, d_v)
        outs = []
        for t in range(case.n):
            a = (1 - dec[:, :, t])[..., None, None]
            beta = (2 * lr[:, :, t] / (1 - dec[:, :, t]))[..., None]
            kt, vt = k[:, :, t], (1 - dec[:, :, t])[..., None] * v[:, :, t]
            S = a * S  # GDN: decay first ...
            err = beta * (vt - torch.einsum("bhkv,bhk->bhv", S, kt))  # ... then the delta rule
            S = S + torch.einsum("bhk,bhv->bhkv", kt, err)
            outs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, :, t]))
    torch.testing.assert_close(y, torch.stack(outs, 2), atol=1e-12, rtol=0)
    torch.testing.assert_close(state.weights[0], S, atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "name",
    [
        "mlp x+LN, momentum+decay, chunk 16",
        "read chunk_start",
        "granularity chunk",
        "linear online, momentum+decay",
        "omega 4, mlp plain, prior, step cap, chunk 16",
        "atlas: omega 3 + muon 3, mlp plain, prior, chunk 8",
        "muon 2, granularity chunk",
        "l1, mlp plain, prior, step cap, chunk 5",
        "channel decay, mlp plain, prior, cap, chunk 5",
        "kl 2, mlp x+LN, prior, chunk 5",
    ],
)
@pytest.mark.parametrize("pieces", [[1, 3, 7, 2, 11, 13], [37], [16, 16, 5], [1] * 37])
def test_streaming_in_pieces_equals_one_pass(name, pieces):
    case = replace(CASES[name], n=37)
    inputs, weights, model, _ = make(case)
    whole, final = run(memory_update, case, inputs, weights, model)
    state = init_memory_state(weights, inputs[0].shape[0], case.momentum)
    outs, pos = [], 0
    for size in pieces:
        sl = slice(pos, pos + size)
        cut = lambda t: None if t is None else t[:, :, sl]  # noqa: E731
        q, k, v, lr, mom, dec, *gamma = (cut(t) for t in inputs)
        y, state = memory_update(
            q, k, v, lr, mom, dec, state, chunk_size=case.chunk, model=model, read=case.read,
            granularity=case.granularity, omega=gamma[0] if gamma else None,
        )  # fmt: skip
        outs.append(y)
        pos += size
    torch.testing.assert_close(torch.cat(outs, 2), whole, atol=1e-12, rtol=0)
    for a, b in zip(state.weights, final.weights):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "case", [Case(chunk=4, n=41), Case(chunk=4, n=41, norm=False, residual=False, prior=True, cap=0.5)]
)  # the first through autograd (LayerNorm), the second through the hand-written backward
def test_checkpointed_chunks_give_identical_gradients(case):
    inputs, weights, model, leaves = make(case)
    y, _, g = outputs_state_grads(memory_update, case, inputs, weights, model, leaves)
    y2, _, g2 = outputs_state_grads(memory_update, case, inputs, weights, model, leaves, checkpoint_chunks=3)
    torch.testing.assert_close(y2, y, atol=0, rtol=0)
    for a, b in zip(g2, g):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_momentum_and_decay_off_are_truly_off():
    case = Case(momentum=False, decay=False)
    (q, k, v, lr, _, _), weights, model, _ = make(case)
    y, state = run(memory_update, case, (q, k, v, lr, None, None), weights, model)
    assert state.momentum is None
    on = Case()
    (_, _, _, _, mom, dec), *_ = make(on)
    y_on, _ = run(memory_update, on, (q, k, v, lr, mom, dec), weights, model)
    assert (y - y_on).abs().max() > 1e-3
    # alpha = 0 and no momentum is the plain mini-batch rule: check one chunk by hand
    with torch.no_grad():
        zero = torch.zeros_like(lr)
        y_zero_decay, _ = run(memory_update, Case(momentum=False), (q, k, v, lr, None, zero), weights, model)
    torch.testing.assert_close(y_zero_decay, y, atol=1e-12, rtol=0)


def test_rejects_mismatched_gates():
    case = Case()
    (q, k, v, lr, mom, dec), weights, model, _ = make(case)
    state = init_memory_state(weights, q.shape[0], momentum=False)
    with pytest.raises(ValueError, match="momentum"):
        memory_update(q, k, v, lr, mom, dec, state, chunk_size=16, model=model)
    with pytest.raises(ValueError, match="lr must be"):
        memory_update(q, k, v, lr[:, :, :3], None, dec, state, chunk_size=16, model=model)
    with pytest.raises(ValueError, match="chunk_start"):
        memory_update(q, k, v, lr, None, dec, state, chunk_size=16, model=model, granularity="chunk")


def test_state_is_a_plain_dataclass():
    s = MemoryState((torch.zeros(1, 1, 2, 2),))
    assert s.momentum is None and s.offset == 0 and s.anchor is None and s.pending is None


@pytest.mark.parametrize("norm", [True, False])
def test_compiled_step_equals_eager(norm, monkeypatch):
    """torch.compile (CPU inductor here) computes the same outputs and grads: a LayerNorm'd memory
    through autograd of the compiled step, a plain one through ChunkLoop with its step and its
    hand-written backward each compiled (both functions are in the compile cache after one call)."""
    from components.ops.memory import backward, common

    case = Case(chunk=8, n=24, norm=norm, residual=norm, prior=not norm)
    inputs, weights, model, leaves = make(case, dtype=torch.float32)
    y, s, g = outputs_state_grads(memory_update, case, inputs, weights, model, leaves, backend="torch")
    calls, original = [], backward.ChunkLoop.run
    monkeypatch.setattr(backward.ChunkLoop, "run", lambda *a: calls.append(1) or original(*a))
    monkeypatch.setattr(common, "_compiled", {})
    torch._dynamo.reset()  # what the call compiles is counted below
    torch._dynamo.utils.counters.clear()
    torch_path = {"compiled": True, "backend": "torch"}
    y2, s2, g2 = outputs_state_grads(memory_update, case, inputs, weights, model, leaves, **torch_path)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= len(common._compiled), "nothing was compiled"
    assert_rel_close(y2, y, 1e-5, "outputs")
    for a, b in zip(g2, g):
        assert_rel_close(a, b, 1e-4, "gradient")
    names = {name.rsplit(".", 1)[-1] for name in common._compiled}
    assert len(calls) == (0 if norm else 1)
    assert names == ({"chunk_step"} if norm else {"chunk_step", "chunk_backward"}), names


def test_whole_chunks_take_the_hand_written_backward_where_it_applies(monkeypatch):
    """fast == naive holds on either path, so count: with gradients, a memory without LayerNorm
    runs its whole chunks through ChunkLoop (one call), a LayerNorm'd one through autograd; with
    no gradients nothing takes the Function."""
    from components.ops.memory import backward

    calls = []
    original = backward.ChunkLoop.run
    monkeypatch.setattr(backward.ChunkLoop, "run", lambda *a: calls.append(1) or original(*a))
    for case, expected in ((CASES["mlp plain, decay toward the prior, chunk 16"], 1), (Case(), 0)):
        calls.clear()
        inputs, weights, model, leaves = make(case)
        outputs_state_grads(memory_update, case, inputs, weights, model, leaves, backend="torch")
        with torch.no_grad():
            run(memory_update, case, inputs, weights, model, backend="torch")
        assert len(calls) == expected, case


def _objectives() -> dict[str, Objective]:
    """Every member of the spec's objective union at its defaults (a new one is tested here at
    once), and lp below 2 (its curvature grows without bound near a zero error)."""
    from components.objective import ObjectiveSpec
    from titans_nas.config import union_members

    every = {kind: cls().build() for kind, cls in union_members(ObjectiveSpec).items()}
    return every | {"lp 1.5": Objective("lp", p=1.5)}


@pytest.mark.parametrize("name", list(_objectives()))
def test_an_objectives_gradient_and_jacobians_are_its_derivatives(name):
    """grad = d loss / d pred, and jacobians = the (diagonal) derivatives of grad by pred and v,
    against autograd in float64."""
    objective = _objectives()[name]
    g = torch.Generator().manual_seed(3)
    pred, v = (torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    (d_pred,) = torch.autograd.grad(objective.loss(pred, v).sum(), pred, create_graph=True)
    torch.testing.assert_close(objective.grad(pred, v), d_pred, atol=1e-12, rtol=0)
    u = torch.randn(5, 7, generator=g, dtype=torch.float64)
    by_pred, by_v = torch.autograd.grad((objective.grad(pred, v) * u).sum(), (pred, v), allow_unused=True)
    j_pred, j_v = objective.jacobians(pred, v)
    torch.testing.assert_close(j_pred * u if by_pred is not None else by_pred, by_pred, atol=1e-12, rtol=0)
    torch.testing.assert_close(j_v * u, by_v, atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "case", ["lp 3, mlp plain, momentum+decay, chunk 16", "huber 0.3, linear, read chunk_start, chunk 5"]
)
def test_lp_2_and_a_huber_wider_than_every_error_are_l2(case):
    import dataclasses

    base = CASES[case]
    inputs, weights, model, _ = make(base)
    with torch.no_grad():
        l2 = run(memory_update, base, inputs, weights, dataclasses.replace(model, objective=Objective()))[0]
        for same in (Objective("lp", p=2.0), Objective("huber", delta=1e6)):
            y = run(memory_update, base, inputs, weights, dataclasses.replace(model, objective=same))[0]
            torch.testing.assert_close(y, l2, atol=1e-12, rtol=0)
        other = run(memory_update, base, inputs, weights, model)[0]
    assert (other - l2).abs().max() > 1e-3  # and the case's own objective is not l2


def test_the_dot_objective_with_a_linear_memory_and_no_retention_is_linear_attention():
    """-<kM, v> descends to M_t = M_{t-1} + theta_t k_t^T v_t: y_t = q_t (M_0 + sum_{s<=t} theta_s k_s^T v_s)."""
    case = Case(
        depth=1, momentum=False, decay=False, chunk=8, n=27, norm=False, residual=False, objective=Objective("dot")
    )
    (q, k, v, lr, _, _), weights, model, _ = make(case)
    with torch.no_grad():
        y, _ = run(memory_update, case, (q, k, v, lr, None, None), weights, model)
        kv = torch.einsum("bhn,bhni,bhno->bhnio", lr, k, v).cumsum(2)  # sum_{s<=t} theta_s k_s^T v_s
        expected = torch.einsum("bhni,bhnio->bhno", q, weights[0][None, :, None] + kv)
    torch.testing.assert_close(y, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("base", ["mlp plain residual, everything on, chunk 8", "linear online, momentum+decay"])
@pytest.mark.parametrize("name", list(_objectives()))
def test_every_objective_fast_equals_naive_float64(name, base):
    import dataclasses

    objective = _objectives()[name]
    cap = None if objective.kind == "dot" else CASES[base].cap  # the cap needs a loss >= 0
    assert_fast_equals_naive(dataclasses.replace(CASES[base], objective=objective, cap=cap))


@pytest.mark.parametrize(
    "depth, norm, read", [(1, False, "after_update"), (2, False, "after_update"), (2, True, "chunk_start")]
)
def test_keys_wider_than_values_fast_equals_naive_float64(depth, norm, read):
    """Feature-mapped keys (ATLAS's polynomial features) are wider than the values: the memory
    maps d_k = 11 to d_v = 8; fast == naive, streamed in ragged pieces too."""
    g = torch.Generator().manual_seed(5)
    b, h, n, dk, dv = 2, 2, 23, 11, 8
    rnd = lambda *s, scale=1.0: (scale * torch.randn(*s, generator=g, dtype=torch.float64)).requires_grad_()  # noqa: E731
    q, k, v = rnd(b, h, n, dk, scale=0.3), rnd(b, h, n, dk, scale=0.3), rnd(b, h, n, dv)
    widths = [dk] + [16] * (depth - 1) + [dv]
    weights = tuple(rnd(h, a, c, scale=a**-0.5) for a, c in zip(widths[:-1], widths[1:]))
    lr = (0.2 * torch.rand(b, h, n, generator=g, dtype=torch.float64)).requires_grad_()
    mom, dec = (0.5 * torch.rand(b, h, n, generator=g, dtype=torch.float64) for _ in range(2))
    gain_bias = (rnd(h, dv, scale=0.1) + 1, rnd(h, dv, scale=0.1)) if norm else None
    model = MemoryModel("gelu", False, gain_bias, step_cap=0.5)
    leaves = [q, k, v, lr, *weights]
    results = []
    for fn in (memory_update, naive_memory_update):
        state = init_memory_state(weights, b, True)
        y, state = fn(q, k, v, lr, mom, dec, state, chunk_size=5, model=model, read=read)
        assert y.shape == (b, h, n, dv)
        grads = torch.autograd.grad((y * y).sum() + sum((w * w).sum() for w in state.weights), leaves)
        results.append((y, state, grads))
    (y, s, gr), (y0, s0, gr0) = results
    assert_rel_close(y, y0, 1e-9, "outputs")
    for a, c in zip((*s.weights, *gr), (*s0.weights, *gr0)):
        assert_rel_close(a, c, 1e-9, "state or gradient")
    state, outs, pos = init_memory_state(weights, b, True), [], 0
    with torch.no_grad():
        for size in [0, 3, 9, 1, 10]:
            sl = slice(pos, pos + size)
            part, state = memory_update(q[:, :, sl], k[:, :, sl], v[:, :, sl], lr[:, :, sl], mom[:, :, sl],
                                        dec[:, :, sl], state, chunk_size=5, model=model, read=read)  # fmt: skip
            assert part.shape == (b, h, size, dv)
            outs.append(part)
            pos += size
    assert_rel_close(torch.cat(outs, 2), y.detach(), 1e-10, "streamed")


def test_the_omega_window_sums_each_tokens_last_w_gradients():
    """Independent of the band: with one chunk over the whole sequence every gradient u_i is at
    W_0, so an ungated window w with steps theta writes the same final memory as eq. 12's rule
    with theta'_i = sum of theta_t over the tokens t whose window holds i (t = i .. i + w - 1)."""
    w, n = 4, 13
    case = Case(depth=2, momentum=False, decay=False, chunk=16, n=n, norm=False, residual=False, omega=w, gated=False)
    (q, k, v, lr, *_), weights, model, _ = make(case)
    with torch.no_grad():
        _, windowed = run(memory_update, case, (q, k, v, lr, None, None), weights, model)
        summed = torch.stack([lr[:, :, i : i + w].sum(-1) for i in range(n)], -1)
        one = replace(case, omega=1)
        _, plain = run(memory_update, one, (q, k, v, summed, None, None), weights, replace(model, omega_window=1))
        _, unsummed = run(memory_update, one, (q, k, v, lr, None, None), weights, replace(model, omega_window=1))
    for a, b, c in zip(windowed.weights, plain.weights, unsummed.weights):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
        assert (a - c).abs().max() > 1e-3 * c.abs().max()  # the window is not eq. 12's rule


def test_omega_gates_weigh_the_window():
    """gamma picks which of a window's tokens count: w = 2 with gamma 1 on odd tokens only, one
    chunk, so every token's gradient is its odd neighbour's u_{2j+1} at W_0; the final memory is
    then eq. 12's rule with step theta_{2j+1} + theta_{2j+2} on odd tokens and 0 on even ones."""
    n = 12
    case = Case(depth=1, momentum=False, decay=False, chunk=n, n=n, norm=False, residual=False, omega=2)
    (q, k, v, lr, _, _, gamma), weights, model, _ = make(case)
    with torch.no_grad():
        gamma = torch.zeros_like(gamma)
        gamma[:, :, 1::2] = 1.0  # only odd tokens write; token 2j+1's window is {2j, 2j+1}, token 2j+2's {2j+1, 2j+2}
        _, windowed = run(memory_update, case, (q, k, v, lr, None, None, gamma), weights, model)
        steps = torch.zeros_like(lr)
        steps[:, :, 1::2] = lr[:, :, 1::2] + F.pad(lr[:, :, 2::2], (0, 1))  # theta_{2j+1} + theta_{2j+2}
        one = replace(case, omega=1)
        _, plain = run(memory_update, one, (q, k, v, steps, None, None), weights, replace(model, omega_window=1))
    torch.testing.assert_close(windowed.weights[0], plain.weights[0], atol=1e-12, rtol=0)


def test_newton_schulz_keeps_the_singular_vectors_and_pulls_the_values_toward_one():
    """NS_k(G) = U g(Sigma / |G|_F) V^T with g the quintic iterated k times: the singular
    vectors are G's (checked against the SVD in float64), the values land in about [0.68, 1.13]."""
    from components.ops.memory.muon import _NS, newton_schulz

    g = torch.Generator().manual_seed(0)
    for shape in [(8, 16), (16, 8), (12, 12)]:
        G = torch.randn(3, *shape, generator=g, dtype=torch.float64)
        U, sig, Vh = torch.linalg.svd(G, full_matrices=False)
        x = sig / G.pow(2).sum((-2, -1), keepdim=True).add(1e-12).sqrt()[..., 0]
        for _ in range(5):
            x = _NS[0] * x + _NS[1] * x**3 + _NS[2] * x**5
        torch.testing.assert_close(newton_schulz(G, 5), U @ torch.diag_embed(x) @ Vh, atol=1e-10, rtol=0)
        assert x.min() > 0.6 and x.max() < 1.2


def test_muon_moves_every_direction_of_a_write_by_theta():
    """Scale-free writes: two tokens whose gradients differ 1000x in size move a linear memory
    by the same amount under Muon (NS of a rank-1 momentum is its unit direction, up to g(1)),
    by 1000x different amounts under gradient descent."""
    case = Case(depth=1, momentum=False, decay=False, chunk=1, n=1, norm=False, residual=False, muon=5)
    (q, k, v, lr, _, _), weights, model, _ = make(case)
    moves = {}
    with torch.no_grad():
        for scale in (1.0, 1e-3):
            w0 = tuple(w * 0 for w in weights)  # error = -v: the gradient scales with v
            for m in (model, replace(model, muon_steps=None)):
                _, s = run(memory_update, case, (q, k, v * scale, lr, None, None), w0, m)
                moves[scale, m.muon_steps] = s.weights[0].norm()
    torch.testing.assert_close(moves[1.0, 5], moves[1e-3, 5], rtol=1e-6, atol=0)
    torch.testing.assert_close(moves[1.0, None] * 1e-3, moves[1e-3, None], rtol=1e-9, atol=0)


def test_the_l1_retention_sets_small_deviations_exactly_to_the_prior():
    """Elastic net's function, not only its form: after a sequence, a share of the memory's
    entries equals its prior exactly (none does without l1), and a threshold too small to bite
    is the plain rule."""
    case = Case(depth=2, norm=False, residual=False, prior=True, chunk=4, n=32, l1=2e-2)
    inputs, _, model, _ = make(case)
    weights = model.prior  # a memory starting at its prior: every deviation is a write
    with torch.no_grad():
        _, sparse = run(memory_update, case, inputs, weights, model)
        _, dense = run(memory_update, case, inputs, weights, replace(model, l1=None))
        _, tiny = run(memory_update, case, inputs, weights, replace(model, l1=1e-300))
    for w, d, t, p in zip(sparse.weights, dense.weights, tiny.weights, model.prior):
        assert ((w - p) == 0).float().mean() > 0.2
        assert ((d - p) == 0).float().mean() == 0
        torch.testing.assert_close(t, d, atol=1e-15, rtol=0)


@pytest.mark.parametrize(
    "name",
    [
        "channel decay, mlp plain, prior, cap, chunk 5",
        "channel decay, muon 2, prior, chunk 8",
        "channel decay, linear, momentum, chunk 16",
        "channel decay, granularity chunk, prior",
    ],
)  # fmt: skip
def test_a_decay_equal_in_every_channel_is_the_decay_per_token(name):
    """The identity of the per-channel forget gate: every channel at the token's alpha gives the
    per-token rule exactly; another value in one channel of one layer changes that column only."""
    case = CASES[name]
    (q, k, v, lr, mom, dec), weights, model, _ = make(case)
    token = dec[..., 0, 0].detach()  # (b, h, n)
    with torch.no_grad():
        same = token[..., None, None].expand(*dec.shape).clone()
        y_c, s_c = run(memory_update, case, (q, k, v, lr, mom, same), weights, model)
        y_t, s_t = run(memory_update, replace(case, channel_decay=False), (q, k, v, lr, mom, token), weights, model)
        torch.testing.assert_close(y_c, y_t, atol=1e-12, rtol=0)
        for a, b in zip(s_c.weights, s_t.weights):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
        one = same.clone()
        one[..., -1, 3] = 0.5  # the last layer's output channel 3 forgets half per token
        _, s_1 = run(memory_update, case, (q, k, v, lr, mom, one), weights, model)
    last, ref = s_1.weights[-1], s_t.weights[-1]
    assert (last[..., 3] - ref[..., 3]).abs().max() > 1e-2
    others = [j for j in range(last.shape[-1]) if j != 3]
    if len(weights) == 1:  # a linear memory: the other columns do not see channel 3 at all
        torch.testing.assert_close(last[..., others], ref[..., others], atol=1e-12, rtol=0)


def test_the_kl_retention_is_mirror_descent_on_softmax_weights():
    """Memora's rule written out (MIRAS eq. 27) for a linear memory at chunk 1, no momentum: W_t
    = c softmax((1 - alpha_t) log W_{t-1} - theta_t grad_W l_t(W_{t-1})) over each column, from
    W_0 = c softmax(A_0); the op's reads are f_{W_t}(q_t) and its state's softmax is W_t."""
    case = Case(depth=1, momentum=False, chunk=1, n=17, norm=False, residual=False, kl=2.0)
    (q, k, v, lr, _, dec), weights, model, _ = make(case)
    with torch.no_grad():
        y, state = run(memory_update, case, (q, k, v, lr, None, dec), weights, model)
        W = 2.0 * torch.softmax(weights[0].expand(q.shape[0], -1, -1, -1), dim=-2)
        outs = []
        for t in range(case.n):
            err = torch.einsum("bhi,bhio->bho", k[:, :, t], W) - v[:, :, t]
            grad = 2 * k[:, :, t, :, None] * err[..., None, :]  # grad_W ||k W - v||^2
            logits = (1 - dec[:, :, t, None, None]) * W.log() - lr[:, :, t, None, None] * grad
            W = 2.0 * torch.softmax(logits, dim=-2)
            outs.append(torch.einsum("bhi,bhio->bho", q[:, :, t], W))
    torch.testing.assert_close(y, torch.stack(outs, 2), atol=1e-12, rtol=0)
    torch.testing.assert_close(2.0 * torch.softmax(state.weights[0], dim=-2), W, atol=1e-12, rtol=0)


def test_the_lq_retention_normalises_the_weights_and_q_2_is_the_plain_rule():
    """W = A / ||A||_q^(q-2): ||W||_q = ||A||_q^(3-q) for every head and layer (the scale Moneta
    bounds), and q = 2 leaves the memory's weights as they are (the plain rule, exactly)."""
    from components.ops.memory.common import primal

    case = CASES["lq 4, linear, momentum+decay, chunk 16"]
    inputs, weights, model, _ = make(case)
    A = torch.randn(3, 8, 16, dtype=torch.float64)
    (W,) = primal((A,), model)
    norm = lambda t: t.abs().pow(4).sum((-2, -1)) ** 0.25  # noqa: E731
    torch.testing.assert_close(norm(W), norm(A) ** (3 - 4), atol=0, rtol=1e-12)
    with torch.no_grad():
        y2, s2 = run(memory_update, case, inputs, weights, replace(model, lq=2.0))
        y, s = run(memory_update, case, inputs, weights, replace(model, lq=None))
        y4 = run(memory_update, case, inputs, weights, model)[0]
    torch.testing.assert_close(y2, y, atol=1e-12, rtol=0)
    torch.testing.assert_close(s2.weights[0], s.weights[0], atol=1e-12, rtol=0)
    assert (y4 - y).abs().max() > 1e-2 * y.abs().max()
