"""`titans-nas study dashboard RUN`: optuna-dashboard serves a finished study's storage on
localhost, and a headless Chromium (Debian's package) renders its trial list."""

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.search.conftest import write_study
from titans_nas.search import engine

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CLI = [sys.executable, "-m", "titans_nas.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory, ray_local):
    tmp_path = tmp_path_factory.mktemp("dashboard")
    path = write_study(
        tmp_path,
        space={"block": {"memory": {"momentum": {"choice": [None, {"init": 0.1}]}}}},
        trials=3,
        scheduler=None,
        objectives=[{"metric": "loss", "mode": "min"}, {"metric": "params", "mode": "min"}],
    )
    run = engine.run(path, tmp_path / "run")
    port = free_port()
    server = subprocess.Popen([*CLI, "study", "dashboard", str(run), "--port", str(port)], stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):  # up to 20 s for the server to listen
        try:
            studies = json.load(urllib.request.urlopen(f"{url}/api/studies", timeout=2))["study_summaries"]
            break
        except OSError:
            assert server.poll() is None, server.stderr.read().decode()
            time.sleep(0.2)
    else:
        server.kill()
        pytest.fail("the dashboard never answered")
    yield url, run, studies
    server.terminate()
    server.wait(10)


def test_the_dashboard_serves_the_study_with_its_objective_names(dashboard):
    url, run, studies = dashboard
    state = json.loads((run / "state.json").read_text())
    assert [s["study_name"] for s in studies] == [state["study_name"]]
    detail = json.load(urllib.request.urlopen(f"{url}/api/studies/{studies[0]['study_id']}", timeout=5))
    assert len(detail["trials"]) == 3
    assert detail["objective_names"] == ["loss", "params"]  # not "Objective 0, 1"


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (`apt-get install chromium`; .ci/run does)")
def test_a_headless_browser_lists_the_trials(dashboard, tmp_path):
    url, run, studies = dashboard
    page = f"{url}/dashboard/studies/{studies[0]['study_id']}/trials"
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=15000",
         f"--user-data-dir={tmp_path / 'chromium'}", "--dump-dom", page],
        capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip
    for n in range(3):
        assert f"Trial {n}" in dom, dom[:2000]
    assert studies[0]["study_name"] in dom


def test_dashboard_of_a_directory_that_is_no_study_run_is_refused(tmp_path):
    out = subprocess.run([*CLI, "study", "dashboard", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "no state.json" in out.stderr and "Traceback" not in out.stderr
