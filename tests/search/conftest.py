import os
import shutil
from pathlib import Path

import pytest
import yaml


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for every Ray test of the session (research/ray_optuna.md: ~5 s saved per
    test); its processes are gone afterwards."""
    from titans_nas.search import processes
    from titans_nas.search.engine import _ray_env

    _ray_env(local=True)
    import ray

    temp = f"/tmp/tn-ray-test-{os.getpid()}"
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="ERROR",
        object_store_memory=200 * 2**20,
        _temp_dir=temp,
    )
    started = sorted(processes.descendants(os.getpid()).items())
    yield
    started += sorted(processes.descendants(os.getpid()).items())  # workers started since
    ray.shutdown()
    processes.stop(started, temp)
    shutil.rmtree(temp, ignore_errors=True)


TINY_MODEL = {
    "extends": "lmm-tiny",
    "dim": 16,
    "heads": 2,
    "depth": 1,
    "vocab_size": 16,
    "block": {"memory": {"chunk_size": 4}, "persistent": {"num_tokens": 2}},
}
TINY_TRAIN = {"steps": 6, "batch_size": 4, "eval_every": 2, "eval_batches": 1, "warmup_steps": 1, "log_every": 2}


def write_study(tmp_path: Path, **fields) -> Path:
    data = {
        "name": "t",
        "kind": "search",
        "model": TINY_MODEL,
        "task": {"kind": "copy", "length": 4, "symbols": 8},
        "train": TINY_TRAIN,
        "objectives": [{"metric": "loss", "mode": "min"}],
        "trials": 4,
        "concurrency": 2,
    }
    data.update(fields)
    if data["kind"] != "search":  # ablations and grids name their tasks and run every point
        for key in ("task", "trials", "space"):
            data.pop(key, None)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
