"""One contract, every block kind (the union is the registry: a new kind is covered here
automatically): builds, forward shape, finite backward, YAML round trip, JSON schema, causality
and streaming == one pass."""

import json

import pytest
import torch

from titans_nas import build_model, dump_spec
from titans_nas.config import union_members, validate
from titans_nas.spec import BlockSpec, ModelSpec

KINDS = list(union_members(BlockSpec))


def tiny(kind: str, **block) -> ModelSpec:
    return validate({"vocab_size": 32, "dim": 32, "depth": 2, "heads": 2, "block": {"kind": kind, **block}}, ModelSpec)


def tokens(n=41, b=2):
    return torch.randint(0, 32, (b, n), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", KINDS)
def test_contract(kind):
    spec = tiny(kind)
    assert ModelSpec.model_validate_json(spec.model_dump_json()) == spec
    assert kind in json.dumps(ModelSpec.model_json_schema())
    assert dump_spec(spec)
    model = build_model(spec)
    logits, state = model(tokens())
    assert logits.shape == (2, 41, 32) and state is None
    logits.logsumexp(-1).mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("kind", KINDS)
def test_causality_bit_exact(kind):
    model = build_model(tiny(kind))
    x = tokens()
    base, _ = model(x)
    for j in [0, 13, 40]:
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
        out, state = model(x[:, pos:pos + size], state)
        outs.append(out)
        pos += size
    torch.testing.assert_close(torch.cat(outs, 1), whole, atol=1e-9, rtol=0)
