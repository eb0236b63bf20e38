"""Every task generator: shapes, the answer is recoverable from the input, seeds reproduce, the
metric is perfect on the ground truth and near chance on random predictions."""

import math

import pytest
import torch

from titans_nas.config import union_members
from titans_nas.tasks import (
    IGNORE,
    CompressionSpec,
    CopySpec,
    InductionSpec,
    LMSpec,
    MemorizationSpec,
    MQARSpec,
    NIAHSpec,
    RecallSpec,
    SelectiveCopySpec,
    TaskSpec,
)

SMALL = {
    "mqar": MQARSpec(seq_len=64, num_kv_pairs=8, vocab=128),
    "niah-passkey": NIAHSpec(variant="passkey", context_len=256),
    "niah-number": NIAHSpec(variant="number", context_len=300, depth=0.3),
    "niah-uuid": NIAHSpec(variant="uuid", context_len=400),
    "selective_copy": SelectiveCopySpec(length=40, num_tokens=6, vocab=10),
    "induction": InductionSpec(seq_len=32, vocab=8),
    "lm": LMSpec(seq_len=64),
    "copy": CopySpec(length=8, symbols=8),
    "recall": RecallSpec(seq_len=64),
    "recall-noisy": RecallSpec(seq_len=64, vocab=32, noise=0.2, noise_vocab=16),
    "recall-fuzzy": RecallSpec(seq_len=64, key_len=3, value_len=3),
    "memorization": MemorizationSpec(seq_len=32, vocab=64),
    "compression": CompressionSpec(seq_len=16, vocab=16),
}


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_every_task_kind_is_covered():
    assert {name.split("-")[0] for name in SMALL} == set(union_members(TaskSpec))


@pytest.mark.parametrize("name", list(SMALL))
def test_shapes_vocab_and_seeds(name):
    task = SMALL[name]
    a, b, c = task.sample(4, gen(0)), task.sample(4, gen(0)), task.sample(4, gen(1))
    assert task.sample(4, gen(0), "eval").inputs.shape[0] == 4  # every task takes the split (evaluation)
    assert a.inputs.shape == a.targets.shape and a.inputs.dtype == a.targets.dtype == torch.long
    assert 0 <= int(a.inputs.min()) and int(a.inputs.max()) < task.vocab_size
    scored = a.targets[a.targets != IGNORE]
    assert scored.numel() > 0 and int(scored.max()) < task.vocab_size
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.inputs, c.inputs)


@pytest.mark.parametrize("name", list(SMALL))
def test_metric_is_perfect_on_the_truth_and_near_chance_at_random(name):
    task = SMALL[name]
    batch = task.sample(64, gen(2))
    truth = torch.full((*batch.targets.shape, task.vocab_size), -30.0)
    ok = batch.targets != IGNORE
    truth[ok] = torch.nn.functional.one_hot(batch.targets[ok], task.vocab_size).float() * 60 - 30
    random = torch.randn(*batch.targets.shape, task.vocab_size, generator=gen(3))
    best, chance = task.score(truth, batch), task.score(random, batch)
    metric = type(task).metric
    value = lambda s: s[metric][0] / s[metric][1]  # noqa: E731
    if metric == "bits_per_byte":
        assert value(best) < 1e-6
        assert abs(value(chance) - math.log2(256)) < 1.5  # random logits ~ uniform over bytes
    else:
        assert value(best) == 1.0
        assert value(chance) < 0.2


def test_mqar_answer_is_the_value_paired_with_the_queried_key():
    task = SMALL["mqar"]
    batch = task.sample(8, gen(4))
    kv = task.num_kv_pairs
    for row in range(8):
        # the example is inputs plus the last target; its first 2 kv tokens are the pairs
        pairs = batch.inputs[row, : 2 * kv].view(kv, 2)
        lookup = dict(zip(pairs[:, 0].tolist(), pairs[:, 1].tolist()))
        positions = (batch.targets[row] != IGNORE).nonzero().flatten()
        assert len(positions) == kv  # every key queried once
        for t in positions.tolist():
            assert lookup[int(batch.inputs[row, t])] == int(batch.targets[row, t])


@pytest.mark.parametrize("name", ["niah-passkey", "niah-number", "niah-uuid"])
def test_niah_answer_is_in_the_needle(name):
    task = SMALL[name]
    batch = task.sample(6, gen(5))
    for row in range(6):
        text = bytes(batch.inputs[row].tolist())
        answer = bytes(batch.targets[row][batch.targets[row] != IGNORE].tolist())
        needle_at = text.find(b"One of the special magic")
        assert needle_at >= 0 and text.find(answer[:-1], needle_at) > needle_at
        assert len(text) + 1 == task.context_len


def test_niah_depth_places_the_needle():
    early, late = NIAHSpec(context_len=1024, depth=0.0), NIAHSpec(context_len=1024, depth=1.0)
    pos = lambda t: bytes(t.sample(1, gen(6)).inputs[0].tolist()).find(b"One of the special")  # noqa: E731
    assert pos(early) < 100 < 800 < pos(late)


def test_selective_copy_targets_are_the_data_tokens_in_order():
    task = SMALL["selective_copy"]
    batch = task.sample(5, gen(7))
    body = batch.inputs[:, : task.length + task.num_tokens]
    for row in range(5):
        data = body[row][body[row] != 0]
        assert torch.equal(data, batch.targets[row][batch.targets[row] != IGNORE])


def test_induction_target_follows_the_first_trigger():
    task = SMALL["induction"]
    batch = task.sample(5, gen(8))
    for row in range(5):
        x = batch.inputs[row]
        first = int((x == task.vocab - 1).nonzero()[0])
        assert int(batch.targets[row, -1]) == int(x[first + 1])


def test_lm_splits_are_disjoint_documents():
    from titans_nas.tasks.text import split_names

    train, val = split_names("shakespeare", "train"), split_names("shakespeare", "eval")
    assert len(val) == 4 and not set(train) & set(val) and len(train) + len(val) == 42
    batch = SMALL["lm"].sample(2, gen(9))
    assert torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1])


def _probe(task, row_inputs, row_targets, scored):
    """(body, probe key, probe value) of one recall row: the body ends at the copy prefix."""
    seq = row_inputs.tolist() + [int(row_targets[-1])]
    at = max(i for i, t in enumerate(seq) if t == task.vocab - 1)
    value_len = int(scored.sum())
    return seq[:at], seq[at + 1 : len(seq) - value_len], seq[len(seq) - value_len :]


@pytest.mark.parametrize("name", ["recall", "recall-noisy", "recall-fuzzy"])
@pytest.mark.parametrize("split", ["train", "eval"])
def test_recall_probe_value_is_the_one_paired_with_its_key_in_the_context(name, split):
    task = SMALL[name]
    batch = task.sample(16, gen(5), split)
    half = (task.vocab - 2 - task.noise_vocab) // 2
    for x, y, m in zip(batch.inputs, batch.targets, batch.scored):
        body, key, value = _probe(task, x, y, m)
        assert all(k < half for k in key) and all(half <= v < 2 * half for v in value)
        pair = key + value
        assert any(body[i : i + len(pair)] == pair for i in range(len(body))), "the probe's pair is not in the context"
        if split == "eval":
            assert len(key) == task.key_len  # MAD evaluates at the longest keys
            assert (y != IGNORE).sum() == len(value)  # only the probe is scored and targeted
        if task.key_len == task.value_len == 1:  # every occurrence of a key carries one value
            pairs = {(a, b) for a, b in zip(body, body[1:]) if a < half and half <= b < 2 * half}
            assert len({a for a, _ in pairs}) == len(pairs)


def test_noisy_recall_has_noise_ids_and_plain_recall_none():
    noisy, plain = SMALL["recall-noisy"].sample(16, gen(6)), SMALL["recall"].sample(16, gen(6))
    lo = 2 * ((32 - 2 - 16) // 2)
    assert ((noisy.inputs >= lo) & (noisy.inputs < lo + 16)).any()
    assert set(plain.inputs.unique().tolist()) <= set(range(14)) | {14, 15}  # keys, values, pad, prefix


def test_memorization_shares_one_bijective_mapping_across_sequences_and_seeds():
    task = SMALL["memorization"]
    seen: dict[int, int] = {}
    for seed in range(3):
        b = task.sample(8, gen(seed), "eval" if seed else "train")
        keys, values = b.inputs[:, 0::2].flatten().tolist(), b.targets[:, 1::2].flatten().tolist()
        assert set(b.inputs[:, 1::2].flatten().tolist()) == {task.vocab - 1}
        for k, v in zip(keys, values):
            assert seen.setdefault(k, v) == v
    assert len(set(seen.values())) == len(seen)  # injective
    other = MemorizationSpec(seq_len=32, vocab=64, map_seed=1).mapping()
    assert not torch.equal(other, task.mapping())


def test_compression_asks_for_the_whole_sequence_back_after_its_compression_token():
    task = SMALL["compression"]
    batch = task.sample(8, gen(0))
    assert (batch.inputs[:, -1] == task.vocab - 1).all() and (batch.inputs[:, :-1] < task.vocab - 1).all()
    assert torch.equal(batch.targets, batch.inputs)  # every position rebuilt, none skipped


def test_the_compression_decoder_reads_the_last_position_only():
    head = SMALL["compression"].readout(8)
    features = torch.randn(3, 16, 8, generator=gen(0))
    earlier, last = features.clone(), features.clone()
    earlier[:, :-1] += torch.randn(3, 15, 8, generator=gen(1))
    last[:, -1] += 1.0
    assert head(features).shape == (3, 16, 16)
    assert torch.equal(head(earlier), head(features))  # one vector is all it gets
    assert not torch.allclose(head(last), head(features))
    logits = head(features)
    assert not torch.allclose(logits[:, 0], logits[:, 1])  # positions are told apart
