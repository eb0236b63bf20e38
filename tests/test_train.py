"""Training: the loss falls on a generated task within a few hundred CPU steps."""

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
