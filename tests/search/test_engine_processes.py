"""Engine tests that need their own Ray: a driver killed with SIGKILL and resumed, and a cluster
of several nodes (ray.cluster_utils.Cluster) on this one machine."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from tests.search.conftest import TINY_TRAIN, write_study
from titans_nas.search.report import load_trials

SPACE = {"block": {"memory": {"momentum": {"choice": [None, {"init": 0.1}]}}}}


def completed(run: Path) -> list[Path]:
    out = []
    for d in (run / "trials").glob("*") if (run / "trials").is_dir() else []:
        result = d / "result.json"
        if result.is_file() and json.loads(result.read_text())["status"] == "completed":
            out.append(d)
    return out


def describe(records, resumed) -> str:
    """What a failing resume left: every trial's status and error, and the tail of the output."""
    lines = []
    for r in records:
        error = r.dir / "error.txt" if r.dir else None
        lines.append(f"{r.trial_id} {r.status} {error.read_text()[-800:] if error and error.is_file() else ''}")
    return "\n".join([*lines, resumed.stdout[-1500:], resumed.stderr[-1500:]])


def ray_processes(temp_dir: str) -> list[int]:
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if temp_dir in (proc / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(proc.name))
        except OSError:
            pass
    return pids


def test_kill_the_driver_then_resume_loses_and_reruns_nothing(tmp_path):
    train = {**TINY_TRAIN, "steps": 24, "eval_every": 4}
    path = write_study(tmp_path, space=SPACE, trials=6, scheduler=None, sampler="random", train=train)
    run = tmp_path / "run"
    cli = [sys.executable, "-m", "titans_nas.cli", "study"]
    driver = subprocess.Popen(
        [*cli, "run", str(path), "--out", str(run)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 240
    while len(completed(run)) < 2 and time.time() < deadline and driver.poll() is None:
        time.sleep(0.3)
    assert driver.poll() is None, "the study ended before it could be interrupted"
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    first_temp = json.loads((run / "state.json").read_text())["ray_temp_dir"]
    before = {d.name: (d / "metrics.jsonl").read_text() for d in completed(run)}
    assert len(before) >= 2

    resumed = subprocess.run([*cli, "resume", str(run)], capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    records = load_trials(run)
    assert len(records) == 6 and all(r.status == "completed" for r in records), describe(records, resumed)
    for name, text in before.items():  # finished before the kill: kept, not trained again
        assert (run / "trials" / name / "metrics.jsonl").read_text() == text
    state = json.loads((run / "state.json").read_text())
    study = optuna.load_study(study_name=state["study_name"], storage=f"sqlite:///{run / 'optuna.db'}")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 6
    assert ray_processes(first_temp) == [] and ray_processes(state["ray_temp_dir"]) == []


def test_ctrl_c_interrupts_resumably(tmp_path):
    train = {**TINY_TRAIN, "steps": 40, "eval_every": 4}
    path = write_study(tmp_path, space=SPACE, trials=5, scheduler=None, sampler="random", train=train)
    run = tmp_path / "run"
    cli = [sys.executable, "-m", "titans_nas.cli", "study"]
    driver = subprocess.Popen(  # its own process group, as a terminal's foreground job
        [*cli, "run", str(path), "--out", str(run)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 240
    while len(completed(run)) < 1 and time.time() < deadline and driver.poll() is None:
        time.sleep(0.3)
    assert driver.poll() is None, "the study ended before it could be interrupted"
    os.killpg(driver.pid, signal.SIGINT)  # Ctrl-C in the terminal: the whole foreground group
    assert driver.wait(timeout=120) == 130
    said = driver.stderr.read()
    assert "study resume" in said and "Traceback" not in said, said[-2000:]
    state = json.loads((run / "state.json").read_text())
    assert state["finished"] is False and state["interrupted"]
    status = subprocess.run([*cli, "status", str(run)], capture_output=True, text=True, timeout=120)
    assert "interrupted" in status.stdout
    before = {d.name: (d / "metrics.jsonl").read_text() for d in completed(run)}

    resumed = subprocess.run([*cli, "resume", str(run)], capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    records = load_trials(run)
    assert len(records) == 5 and all(r.status == "completed" for r in records), describe(records, resumed)
    for name, text in before.items():
        assert (run / "trials" / name / "metrics.jsonl").read_text() == text
    assert ray_processes(state["ray_temp_dir"]) == [] and not Path(state["ray_temp_dir"]).exists()


CLUSTER = """
import os, sys
os.environ.update(RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
cluster.wait_for_nodes()
import ray
ray.init(address=cluster.address, log_to_driver=False)
from titans_nas.search import engine
engine.run(sys.argv[1], sys.argv[2])
ray.shutdown()
cluster.shutdown()
"""


def test_trials_run_on_several_nodes_of_a_cluster(tmp_path):
    path = write_study(tmp_path, space=SPACE, trials=4, scheduler=None, sampler="random", concurrency=2)
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-c", CLUSTER, str(path), str(run)], capture_output=True, text=True, timeout=400
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    nodes = {json.loads((d / "trial.json").read_text())["node"] for d in (run / "trials").glob("*")}
    assert len(load_trials(run)) == 4 and len(nodes) >= 2


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowing, on purpose
def test_a_ctrl_c_inside_a_finalizer_still_stops_the_study(monkeypatch):
    """The flakes of `test_ctrl_c_interrupts_resumably`: a SIGINT whose KeyboardInterrupt is
    raised inside a finalizer is printed with a traceback and dropped by Python (exit 0, the
    study ran on). The engine's handler raises nothing there: it keeps the signal, and Tune's
    next step raises it (StopOnSigint)."""
    import gc
    import sys

    from titans_nas.search import tune_parts

    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)

    class Finalized:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)  # the handler runs here, inside the finalizer
            time.sleep(0.05)

    before = signal.getsignal(signal.SIGINT)
    with tune_parts.catching_sigint() as sigint:
        Finalized()  # dropped at once: its __del__ swallows the KeyboardInterrupt
        gc.collect()
        assert sigint.is_set() and unraisable == []  # nothing raised in the finalizer, nothing printed
        with pytest.raises(KeyboardInterrupt):
            tune_parts.StopOnSigint().on_step_begin(iteration=0, trials=[])
    assert signal.getsignal(signal.SIGINT) is before
    tune_parts.StopOnSigint().on_step_begin(iteration=0, trials=[])  # nothing received: nothing raised
