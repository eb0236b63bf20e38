"""Bad input and hostile files (issue 15): each is refused with one line and exit code 2, no
traceback, quickly; nothing outside what the command owns is read, written or deleted."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from titans_nas.cli import main

BOMB = "extends: lmm-tiny\n" + "\n".join(
    f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9 if prev else ['"lol"'] * 9) + "]"
    for prev, name in zip([None, *"abcdefgh"], "abcdefghi")
)


def refused(capsys, argv: list[str]) -> str:
    """Run the CLI; it must exit 2 with one error line and no traceback. Returns the line."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_a_yaml_bomb_is_refused_at_once(tmp_path, capsys):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB)  # 9 levels of 9 aliases: 9^9 strings once expanded
    start = time.perf_counter()
    err = refused(capsys, ["inspect", str(bomb)])
    assert time.perf_counter() - start < 1.0
    assert str(bomb) in err and "aliases expand to more than" in err


@pytest.mark.parametrize(
    "value, reason",
    [
        ("&x [1, *x]", "recursive"),
        (
            "[&a [1,1,1,1,1,1,1,1,1,1], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b],"
            " &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c], [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]]",
            "aliases expand",
        ),
    ],
)
def test_a_bomb_or_a_loop_in_a_set_value_is_refused(value, reason, capsys):
    err = refused(capsys, ["inspect", "lmm-tiny", "--set", f"block.window={value}"])
    assert err.startswith("error: --set block.window=") and reason in err


def test_anchors_within_the_budget_still_work(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text("extends: mag-tiny\nblock: {kind: mag, window: &w 16}\nvocab_size: *w\n")
    assert main(["inspect", str(spec), "--seq", "64"]) == 0  # the anchors are the point, not the FLOP count
    assert "window: 16" in capsys.readouterr().out


TINY = ["--set", "dim=16", "--set", "heads=2", "--set", "depth=1", "--task-set", "length=4", "--batch-size", "2"]


@pytest.mark.parametrize(
    "argv, where, reason",
    [
        (["train", "lmm-tiny", "--steps", "0"], "--steps", "greater than or equal to 1"),
        (["train", "lmm-tiny", "--steps", "-5"], "--steps", "greater than or equal to 1"),
        (["train", "lmm-tiny", "--batch-size", "0"], "--batch-size", "greater than or equal to 1"),
        (["train", "lmm-tiny", "--lr", "-1"], "--lr", "greater than 0"),
        (["train", "lmm-tiny", "--checkpoint-every", "0"], "--checkpoint-every", "greater than or equal to 1"),
        (["train", "lmm-tiny", "--device", "bogus"], "--device", "not a torch device"),
        (["train", "lmm-tiny", "--out", "/proc/version"], "--out", "is a file"),
        (["train", "lmm-tiny", "--out", "/proc/titans-nas"], "--out", "cannot write"),
        (["train", "lmm-tiny", "--out", "/tmp/titans-nas-none", "--resume"], "--out", "no run to resume"),
        (["inspect", "lmm-tiny", "--set", "block=[1,2]"], "--set block=[1,2]", "block: list cannot replace a mapping"),
        (["inspect", "lmm-tiny", "--seq", "0"], "--seq", "at least 1"),
        (["inspect", "lmm-tiny", "--set", "depth=1e9"], "--set depth=1e9", "less than or equal to 4096"),
        (
            ["inspect", "lmm-tiny", "--set", "vocab_size=1180591620717411303424"],
            "--set vocab_size=1180591620717411303424",
            "less than",
        ),
        (
            ["inspect", "lmm-tiny", "--set", "block.memory.chunk_size=1e12"],
            "--set block.memory.chunk_size=1e12",
            "less",
        ),
        (
            ["inspect", "lmm-tiny", "--set", "dim=65536", "--set", "depth=4096"],
            "--set dim=65536",
            "over 2.1e+14 parameters",
        ),
        (["niah", "/nonexistent", "--lengths", "100"], "--lengths 100", "cannot hold the needle"),
        (["niah", "/nonexistent", "--lengths", "10"], "--lengths 10", "greater than or equal to 64"),
        (["niah", "/nonexistent", "--lengths", "abc"], "--lengths", "comma-separated whole numbers"),
        (["niah", "/nonexistent", "--depths", "5"], "--depths", "in [0, 1]"),
        (["niah", "/nonexistent", "--samples", "0"], "--samples", "at least 1"),
    ],
)
def test_bad_flags_name_the_flag(argv, where, reason, capsys):
    err = refused(capsys, argv)
    assert err.startswith(f"error: {where}: ") and reason in err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_a_device_this_machine_lacks_is_refused(capsys):
    assert "sees no CUDA device" in refused(capsys, ["train", "lmm-tiny", "--device", "cuda"])


def test_a_spec_file_that_is_not_utf8_is_refused(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_bytes(b"extends: lmm-tiny\ndim: \xff\xfe\n")
    assert f"error: {spec}: not UTF-8 text" in refused(capsys, ["inspect", str(spec)])


def test_an_earlier_run_is_neither_replaced_nor_continued_unless_asked(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "lmm-tiny", *TINY, "--steps", "2", "--eval-every", "2", "--out", str(out)]) == 0
    before = (out / "metrics.jsonl").read_text()
    err = refused(capsys, ["train", "lmm-tiny", *TINY, "--steps", "2", "--out", str(out)])
    assert "already holds a run: --resume continues it, --overwrite replaces it" in err
    assert (out / "metrics.jsonl").read_text() == before
    assert "not both" in refused(capsys, ["train", "lmm-tiny", "--out", str(out), "--resume", "--overwrite"])
    again = ["train", "lmm-tiny", *TINY, "--steps", "3", "--eval-every", "3", "--out", str(out), "--overwrite"]
    assert main(again) == 0
    lines = (out / "metrics.jsonl").read_text()
    assert '"step": 3' in lines and '"step": 2,' not in lines


def test_a_huge_size_in_a_file_is_refused_at_once(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text("extends: lmm-tiny\ndim: 4.0e+29\n")
    start = time.perf_counter()
    err = refused(capsys, ["inspect", str(spec)])
    assert time.perf_counter() - start < 1.0 and f"{spec}: dim:" in err


# --- a training run: nothing lost, nothing mixed, nothing written elsewhere ---------------------

RUN = ["train", "lmm-tiny", *TINY, "--steps", "40", "--eval-every", "20", "--seed", "3"]  # a record every 10 steps
TIMING = ("tokens_per_s", "peak_mem_mb")


def records(run) -> list[dict]:
    """metrics.jsonl without the wall-clock fields (the rest must match bit for bit)."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in lines]


def cli(*argv: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread: the same float sums in every process
    return subprocess.Popen([sys.executable, "-m", "titans_nas.cli", *argv], env=env, stderr=subprocess.PIPE, **kw)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("whole") / "run"
    assert cli(*RUN, "--out", str(run)).wait(timeout=300) == 0
    return run


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM])
def test_a_killed_or_interrupted_run_resumes_to_the_uninterrupted_result(uninterrupted, tmp_path, how):
    run = tmp_path / "run"
    at = random.Random(int(how)).choice([10, 30])  # a logged step between checkpoints (every 20)
    proc = cli(*RUN, "--out", str(run))
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        done = [r["step"] for r in records(run)] if (run / "metrics.jsonl").is_file() else []
        if done and max(done) >= at:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be stopped"
    proc.send_signal(how)
    code = proc.wait(timeout=120)
    assert code == (-9 if how == signal.SIGKILL else 130)
    if how != signal.SIGKILL:  # a checkpoint at the step it stopped
        assert "continue with --resume" in proc.stderr.read().decode()
    assert cli(*RUN, "--out", str(run), "--resume").wait(timeout=300) == 0
    steps = [(r["split"], r["step"]) for r in records(run)]
    assert len(steps) == len(set(steps))  # no record twice
    assert records(run) == records(uninterrupted)
    same = (run / "checkpoint" / "model.safetensors").read_bytes()
    assert same == (uninterrupted / "checkpoint" / "model.safetensors").read_bytes()


def test_resuming_with_another_task_or_spec_is_refused_before_anything_changes(uninterrupted, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    err = refused(capsys, [*RUN, "--out", str(run), "--resume", "--task-set", "length=5"])
    assert f"{run / 'task.yaml'}: length: the run was made with 4, this command gives 5" in err
    err = refused(capsys, [*RUN, "--set", "dim=32", "--out", str(run), "--resume"])
    assert "spec.yaml: dim: the run was made with 16" in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_a_damaged_checkpoint_is_a_clear_error(uninterrupted, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    (run / "checkpoint" / "state.pt").write_bytes(b"not a checkpoint")
    assert "damaged or foreign checkpoint" in refused(capsys, [*RUN, "--out", str(run), "--resume"])


def test_a_linked_file_in_the_run_dir_is_not_written_through(tmp_path, capsys):
    run, outside = tmp_path / "run", tmp_path / "elsewhere.yaml"
    run.mkdir()
    outside.write_text("precious\n")
    (run / "spec.yaml").symlink_to(outside)
    assert "symbolic link" in refused(capsys, [*RUN, "--out", str(run)])
    assert outside.read_text() == "precious\n"


def test_a_task_vocabulary_too_large_for_the_preset_names_the_fix(tmp_path, capsys):
    err = refused(capsys, ["train", "mag-tiny", "--task", "mqar", "--steps", "1", "--out", str(tmp_path / "new")])
    assert "the task uses 8192 token ids but the model's vocab_size is 256" in err
    assert "--task-set vocab=256" in err
    assert not (tmp_path / "new").exists()  # refused before --out is made
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "metrics.jsonl").write_text("{}\n")
    refused(capsys, ["train", "mag-tiny", "--task", "mqar", "--out", str(earlier), "--overwrite"])
    assert (earlier / "metrics.jsonl").read_text() == "{}\n"  # nor an earlier run replaced


# --- labels: the flag or file the user gave ---------------------------------------------------


def test_errors_name_the_flag_or_file_the_user_gave(tmp_path, capsys):
    err = refused(capsys, ["train", "lmm-tiny", "--task-set", "bogus=3"])
    assert err.startswith("error: --task-set bogus=3: bogus:")
    err = refused(capsys, ["train", "lmm-tiny", "--task", "mqr"])
    assert err.startswith("error: --task: no task kind or file 'mqr'") and "did you mean 'mqar'" in err
    spec = tmp_path / "mine.yaml"
    spec.write_text("extends: lmm-tiny\ndim: 30\n")  # breaks the preset's heads: 4
    assert refused(capsys, ["inspect", str(spec)]).startswith(f"error: {spec}: heads: 4 heads do not divide dim 30")
    assert refused(capsys, ["inspect", "lmm-tiny", "--set", "dim=30"]).startswith("error: --set dim=30: heads:")


GRID = {
    "name": "s",
    "kind": "grid",
    "model": "lmm-tiny",
    "tasks": {"copy": {"kind": "copy", "length": 4}},
    "grid": {"block.memory.chunk_size": [8]},
    "objectives": [{"metric": "accuracy", "mode": "max"}],
}
SEARCH = {**{k: v for k, v in GRID.items() if k not in ("tasks", "grid")}, "kind": "search", "task": {"kind": "copy"}}


@pytest.mark.parametrize(
    "study, where, reason",
    [
        ({**GRID, "grid": {"block.memory.chunk_size": []}}, "grid.block.memory.chunk_size", "at least 1 item"),
        ({**GRID, "objectives": [{"metric": "bogus", "mode": "max"}]}, "objectives.0.metric", "no task reports"),
        ({**SEARCH, "space": {"dim": {"int": [16, 64], "log": True, "step": 16}}}, "dim", "log and step cannot"),
    ],
)
def test_what_a_study_gets_wrong_is_refused_before_ray_starts(tmp_path, capsys, study, where, reason):
    path = tmp_path / "study.yaml"
    path.write_text(json.dumps(study))
    err = refused(capsys, ["study", "run", str(path), "--out", str(tmp_path / "run")])
    assert f": {where}: " in err and reason in err
    assert not (tmp_path / "run").exists()  # no half-made run directory


def test_a_broken_or_foreign_study_run_dir_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    assert "not a study run directory" in refused(capsys, ["study", "resume", str(run)])
    (run / "study.yaml").write_text("name: x\n")
    (run / "state.json").write_text("{broken")
    assert "broken state file" in refused(capsys, ["study", "resume", str(run)])
    (run / "state.json").write_text('{"study": "x"}')
    assert "study_name: broken state file" in refused(capsys, ["study", "status", str(run)])
    assert "takes no --set" in refused(capsys, ["study", "resume", str(run), "--set", "trials=3"])


def test_a_linked_file_in_a_study_run_dir_is_not_written_through(tmp_path, capsys):
    path = tmp_path / "study.yaml"
    path.write_text(json.dumps(GRID))
    run, outside = tmp_path / "run", tmp_path / "elsewhere.yaml"
    run.mkdir()
    outside.write_text("precious\n")
    (run / "study.yaml").symlink_to(outside)
    err = refused(capsys, ["study", "run", str(path), "--out", str(run)])
    assert "symbolic link" in err and outside.read_text() == "precious\n"
