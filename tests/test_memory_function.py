"""The memory carries information in every kind that has one (function tests: each fails when a
memory stops carrying content, e.g. MAG reading only W_0 or MAC never refreshing the weights
its memory tokens are read from), and a memory kind out-learns sliding-window attention on
retrieval beyond the window."""

import pytest
import torch

from components.mac import MACSpec
from titans_nas import build_model, load_spec
from titans_nas.config import union_members
from titans_nas.spec import BlockSpec

KINDS = list(union_members(BlockSpec))
MEMORY_KINDS = [k for k, cls in union_members(BlockSpec).items() if "memory" in cls.model_fields]


def test_memory_kinds_are_the_titans_kinds():
    assert sorted(MEMORY_KINDS) == ["lmm", "mac", "mag", "mal"]


@pytest.mark.parametrize("kind", [*MEMORY_KINDS, "swa"])
def test_a_token_beyond_the_window_reaches_the_last_output_only_through_memory(kind, float64):
    """One block, window 16 / segment 32, 64 tokens: token 0 is out of every attention's reach
    at position 63. It changes the last logits of every memory kind, and not at all in swa."""
    model = build_model(load_spec(f"{kind}-tiny", ["depth=1", "vocab_size=32"])).double()
    x = torch.randint(1, 32, (2, 64), generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[:, 0] = 0
    a, b = model(x)[0][:, -1], model(y)[0][:, -1]
    if kind == "swa":
        assert torch.equal(a, b)
    else:
        assert (a - b).abs().max() > 1e-6 * a.abs().max(), f"{kind}: the last output ignores token 0"


def test_mac_memory_tokens_carry_earlier_segments_into_attention():
    """MAC's h (eq. 21) of a segment is read from the memory as the previous segments left it:
    changing segment 0 changes the memory tokens of segment 2, whose queries (short conv of 4
    included) see nothing of segment 0 but the memory."""
    spec = MACSpec(segment_len=8, memory={"chunk_size": 8}, persistent={"num_tokens": 2})
    torch.manual_seed(0)
    mac = spec.build(16, 2).double()
    seen = []
    mac.norm_retrieved.register_forward_hook(lambda _m, _i, out: seen.append(out.detach()))
    x = torch.randn(1, 24, 16, dtype=torch.float64)
    mac(x)
    base, seen[:] = list(seen), []
    x2 = x.clone()
    x2[:, :8] += torch.randn(1, 8, 16, dtype=torch.float64)
    mac(x2)
    assert len(base) == len(seen) == 3
    assert (base[2] - seen[2]).abs().max() > 1e-3, "segment 2's memory tokens ignore segment 0"


def _mqar_accuracy(kind: str) -> float:
    """MQAR with 4 pairs spread over 64 tokens, window / segment 8: most queries are beyond
    every attention's reach, so only a memory can answer them. 300 steps, one block, dim 32."""
    from titans_nas.tasks.mqar import MQARSpec
    from titans_nas.train import TrainSpec, train

    task = MQARSpec(seq_len=64, num_kv_pairs=4, vocab=32, power_a=1.0)
    cfg = TrainSpec(steps=300, batch_size=16, lr=5e-3, warmup_steps=20, eval_every=300, eval_batches=4)
    over = ["depth=1", "dim=32", f"vocab_size={task.vocab_size}"]
    over += {"mac": ["block.segment_len=8"], "lmm": []}.get(kind, ["block.window=8"])
    if kind != "swa":
        over += ["block.memory.chunk_size=4"]
    result = train(load_spec(f"{kind}-tiny", over), task, cfg)
    assert result.status == "completed"
    return result.metrics["accuracy"]


@pytest.fixture(scope="module")
def swa_mqar_accuracy() -> float:
    return _mqar_accuracy("swa")


@pytest.mark.parametrize("kind", MEMORY_KINDS)
def test_a_memory_kind_out_learns_swa_beyond_the_window(kind, swa_mqar_accuracy):
    """Measured (seed 0): swa 0.082 (chance 1/16), lmm 0.266, mag 0.305, mac 0.316, mal 0.543;
    over seeds 0-3 the lowest memory kind was mag at 0.180 and swa at most 0.082. (At lr 1e-2
    the outcome swung with float32 rounding: lmm 0.47 or 0.11 on the same seed, from gradients
    equal to 1e-5; lr 5e-3 keeps every seed well clear of the bound.) A memory that carries
    nothing stays at swa's level."""
    acc = _mqar_accuracy(kind)
    assert acc > 2 * swa_mqar_accuracy and acc > swa_mqar_accuracy + 0.08, (
        f"{kind} {acc:.3f} vs swa {swa_mqar_accuracy:.3f}"
    )
