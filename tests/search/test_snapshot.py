"""A driver killed while Tune copies its experiment snapshot leaves a trial list older than the
search generator beside it (or the other way round); `resume` must still end with exactly the
study's trials (titans_nas/search/snapshot.py). The torn snapshot is made by hand from a finished
run: the trial list loses its last trials, as if they had been created after it was written and
were running when the driver died."""

import json
import pickle
import sqlite3
from pathlib import Path

import optuna
import pytest

from tests.search.conftest import TINY_TRAIN, write_study
from titans_nas.search import engine, snapshot
from titans_nas.search.report import load_trials

pytestmark = pytest.mark.usefixtures("ray_local")


def tear(run: Path, lose: int) -> list[dict]:
    """Drop the last `lose` trials from the newest trial list; they were running when killed:
    no result, their Optuna trials still RUNNING. Returns the trials lost."""
    path = sorted((run / "tune").glob("experiment_state-*.json"))[-1]
    state = json.loads(path.read_text())
    lost = [json.loads(t[0]) for t in state["trial_data"][-lose:]]
    state["trial_data"] = state["trial_data"][:-lose]
    path.write_text(json.dumps(state))
    for t in lost:
        (run / "trials" / t["trial_id"] / "result.json").unlink()
    if (run / "optuna.db").is_file():
        # the searcher was saved after its trials finished: its pickled Optuna cache holds them complete
        searcher_path = sorted((run / "tune").glob("searcher-state-*.pkl"))[-1]
        searcher = snapshot._load(searcher_path)
        searcher["_ot_study"].get_trials(deepcopy=False)
        snapshot._save(searcher_path, searcher)
        rewind(run, [t["trial_id"] for t in lost])
    return lost


def rewind(run: Path, running: list[str]) -> None:
    """The run as it was when the driver died: unfinished, those trials' Optuna asks running."""
    with sqlite3.connect(run / "optuna.db") as db:
        for trial_id in running:
            (stored_id,) = db.execute(
                "SELECT trial_id FROM trial_user_attributes WHERE key='ray_trial_id' AND value_json=?",
                (json.dumps(trial_id),),
            ).fetchone()
            db.execute("UPDATE trials SET state='RUNNING', datetime_complete=NULL WHERE trial_id=?", (stored_id,))
    run_state = json.loads((run / "state.json").read_text())
    (run / "state.json").write_text(json.dumps({**run_state, "finished": False}))
    (run / "trials.json").unlink()


def optuna_states(run: Path) -> list[str]:
    state = json.loads((run / "state.json").read_text())
    study = optuna.load_study(study_name=state["study_name"], storage=f"sqlite:///{run / 'optuna.db'}")
    return [t.state.name for t in study.trials]


def test_a_search_resumed_from_a_torn_snapshot_runs_exactly_its_trials(tmp_path):
    space = {"block": {"memory": {"momentum": {"choice": [None, {"init": 0.1}]}}}}
    path = write_study(tmp_path, space=space, trials=4, scheduler=None, sampler="random")
    run = engine.run(path, tmp_path / "run")
    lost = tear(run, lose=2)

    engine.resume(run)
    records = load_trials(run)
    assert len(records) == 4 and all(r.status == "completed" for r in records)
    assert not {t["trial_id"] for t in lost} & {r.trial_id for r in records}
    assert sorted(p.name for p in (run / "interrupted").iterdir()) == sorted(t["trial_id"] for t in lost)
    states = optuna_states(run)  # the lost trials' asks failed, none left running
    assert states.count("COMPLETE") == 4 and states.count("FAIL") == 2 and "RUNNING" not in states

    # the other tear: the generator and searcher older than the trial list
    gen_path = sorted((run / "tune").glob("search_gen_state-*.json"))[-1]
    searcher_path = sorted((run / "tune").glob("searcher-state-*.pkl"))[-1]
    gen, searcher = snapshot._load(gen_path), pickle.loads(searcher_path.read_bytes())
    newest = records[-1].trial_id
    number = searcher["_ot_trials"].pop(newest).number
    gen["counter"] -= 1
    snapshot._save(gen_path, gen)
    searcher_path.write_bytes(pickle.dumps(searcher))
    assert len(snapshot.reconcile(run / "tune")) == 2
    assert snapshot._load(gen_path)["counter"] == 4
    assert pickle.loads(searcher_path.read_bytes())["_ot_trials"][newest].number == number
    assert snapshot.reconcile(run / "tune") == []  # consistent now: nothing to do


def test_a_trial_whose_snapshot_names_a_deleted_checkpoint_continues_from_its_own(tmp_path):
    """The trial list was written before the trial's newest checkpoint, which replaced the one the
    list names (Tune keeps one): the trial finishes from the checkpoint it wrote, nothing twice."""
    from ray import tune
    from ray.tune.utils.serialization import TuneFunctionDecoder, TuneFunctionEncoder

    space = {"block": {"memory": {"momentum": {"choice": [None, {"init": 0.1}]}}}}
    path = write_study(tmp_path, space=space, trials=2, scheduler=None, sampler="random")
    run = engine.run(path, tmp_path / "run")
    trial_list = sorted((run / "tune").glob("experiment_state-*.json"))[-1]
    state = json.loads(trial_list.read_text())
    entry = state["trial_data"][-1]
    trial, metadata = json.loads(entry[0]), json.loads(entry[1], cls=TuneFunctionDecoder, allow_cloudpickle=True)
    latest = metadata["checkpoint_manager"].latest_checkpoint_result
    gone = Path(latest.checkpoint.path).with_name("checkpoint_000001")
    assert not gone.exists()
    latest.checkpoint = tune.Checkpoint(str(gone))
    metadata["last_result"].update(step=2, evals=1, full_budget=False)  # the list's result is as old
    entry[0], entry[1] = json.dumps({**trial, "status": "RUNNING"}), json.dumps(metadata, cls=TuneFunctionEncoder)
    trial_list.write_text(json.dumps(state))
    (run / "trials" / trial["trial_id"] / "result.json").unlink()
    rewind(run, [trial["trial_id"]])
    before = {d.name: (d / "metrics.jsonl").read_text() for d in (run / "trials").iterdir()}

    engine.resume(run)
    records = load_trials(run)
    assert len(records) == 2 and all(r.status == "completed" for r in records)
    assert {d.name: (d / "metrics.jsonl").read_text() for d in (run / "trials").iterdir()} == before
    assert optuna_states(run) == ["COMPLETE", "COMPLETE"]


def test_an_ablation_resumed_from_a_torn_snapshot_runs_every_point_once(tmp_path):
    train = {**TINY_TRAIN, "steps": 4}
    variants = {"lmm": [], "swa": {"block": {"kind": "swa", "window": 4}}}
    path = write_study(
        tmp_path,
        kind="ablation",
        tasks={"copy": {"kind": "copy", "length": 4, "symbols": 8}},
        variants=variants,
        baseline="lmm",
        seeds=[0, 1],
        train=train,
    )
    run = engine.run(path, tmp_path / "run")
    tear(run, lose=2)

    engine.resume(run)
    records = load_trials(run)
    assert len(records) == 4 and all(r.status == "completed" for r in records)
    points = sorted((r.point["variant"], r.point["seed"]) for r in records)
    assert points == [("lmm", 0), ("lmm", 1), ("swa", 0), ("swa", 1)]
    for r in records:  # a grid's trial ids are its points' numbers: a lost one reruns from scratch in its dir
        assert [e["step"] for e in r.curve] == [2, 4]
