"""One contract, every block kind (the union is the registry: a new kind is covered here
automatically): builds, forward shape, finite backward, YAML round trip, JSON schema, causality
and streaming == one pass."""

import json

import pytest
import torch

from titans_nas import build_model, dump_spec, load_spec
from titans_nas.config import union_members
from titans_nas.spec import BlockSpec, ModelSpec

KINDS = list(union_members(BlockSpec))


def tiny(kind: str) -> ModelSpec:
    """Every kind has a `<kind>-tiny` preset (this test fails for a kind without one)."""
    return load_spec(f"{kind}-tiny", ["dim=32", "heads=2", "vocab_size=32"])


def tokens(n=75, b=2):
    return torch.randint(0, 32, (b, n), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", KINDS)
def test_contract(kind):
    spec = tiny(kind)
    assert ModelSpec.model_validate_json(spec.model_dump_json()) == spec
    assert kind in json.dumps(ModelSpec.model_json_schema())
    assert dump_spec(spec)
    model = build_model(spec)
    logits, state = model(tokens())
    assert logits.shape == (2, 75, 32) and state is None
    logits.logsumexp(-1).mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("kind", KINDS)
def test_a_model_cast_to_bfloat16_runs_and_streams_on_cpu(kind):
    """`model.to(torch.bfloat16)` without autocast: the memory keeps a float32 state and the
    model matches its float32 twin to bf16 precision, one pass and streamed."""
    exact = build_model(tiny(kind))
    model = build_model(tiny(kind)).to(torch.bfloat16)
    x = tokens()
    logits, _ = model(x)
    assert logits.dtype == torch.bfloat16
    assert (logits.float() - exact(x)[0]).abs().max() < 0.1 * exact(x)[0].abs().max()
    logits.float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    state = model.init_state(2)
    parts = []
    for piece in x.split(25, dim=1):
        out, state = model(piece, state)
        parts.append(out)
    assert (torch.cat(parts, 1).float() - logits.float()).abs().max() < 0.05 * logits.float().abs().max()


@pytest.mark.parametrize("kind", KINDS)
def test_causality_bit_exact(kind):
    model = build_model(tiny(kind))
    x = tokens()
    base, _ = model(x)
    for j in [0, 13, 40, 74]:
        y = x.clone()
        y[:, j] = (y[:, j] + 1) % 32
        out, _ = model(y)
        assert torch.equal(out[:, :j], base[:, :j])


@pytest.mark.parametrize("kind", KINDS)
def test_streaming_equals_one_pass(kind, float64):
    model = build_model(tiny(kind)).double()
    x = tokens()
    whole, _ = model(x)
    g = torch.Generator().manual_seed(sum(map(ord, kind)))
    state, outs, pos = model.init_state(2), [], 0
    while pos < x.shape[1]:
        size = int(torch.randint(1, 12, (1,), generator=g))
        out, state = model(x[:, pos : pos + size], state)
        outs.append(out)
        pos += size
    torch.testing.assert_close(torch.cat(outs, 1), whole, atol=1e-9, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_model_learns(kind):
    """Each kind drives the loss down on a generated task within CI time."""
    from titans_nas.tasks import CopySpec
    from titans_nas.train import TrainSpec, train

    cfg = TrainSpec(steps=60, batch_size=8, lr=3e-3, warmup_steps=6, eval_every=60, eval_batches=1, log_every=5)
    logs = []
    result = train(load_spec(f"{kind}-tiny"), CopySpec(length=8, symbols=8), cfg, on_log=logs.append)
    losses = [r["loss"] for r in logs if r["split"] == "train"]
    assert result.status == "completed"
    assert min(losses[-3:]) < 0.8 * losses[0], f"{kind}: loss {losses[0]:.3f} -> {losses[-3:]}"


def _memory_options() -> dict[str, list[str]]:
    """Every non-default choice of the memory's design axes (MIRAS), as overrides of a tiny preset."""
    from components.feature_map import FeatureMapSpec
    from components.objective import ObjectiveSpec
    from components.optimizer import InnerOptimizerSpec

    options = {}
    for kind in union_members(ObjectiveSpec):
        if kind != "l2":  # the default: every other test runs it
            cap = ["block.memory.lr.curvature_cap=null"] if kind == "dot" else []  # dot refuses the cap
            options[f"objective {kind}"] = [f"block.memory.objective.kind={kind}", *cap]
    for kind in union_members(FeatureMapSpec):  # identity (null) is the default
        options[f"feature map {kind}"] = [f"block.memory.feature_map.kind={kind}"]
    for kind in union_members(InnerOptimizerSpec):
        if kind != "gd":  # Muon refuses the step cap
            options[f"optimizer {kind}"] = [f"block.memory.optimizer.kind={kind}", "block.memory.lr.curvature_cap=null"]
    options["omega window 3"] = ["block.memory.omega.window=3"]
    options["decay per channel"] = ["block.memory.decay.per=channel"]
    from components.retention import RetentionSpec

    for kind in union_members(RetentionSpec):  # the forget gate alone (null) is the default
        options[f"retention {kind}"] = [f"block.memory.retention.kind={kind}"]
    options["retention elastic_net"].append("block.memory.retention.l1=0.01")  # the default 1e-4 is too small to see
    return options


MEMORY_KINDS = [k for k, cls in union_members(BlockSpec).items() if "memory" in cls.model_fields]


@pytest.mark.parametrize("option", list(_memory_options()))
@pytest.mark.parametrize("kind", MEMORY_KINDS)
def test_every_memory_option_is_causal_and_streams_in_every_kind(kind, option, float64):
    spec = load_spec(f"{kind}-tiny", ["dim=32", "heads=2", "vocab_size=32", *_memory_options()[option]])
    model = build_model(spec).double()
    x = tokens(n=41)
    whole, _ = model(x)
    default, _ = build_model(tiny(kind)).double()(x)
    assert (whole - default).abs().max() > 1e-6  # the option is in effect
    for j in [0, 17, 40]:
        y = x.clone()
        y[:, j] = (y[:, j] + 1) % 32
        assert torch.equal(model(y)[0][:, :j], whole[:, :j])
    state, outs = model.init_state(2), []
    for piece in x.split([7, 1, 20, 13], dim=1):
        out, state = model(piece, state)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 1), whole, atol=1e-9, rtol=0)
