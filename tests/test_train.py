"""Training: the loss falls on a generated task within a few hundred CPU steps."""

import math

import pytest

from titans_nas import load_spec
from titans_nas.tasks import CopySpec
from titans_nas.train import TrainSpec, lr_at, train


def test_loss_decreases_on_copy_task():
    cfg = TrainSpec(steps=150, batch_size=16, lr=3e-3, warmup_steps=15, eval_every=150, eval_batches=2)
    task = CopySpec(length=8, symbols=16)
    logs = []
    result = train(load_spec("attention-tiny"), task, cfg, on_log=logs.append)
    train_losses = [r["loss"] for r in logs if r["split"] == "train"]
    assert result.status == "completed"
    assert train_losses[-1] < 0.3 * train_losses[0]
    assert result.metrics["accuracy"] > 0.9


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainSpec(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == 0.1 and lr_at(9, cfg) == 1.0
    assert abs(lr_at(100, cfg) - 0.1) < 1e-12
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 100))


def test_resume_continues_exactly(tmp_path):
    """Train N steps, stop, resume to 2N == train 2N straight."""
    spec = load_spec("lmm-tiny")
    task = CopySpec(length=8, symbols=8)
    cfg = TrainSpec(steps=12, batch_size=4, warmup_steps=3, eval_every=4, eval_batches=1, log_every=2)
    straight = train(spec, task, cfg, tmp_path / "straight")
    first = train(spec, task, cfg, tmp_path / "resumed", stop_after=6)
    assert first.status == "stopped" and first.step == 6
    logged = []
    second = train(spec, task, cfg, tmp_path / "resumed", resume=True, on_log=lambda r: logged.append(r["step"]))
    assert second.status == "completed" and second.step == 12
    assert min(logged) > 6  # continued from the checkpoint: no step of the first session trained again
    assert second.metrics["loss"] == pytest.approx(straight.metrics["loss"], rel=1e-6, abs=1e-7)
    import json

    lines = lambda d: [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    a = [r["loss"] for r in lines("straight") if r["split"] == "train"]
    b = [r["loss"] for r in lines("resumed") if r["split"] == "train"]
    assert b == pytest.approx(a, rel=1e-6, abs=1e-7)


def test_absurd_learning_rate_ends_as_diverged_with_metrics_kept(tmp_path, capsys):
    from titans_nas.cli import main

    out = tmp_path / "run"
    code = main(["train", "attention-tiny", "--task", "copy", "--lr", "1e30", "--steps", "50", "--out", str(out)])
    assert code == 3
    assert "diverged" in capsys.readouterr().err
    import json

    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert records and records[-1]["status"] == "diverged"
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "diverged" and "non-finite" in result["message"]


def test_weight_decay_hits_linear_weights_only():
    """Decay by role: every linear map's weight, nothing else (not the memory's W_0, norms, gate
    biases, conv filters, persistent tokens or the embedding)."""
    import torch

    from titans_nas import build_model
    from titans_nas.train import decayed_parameters, make_optimizer

    model = build_model(load_spec("mac-tiny"))
    decayed = {n for n in decayed_parameters(model) if n.startswith("blocks.0.")} | (
        {"head.weight"} & set(decayed_parameters(model))
    )
    assert decayed == {
        "head.weight",
        "blocks.0.mixer.attention.qkv.weight",
        "blocks.0.mixer.attention.out.weight",
        "blocks.0.mixer.memory.gates.proj.weight",
        "blocks.0.mixer.memory.out_gate.proj.weight",
        "blocks.0.mixer.memory.qkv.weight",
        "blocks.0.mixer.memory.out.weight",
        "blocks.0.mlp.gate_up.weight",
        "blocks.0.mlp.down.weight",
    }
    opt = make_optimizer(model, TrainSpec(weight_decay=0.1))
    by_group = {g["weight_decay"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    names = {id(p): n for n, p in model.named_parameters()}
    kept = {names[i] for i in by_group[0.0]}
    for spared in (
        "embedding.weight",
        "blocks.0.mixer.memory.net.initial.0",
        "blocks.0.mixer.memory.gates.proj.bias",
        "blocks.0.mixer.memory.conv.weight",
        "blocks.0.mixer.persistent.tokens",
        "blocks.0.mixer.norm.weight",
        "blocks.0.norm_mixer.weight",
    ):
        assert spared in kept
    assert {names[i] for i in by_group[0.1]} == set(decayed_parameters(model))
    assert sum(len(g) for g in by_group.values()) == len(list(model.parameters()))
    assert isinstance(opt, torch.optim.AdamW)


def test_evaluations_record_memory_health_per_block(tmp_path):
    """Surprise, gates and weight norms of every block's memory, pre-clip gradient norms."""
    import json

    cfg = TrainSpec(steps=4, batch_size=2, warmup_steps=1, eval_every=2, eval_batches=1, log_every=2)
    train(load_spec("mac-tiny"), CopySpec(length=8, symbols=8), cfg, tmp_path / "mac")
    records = [json.loads(x) for x in (tmp_path / "mac" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["split"] == "eval"]
    for block in (0, 1):
        for name in ("surprise", "surprise_start", "surprise_end", "theta", "eta", "alpha", "w_norm"):
            assert all(math.isfinite(r[f"block.{block}.{name}"]) for r in evals), name
        assert all(r[f"block.{block}.grad_norm"] > 0 for r in records if r["split"] == "train")
    assert all(r["grad_norm_max"] >= r["grad_norm"] > 0 for r in evals)
    train(load_spec("swa-tiny"), CopySpec(length=8, symbols=8), cfg, tmp_path / "swa")
    swa = [json.loads(x) for x in (tmp_path / "swa" / "metrics.jsonl").read_text().splitlines()]
    assert not any(k.endswith("surprise") for r in swa for k in r)


def test_a_curriculum_trains_its_first_steps_on_the_changed_task_and_resumes_exactly(tmp_path):
    """Same seed, same steps: a curriculum that changes nothing equals none; one that changes the
    task trains other weights; stopped inside its phase and resumed, it equals the straight run."""
    import torch
    from safetensors.torch import load_file

    from titans_nas.train import CurriculumSpec

    spec, task = load_spec("lmm-tiny"), CopySpec(length=4, symbols=8)
    cfg = TrainSpec(steps=6, batch_size=4, warmup_steps=1, eval_every=6, eval_batches=1, log_every=2)

    def weights(run: str, curriculum: CurriculumSpec | None, stop_after: int | None = None) -> dict:
        c = cfg.model_copy(update={"curriculum": curriculum})
        train(spec, task, c, tmp_path / run, stop_after=stop_after)
        if stop_after is not None:
            train(spec, task, c, tmp_path / run, resume=True)
        return load_file(tmp_path / run / "checkpoint" / "model.safetensors")

    def same(a: dict, b: dict) -> bool:
        return all(torch.equal(a[k], b[k]) for k in a)

    plain = weights("plain", None)
    assert same(plain, weights("no-op", CurriculumSpec(steps=3, task={"length": 4})))
    longer = weights("longer", CurriculumSpec(steps=3, task={"length": 6}))
    assert not same(plain, longer)
    assert same(longer, weights("resumed", CurriculumSpec(steps=3, task={"length": 6}), stop_after=2))


@pytest.mark.parametrize(
    ("curriculum", "path", "reason"),
    [
        ({"steps": 2, "task": {"lenght": 6}}, "train.curriculum.task.lenght", "Extra inputs"),
        ({"steps": 2, "task": {"kind": "mqar"}}, "train.curriculum.task.kind", "not its kind"),
        ({"steps": 2, "task": {"symbols": 12}}, "train.curriculum.task", "changes the vocabulary"),
        ({"steps": 6, "task": {"length": 6}}, "train.curriculum.steps", "leaves none"),
    ],
)
def test_a_curriculum_that_cannot_apply_is_refused_with_its_path(tmp_path, curriculum, path, reason):
    from tests.search.conftest import TINY_TRAIN, write_study
    from titans_nas.config import SpecError
    from titans_nas.search.study import load_study

    ablation = {"kind": "ablation", "tasks": {"copy": {"kind": "copy", "length": 4, "symbols": 8}},
                "variants": {"base": []}, "baseline": "base"}  # fmt: skip
    studies = [  # a search's train, an ablation's train, and one task's task_train
        ("train.", {"space": {"lr": {"choice": [0.001]}}, "train": {**TINY_TRAIN, "curriculum": curriculum}}),
        ("train.", {**ablation, "train": {**TINY_TRAIN, "curriculum": curriculum}}),
        ("task_train.copy.", {**ablation, "train": TINY_TRAIN, "task_train": {"copy": {"curriculum": curriculum}}}),
    ]
    for i, (prefix, fields) in enumerate(studies):
        (tmp_path / str(i)).mkdir()
        with pytest.raises(SpecError) as err:
            load_study(write_study(tmp_path / str(i), **fields))
        assert err.value.path == prefix + path.removeprefix("train.") and reason in err.value.reason, str(err.value)


def test_records_carry_the_measured_throughput(tmp_path):
    """tokens/s (what studies and benchmarks compare) is measured, not a constant, in the train
    and eval records and the result."""
    cfg = TrainSpec(steps=4, batch_size=4, warmup_steps=1, eval_every=2, eval_batches=1, log_every=1)
    result = train(load_spec("lmm-tiny"), CopySpec(length=8, symbols=8), cfg, tmp_path / "run")
    import json

    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {r["split"] for r in records} == {"train", "eval"}
    assert all(r["tokens_per_s"] > 0 for r in records) and result.metrics["tokens_per_s"] > 0


def test_a_step_on_few_trained_positions_heads_them_alone_with_the_same_loss_and_gradients():
    """MQAR trains 4 of 63 positions: `train_step` calls the model with those positions, and its
    loss and every parameter's gradient equal the full logits' with ignore_index (float64)."""
    import torch

    from titans_nas.builder import build_model
    from titans_nas.tasks import MQARSpec
    from titans_nas.train import IGNORE, loss_fn, make_optimizer, train_step

    task = MQARSpec(seq_len=64, num_kv_pairs=4, vocab=64)
    model = build_model(load_spec("lmm-tiny"), task).double()
    batch = task.sample(4, torch.Generator().manual_seed(0))
    assert 0 < (batch.targets != IGNORE).sum() < batch.targets.numel()
    calls = []
    forward = model.forward
    model.forward = lambda *a, **kw: calls.append(kw.get("positions")) or forward(*a, **kw)
    opt = make_optimizer(model, TrainSpec())
    loss, _, _ = train_step(model, opt, batch, lr=0.0, clip=None, block_norms=False)
    assert torch.equal(calls[0], batch.targets != IGNORE)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    full = loss_fn(forward(batch.inputs)[0], batch.targets)
    full.backward()
    assert loss == pytest.approx(full.item(), rel=1e-12)
    assert grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-10, atol=1e-12, msg=n)
