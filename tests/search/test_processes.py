"""A study run deletes and kills only what it created (issue 15, item 1): a hostile or copied
state.json naming another directory or other processes leaves them alone."""

import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from titans_nas.search import processes
from titans_nas.search.engine import _clean_up


def sleeper(mention: str) -> subprocess.Popen:
    """A process whose command line names `mention` (as Ray's processes name their temp dir)."""
    return subprocess.Popen(["sh", "-c", f"sleep 60 # {mention}"])


def recorded(*procs: subprocess.Popen) -> list[list[int]]:
    mine = processes.descendants(os.getpid())
    return [[p.pid, mine[p.pid]] for p in procs]


def gone(proc: subprocess.Popen) -> bool:
    deadline = time.time() + 5
    while proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    return proc.poll() is not None


def test_the_run_stops_and_removes_what_it_started(tmp_path):
    run = tmp_path / "run"
    temp = processes.new_temp_dir(run)
    worker = sleeper(temp)
    try:
        _clean_up(run, {"ray_temp_dir": temp, "ray_pids": recorded(worker)})
        assert gone(worker) and not os.path.exists(temp)
    finally:
        worker.kill()


def test_a_hostile_state_json_deletes_and_kills_nothing(tmp_path):
    run, victim = tmp_path / "run", tmp_path / "precious"
    victim.mkdir()
    (victim / "data.txt").write_text("keep me")
    other_run = processes.new_temp_dir(tmp_path / "another-run")  # a real temp dir, owned by another run
    neighbour = sleeper(other_run)
    (victim / processes.OWNER).write_text(str(run))  # a forged owner file, reached through a link
    link = Path(tempfile.gettempdir()) / f"tn-ray-{uuid.uuid4().hex[:8]}"
    link.symlink_to(victim)
    bystander = sleeper(f"{victim} {link}")
    try:
        for named in (str(victim), other_run, str(link), "/", str(tmp_path), None, 7):
            _clean_up(run, {"ray_temp_dir": named, "ray_pids": recorded(bystander, neighbour)})
        assert (victim / "data.txt").read_text() == "keep me" and os.path.isdir(other_run)
        assert bystander.poll() is None and neighbour.poll() is None
        # the right temp dir but a recorded PID whose start time is not that process's: not killed
        mine = processes.new_temp_dir(run)
        impostor = sleeper(mine)
        ((pid, start),) = recorded(impostor)
        _clean_up(run, {"ray_temp_dir": mine, "ray_pids": [[pid, start + 1], "junk", [1, 0]]})
        assert impostor.poll() is None and not os.path.exists(mine)
        impostor.kill()
    finally:
        for p in (bystander, neighbour):
            p.kill()
        link.unlink(missing_ok=True)


HOLD = (
    "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX);"
    " print('held', flush=True); time.sleep(60)"
)


def test_a_run_dir_another_driver_holds_is_refused_by_run_and_resume(tmp_path):
    from tests.search.conftest import write_study
    from titans_nas.config import SpecError
    from titans_nas.search import engine

    path, run = write_study(tmp_path, space={"dim": {"choice": [16]}}), tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SpecError, match="another titans-nas driver is running this study"):
            engine.run(path, run)
        assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing written
        (run / "study.yaml").write_text(path.read_text())
        (run / "state.json").write_text('{"study_name": "t-1", "finished": false}')
        with pytest.raises(SpecError, match="another titans-nas driver is running this study"):
            engine.resume(run)
        assert (run / "state.json").read_text() == '{"study_name": "t-1", "finished": false}'
    finally:
        holder.kill()
        holder.wait()
    with engine.run_lock(run):  # the OS dropped the dead holder's lock
        pass
