"""Studies on a real local Ray (one session-scoped Ray; trainables live in the installed package)."""

import json
import warnings

import optuna
import pytest
import yaml

from tests.search.conftest import TINY_TRAIN, write_study
from titans_nas.evaluate import evaluate_task
from titans_nas.export import export, load_export
from titans_nas.search import engine
from titans_nas.search.report import load_trials, pareto, report
from titans_nas.tasks import CopySpec

pytestmark = pytest.mark.usefixtures("ray_local")

CONDITIONAL = {
    "block": {
        "variants": {"lmm": {}, "mag": {"window": {"choice": [4, 8]}}},
        "memory": {"momentum": {"choice": [None, {"init": 0.1}]}},
    }
}


def copy_task():
    return CopySpec(length=4, symbols=8)  # the task of conftest.write_study


def optuna_trials(run_dir):
    state = json.loads((run_dir / "state.json").read_text())
    study = optuna.load_study(study_name=state["study_name"], storage=f"sqlite:///{run_dir / 'optuna.db'}")
    return study.trials


def test_search_with_a_conditional_space_and_asha(tmp_path):
    path = write_study(tmp_path, space=CONDITIONAL, trials=4, scheduler={"grace_period": 1, "reduction_factor": 2})
    run = engine.run(path, tmp_path / "run")
    records = load_trials(run)
    assert len(records) == 4
    assert {r.status for r in records} <= {"completed", "stopped early"}
    assert any(r.status == "completed" for r in records)
    kinds = {json.loads((r.dir / "trial.json").read_text())["params"]["block.kind"] for r in records}
    assert kinds <= {"lmm", "mag"}
    # trials ASHA stopped are PRUNED in Optuna, never COMPLETE with a partial budget
    by_status = {r.trial_id: r.status for r in records}
    states = [t.state for t in optuna_trials(run)]
    assert states.count(optuna.trial.TrialState.COMPLETE) == list(by_status.values()).count("completed")
    assert states.count(optuna.trial.TrialState.PRUNED) == list(by_status.values()).count("stopped early")
    # ASHA's clock: evaluations done, counted from the step (a restarted trial keeps it)
    summary = json.loads((run / "trials.json").read_text())
    assert all(t["metrics"]["evals"] == t["metrics"]["step"] // TINY_TRAIN["eval_every"] for t in summary)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        text = report(run).read_text()
    assert "## Best" in text and (run / "trials.csv").is_file() and (run / "curves.png").is_file()
    assert "## Parameter importance" in text and (run / "importance.png").is_file()  # stopped trials count too
    # Optuna's "fewer than 2 trials in a regime" warnings become a mark beside each such parameter
    assert not [w for w in caught if "regimes for parameter" in str(w.message)]
    found = yaml.safe_load((run / "importance.yaml").read_text())
    assert set(found["thin"]) <= set(found["importances"])
    rows = [line for line in text.splitlines() if line.startswith("- `") and line.split("`")[1] in found["importances"]]
    assert rows and all(("inaccurate" in row) == (row.split("`")[1] in found["thin"]) for row in rows)


def test_multi_objective_study_has_a_pareto_front(tmp_path):
    path = write_study(
        tmp_path,
        space=CONDITIONAL,
        trials=4,
        scheduler=None,
        sampler="nsga2",
        objectives=[{"metric": "loss", "mode": "min"}, {"metric": "params", "mode": "min"}],
    )
    run = engine.run(path, tmp_path / "run")
    assert all(r.status == "completed" for r in load_trials(run))
    text = report(run).read_text()
    assert (run / "pareto.png").is_file() and text.count("- `") >= 1
    complete = [t for t in optuna_trials(run) if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 4 and all(len(t.values) == 2 for t in complete)
    # export the front's best on `loss`: it re-scores exactly what the trial reported
    out = export(run, tmp_path / "best", objective="loss")
    spec, model, metrics = load_export(out)
    front = {r.trial_id: r for r in pareto(load_trials(run), [("loss", "min"), ("params", "min")])}
    trial = front[metrics["study"]["trial_id"]]
    assert trial.value("loss") == min(r.value("loss") for r in front.values())
    e = metrics["eval"]
    again = evaluate_task(model, spec, copy_task(), batches=e["batches"], batch_size=e["batch_size"], seed=e["seed"])
    assert again["loss"] == trial.value("loss")


def test_failing_and_diverging_trials_are_recorded_and_the_study_completes(tmp_path):
    space = {"heads": {"choice": [2, 3]}, "train": {"lr": {"choice": [0.003, 1.0e30]}}}
    first = [{"heads": 2, "train.lr": 0.003}, {"heads": 3, "train.lr": 0.003}, {"heads": 2, "train.lr": 1.0e30}]
    path = write_study(tmp_path, space=space, trials=4, enqueue=first, scheduler=None)
    run = engine.run(path, tmp_path / "run")
    statuses = [r.status for r in load_trials(run)]
    assert len(statuses) == 4
    assert "failed" in statuses and "diverged" in statuses and "completed" in statuses
    failed = [r for r in load_trials(run) if r.status == "failed"]
    assert all("heads" in (r.dir / "error.txt").read_text() for r in failed if r.dir)
    states = {t.state for t in optuna_trials(run)}
    assert optuna.trial.TrialState.FAIL in states
    diverged = [r for r in load_trials(run) if r.status == "diverged"]
    assert all(json.loads((r.dir / "result.json").read_text())["status"] == "diverged" for r in diverged)
    assert all(r.steps == json.loads((r.dir / "result.json").read_text())["step"] for r in diverged)


def test_ablation_reports_mean_std_and_deltas(tmp_path):
    path = write_study(
        tmp_path,
        kind="ablation",
        tasks={"copy": {"kind": "copy", "length": 4, "symbols": 8}},
        variants={
            "base": [],
            "w/o momentum": ["block.memory.momentum=null"],
            "linear": {"block": {"memory": {"model": {"kind": "linear"}}}},
        },
        baseline="base",
        seeds=[0, 1],
        evaluate_at={"copy": {"length": [4, 8]}},  # the trained length and twice it
    )
    run = engine.run(path, tmp_path / "run")
    records = load_trials(run)
    assert len(records) == 6
    for r in records:  # at the trained length, the trained weights give the last evaluation again
        assert r.metrics["loss@4"] == pytest.approx(r.metrics["loss"], rel=1e-6)
        assert r.metrics["accuracy@4"] == pytest.approx(r.metrics["accuracy"], rel=1e-6)
        assert r.metrics["loss@8"] != r.metrics["loss@4"]
    text = report(run).read_text()
    assert "| w/o momentum |" in text and "±" in text and "Δ copy: loss" in text
    assert "## copy: loss at each length (after training)" in text and "| length 4 | length 8 | mean |" in text
    assert (run / "evaluate_at.png").is_file()


def test_concurrent_trials_wait_for_the_random_startup_so_exactly_that_many_are_random(tmp_path):
    """ray-project/ray#52535: with 2 trials at a time, a trial asked while the last startup trial
    runs is drawn at random too (measured: 5 random of startup 4 without the wait)."""
    space = {"block": {"memory": {"lr": {"theta_max": {"float": [0.05, 0.25]}}}}}
    path = write_study(tmp_path, space=space, trials=6, scheduler=None, startup_trials=3)
    run = engine.run(path, tmp_path / "run")
    trials = optuna_trials(run)
    finished = [t.datetime_complete for t in trials if t.datetime_complete is not None]
    random_draws = [t.number for t in trials if sum(d < t.datetime_start for d in finished) < 3]
    assert len(trials) == 6 and len(random_draws) == 3, random_draws
    pids = {json.loads(p.read_text())["pid"] for p in (run / "trials").glob("*/trial.json")}
    assert len(pids) == 2, pids  # reuse_actors: six trials in two processes


def test_a_full_budget_result_is_told_at_once_and_ends_the_startup_wait():
    """The sampler learns a trial's full-budget result when it is reported, before Tune ends the
    trial: the next trial is asked while the finished trial's actor is still held, so Tune keeps
    that actor for it (in the startup wait Tune caches only one idle actor: the quickstart's
    second trial after the wait started a fresh process, 5-6 s). Tune's own completion after it
    changes nothing; results short of the budget are intermediate values only."""
    from titans_nas.search.tune_parts import StudySearch

    space = {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}
    sampler = optuna.samplers.TPESampler(n_startup_trials=2, seed=0)
    search = StudySearch(space=space, metric="loss", mode="min", sampler=sampler, startup=2)
    assert search.suggest("a") is not None and search.suggest("b") is not None
    assert search.suggest("c") is None  # both startup trials out, none finished: wait
    result = lambda loss, evals, full: {"loss": loss, "evals": evals, "full_budget": full}  # noqa: E731
    search.on_trial_result("a", result(2.0, 1, False))
    search.on_trial_result("a", result(1.0, 2, True))
    search.on_trial_result("b", result(3.0, 1, False))
    states = {t.number: t.state for t in search._ot_study.trials}
    assert states == {0: optuna.trial.TrialState.COMPLETE, 1: optuna.trial.TrialState.RUNNING}
    assert search.suggest("c") is None  # b still runs
    search.on_trial_result("b", result(0.5, 2, True))
    assert search.suggest("c") is not None  # the wait ended at b's last result, not at its end
    search.on_trial_complete("a", result(1.0, 2, True))
    search.on_trial_complete("b", None, error=True)  # a crash after the last result: told already
    done = search._ot_study.trials[:2]
    assert [t.values for t in done] == [[1.0], [0.5]] and done[0].intermediate_values == {1: 2.0, 2: 1.0}
