"""The Triton kernels of the memory (components/ops/memory/triton_*.py) against the naive
reference, on CPU through Triton's interpreter (TRITON_INTERPRET=1, set before triton is
imported): float32, small sizes, outputs, final state and every gradient; and the same kernels
compiled for an H100 (sm_90) by Triton's own compiler, which needs no GPU."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)

from components.ops.memory import memory_update  # noqa: E402
from tests.components.test_memory_op import (  # noqa: E402
    Case,
    as_dtype,
    assert_kernel_equals_naive,
    assert_rel_close,
    make,
    outputs_state_grads,
)

CASES = {
    "momentum, decay toward the prior, cap": Case(
        depth=1, chunk=16, n=48, norm=False, residual=False, prior=True, cap=0.5
    ),
    "plain, no momentum, no decay": Case(
        depth=1, momentum=False, decay=False, chunk=16, n=32, norm=False, residual=False
    ),
    "momentum + decay to zero, residual, ragged": Case(depth=1, chunk=16, n=37, norm=False, residual=True),
    "mlp, momentum, decay toward the prior, cap, per-layer lr": Case(
        chunk=16, n=48, norm=False, residual=False, prior=True, cap=0.5, per_layer_lr=True
    ),
    "mlp silu, residual, no momentum, decay to zero, ragged": Case(
        act="silu", chunk=16, n=37, norm=False, residual=True, momentum=False
    ),
    "mlp, everything off but the step": Case(chunk=16, n=32, norm=False, residual=False, momentum=False, decay=False),
    # momentum gates in [0.97, 0.988]: chunk j's momentum reaches chunk j + 1 (m_c ~ 0.7), so the
    # backward's carry of d S across chunks is checked (with gates below 0.6 it is ~1e-8)
    "linear, momentum that outlives a chunk": Case(
        depth=1, chunk=16, n=48, norm=False, residual=False, decay=False, eta_floor=0.97
    ),
    "mlp, momentum that outlives a chunk, cap": Case(
        chunk=16, n=48, norm=False, residual=False, decay=False, cap=0.5, eta_floor=0.97
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_triton_kernel_equals_naive(name):
    """Head dim 32 and hidden 64: two column tiles of the linear memory's states and four hidden
    tiles of the MLP's (tiles of 16), so a tile's offsets and the sums over tiles are checked."""
    assert_kernel_equals_naive(CASES[name], "triton", d=32, e=64)


def test_triton_backend_refuses_what_it_does_not_cover():
    case = Case(depth=3, chunk=16, n=32, norm=False, residual=False)
    inputs, weights, model, _ = make(case, dtype=torch.float32, d=16)
    with pytest.raises(ValueError, match="linear memory"):
        outputs_state_grads(memory_update, case, inputs, weights, model, [inputs[0]], backend="triton")


@pytest.mark.parametrize("memory", ["linear", "mlp"])
def test_a_model_with_the_triton_backend_trains_like_torch(memory):
    """An LMM (head dim 16, chunk 16; the MLP 16 -> 64 -> 16): the Triton backend gives the
    torch backend's loss and gradients (float32, 1e-4)."""
    from titans_nas import build_model, load_spec

    over = ["depth=1", "dim=32", "heads=2", "vocab_size=32", f"block.memory.model.kind={memory}"]
    over += ["block.memory.chunk_size=16"]
    x = torch.randint(0, 32, (2, 41), generator=torch.Generator().manual_seed(0))
    grads = {}
    for backend in ("torch", "triton"):
        model = build_model(load_spec("lmm-tiny", [*over, f"block.memory.backend={backend}"]))
        logits = model(x[:, :-1])[0]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        grads[backend] = (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    (l0, g0), (l1, g1) = grads["torch"], grads["triton"]
    torch.testing.assert_close(l1, l0, atol=1e-5, rtol=1e-5)
    assert g0.keys() == g1.keys()
    for name in g0:
        assert_rel_close(g1[name], g0[name], 1e-4, name)


def test_the_spec_refuses_triton_where_the_kernel_does_not_reach():
    from titans_nas import load_spec
    from titans_nas.config import SpecError

    with pytest.raises(SpecError, match="2-layer MLP"):
        load_spec("lmm-tiny", ["dim=32", "block.memory.model.depth=3", "block.memory.backend=triton"])
    with pytest.raises(SpecError, match="powers of two"):
        load_spec("lmm-tiny", ["dim=32", "block.memory.model.kind=linear", "block.memory.chunk_size=8",
                               "block.memory.backend=triton"])  # fmt: skip


def test_auto_takes_the_kernels_up_to_the_sizes_that_compile_for_sm90():
    from components.ops.memory.triton_loop import chosen_by_auto

    assert chosen_by_auto((torch.zeros(1, 64, 256), torch.zeros(1, 256, 64)), 16)  # the paper's memory
    assert chosen_by_auto((torch.zeros(1, 64, 64),), 64)
    assert not chosen_by_auto((torch.zeros(1, 64, 64),), 128)
    assert not chosen_by_auto((torch.zeros(1, 128, 128),), 16)
    assert not chosen_by_auto((torch.zeros(1, 64, 512), torch.zeros(1, 512, 64)), 16)


def test_the_kernels_compile_for_sm90_within_its_shared_memory(tmp_path):
    """Every launch of both kernel sets, compiled for an H100 by Triton down to the cubin (its
    own ptxas; no GPU needed) at the largest sizes `auto` hands them (chunk 64, head dim 64,
    hidden 256, every mechanism on): each compiles, and each block asks for at most the 227 KB
    of shared memory an sm_90 block may have (more fails at launch; the untiled kernels asked
    for 330 KB, and the MLP kernel did not finish compiling in 15 minutes)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"PYTHONPATH": str(root), "TRITON_ALWAYS_COMPILE": "0"}  # shared memory is in the cache's metadata
    run = subprocess.run(
        [sys.executable, "bench/triton_sm90.py", "--out", str(tmp_path / "sm90.jsonl")],
        cwd=root, env=env, capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    if "No module named 'triton.backends.nvidia'" in run.stderr:
        pytest.skip("this triton has no NVIDIA backend")
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    assert len(lines) == 11
    assert (tmp_path / "sm90.jsonl").read_text().splitlines() == run.stdout.splitlines()  # --out keeps them
    for line in lines:
        assert "error" not in line, line
        assert line["shared_bytes"] <= line["shared_limit"], line


@pytest.mark.parametrize(
    "name", ["mlp, momentum, decay toward the prior, cap, per-layer lr", "momentum, decay toward the prior, cap"]
)
def test_the_state_a_call_returns_holds_no_chunk_slots(name):
    """The kernels keep every chunk's start state for the backward; the end state returned (which
    a stream carries from call to call) must not be a view that keeps those slots alive."""
    case = CASES[name]
    inputs, weights, model, leaves = as_dtype(torch.float32, *make(case, d=16)[:3])
    state = outputs_state_grads(memory_update, case, inputs, weights, model, leaves, backend="triton")[1]
    for w in state.weights + state.momentum:
        assert w.untyped_storage().nbytes() == w.numel() * w.element_size()


def test_backend_triton_runs_the_kernels_and_torch_does_not(monkeypatch):
    """The equality tests above would also pass if `triton` quietly ran torch: count launches."""
    from components.ops.memory import triton_loop

    launches = []
    run = triton_loop.TritonLoop.run
    monkeypatch.setattr(triton_loop.TritonLoop, "run", lambda *a: launches.append(1) or run(*a))
    case = CASES["mlp, momentum, decay toward the prior, cap, per-layer lr"]
    inputs, weights, model, leaves = as_dtype(torch.float32, *make(case, d=16)[:3])
    for backend, expected in (("torch", 0), ("triton", 1)):
        launches.clear()
        outputs_state_grads(memory_update, case, inputs, weights, model, leaves, backend=backend)
        assert len(launches) == expected, backend
