"""A study's `tracking`: MLflow runs and TensorBoard events written by Ray Tune's own callbacks
during a real (tiny) study, then read back."""

import struct

import pytest

from tests.search.conftest import write_study
from titans_nas.search import engine

pytestmark = pytest.mark.usefixtures("ray_local")


def tensorboard_scalars(path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] of one TensorBoard event file (TFRecord framing: length, crc,
    payload, crc)."""
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[tuple[int, float]]] = {}
    data, i = path.read_bytes(), 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i : i + 8])
        event = Event.FromString(data[i + 12 : i + 12 + n])
        i += 12 + n + 4
        for v in event.summary.value:
            out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_mlflow_and_tensorboard_record_every_trial_and_evaluation(tmp_path):
    from mlflow.tracking import MlflowClient

    space = {"block": {"memory": {"momentum": {"choice": [None, {"init": 0.1}]}}}}
    path = write_study(tmp_path, space=space, trials=2, scheduler=None, tracking={"mlflow": {}, "tensorboard": {}})
    run = engine.run(path, tmp_path / "run")  # TINY_TRAIN: 6 steps, an evaluation every 2

    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("t")  # the study's name
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2
    for r in runs:
        assert "block.memory.momentum" in r.data.params and r.data.tags["study"] == "t"
        history = client.get_metric_history(r.info.run_id, "loss")
        assert [m.step for m in history] == [1, 2, 3] and all(m.value > 0 for m in history)

    events = sorted((run / "tune").rglob("events.out.tfevents.*"))
    assert len(events) == 2
    for e in events:
        loss = tensorboard_scalars(e)["ray/tune/loss"]
        assert [step for step, _ in loss] == [1, 2, 3]


def test_tracking_is_off_unless_asked(tmp_path):
    path = write_study(tmp_path, space={"block": {"memory": {"conv": {"choice": [None]}}}}, trials=1, scheduler=None)
    run = engine.run(path, tmp_path / "run")
    assert not (run / "mlflow.db").exists()
    assert not list((run / "tune").rglob("events.out.tfevents.*"))  # Tune adds no TensorBoard logger of its own
    assert list((run / "tune").rglob("result.json")) and list((run / "tune").rglob("progress.csv"))
