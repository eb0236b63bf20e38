"""Training: the loss falls on a generated task within a few hundred CPU steps."""

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
    second = train(spec, task, cfg, tmp_path / "resumed", resume=True)
    assert second.status == "completed" and second.step == 12
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
