"""Tune's experiment snapshot made to agree with itself before a resume.

Tune saves its snapshot (the trial list `experiment_state-*.json`, the search generator
`search_gen_state-*.json` or `basic-variant-state-*.json`, the searcher `searcher-state-*.pkl`)
into a staging directory and copies it into the run directory in a background thread, skipping
a copy while the previous one is still under way. A driver killed mid-copy leaves files from
different moments: a trial list of 3 trials beside a search generator that had created 6 reads,
on restore, as "every sample created" and the study ends with 3 trials (seen in CI); the other
way round it runs more trials than asked. `reconcile` takes the trial list as the truth (it is
what Tune restores and reruns) and rewinds or advances the generator to it: trials created after
that list was written are created again, none twice. Optuna trials asked for such a lost trial
are marked FAIL, so the storage holds no trial that is forever running. A trial list written
before a trial's newest checkpoint names one that Tune has since deleted (it keeps one per trial),
and restoring it would fail the trial: that reference is dropped and the trial continues from the
checkpoint it wrote itself (trainable.run_trial). Ray 2.60's formats; the tests kill and resume
real runs (tests/search/test_snapshot.py, test_engine_processes.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna

UNFINISHED = ("PENDING", "RUNNING", "PAUSED")


def reconcile(experiment: Path) -> list[str]:
    """Make the newest snapshot in `experiment` consistent; returns what was changed."""
    trial_list = _newest(experiment, "experiment_state-*.json")
    if trial_list is None:
        return []
    saved = json.loads(trial_list.read_text())
    trials = [json.loads(state) for state, _ in saved["trial_data"]]
    ids = [t["trial_id"] for t in trials]
    live = {t["trial_id"] for t in trials if t["status"] in UNFINISHED}
    changed = _checkpoints(trial_list, saved, live)
    if (path := _newest(experiment, "search_gen_state-*.json")) is not None:
        changed += _search_generator(path, len(ids), live)
        if (searcher := _newest(experiment, "searcher-state-*.pkl")) is not None:
            changed += _optuna_searcher(searcher, ids, live)
    elif (path := _newest(experiment, "basic-variant-state-*.json")) is not None:
        changed += _grid_generator(path, len(ids), live)
    return changed


def _newest(experiment: Path, pattern: str) -> Path | None:
    found = sorted(experiment.glob(pattern))  # names carry the session's timestamp: Tune reads the last
    return found[-1] if found else None


def _load(path: Path) -> Any:
    import ray.cloudpickle as cloudpickle

    with open(path, "rb") as f:
        return cloudpickle.load(f)


def _save(path: Path, state: Any) -> None:
    import ray.cloudpickle as cloudpickle

    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        cloudpickle.dump(state, f)
    tmp.replace(path)


def _checkpoints(trial_list: Path, state: dict[str, Any], live: set[str]) -> list[str]:
    """An unfinished trial whose recorded checkpoint is no longer on disk restarts without one
    (`state`: the trial list as read; rewritten in place when a reference is dropped)."""
    from ray.tune.utils.serialization import TuneFunctionDecoder, TuneFunctionEncoder

    changed = []
    for entry in state["trial_data"]:  # pickled parts: the same trust as Tune's own restore of this file
        trial, metadata = json.loads(entry[0]), json.loads(entry[1], cls=TuneFunctionDecoder, allow_cloudpickle=True)
        manager = metadata["checkpoint_manager"]
        latest = manager.latest_checkpoint_result
        if trial["trial_id"] not in live or latest is None:
            continue
        recorded = Path(latest.checkpoint.path)  # where the run was; Tune maps it to where it is now
        if not (trial_list.parent / recorded.parent.name / recorded.name).is_dir():
            manager.__init__(manager.checkpoint_config)
            entry[1] = json.dumps(metadata, cls=TuneFunctionEncoder)
            changed.append(f"trial {trial['trial_id']}: its {recorded.name} was replaced after the snapshot")
    if changed:
        tmp = trial_list.with_name(f".{trial_list.name}.tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(trial_list)
    return changed


def _search_generator(path: Path, created: int, live: set[str]) -> list[str]:
    """SearchGenerator: its count of created trials decides how many more it asks for; the
    ConcurrencyLimiter's live set decides how many run at once."""
    state, changed = _load(path), []
    if state["counter"] != created:
        changed.append(f"search generator had created {state['counter']} trials, the trial list holds {created}")
        state["counter"] = created
        state["finished"] = False
    limiter = state.get("name:ConcurrencyLimiter")
    if limiter is not None and set(limiter["live_trials"]) != live:
        limiter.update(live_trials=set(live), num_unfinished_live_trials=len(live))
        changed.append("concurrency limiter's running trials set to the trial list's")
    if changed:
        _save(path, state)
    return changed


def _optuna_searcher(path: Path, ids: list[str], live: set[str]) -> list[str]:
    """OptunaSearch maps Tune trial ids to Optuna trials: a lost Tune trial's Optuna trial is
    failed and forgotten, a Tune trial the older searcher never saw is found again by the
    `ray_trial_id` attribute StudySearch.suggest stores with every ask, and a trial that will
    run again with its Optuna trial still running is not one the searcher has completed (it
    would ignore its result)."""
    state = _load(path)  # Tune writes it with pickle; cloudpickle reads and writes the same format
    known, study, changed = state["_ot_trials"], state["_ot_study"], []
    _forget_cache(study)
    stored = study.get_trials(deepcopy=False)
    for trial_id in [t for t in known if t not in ids]:
        number = known.pop(trial_id).number
        if stored[number].state == optuna.trial.TrialState.RUNNING:
            study.tell(number, state=optuna.trial.TrialState.FAIL)
        changed.append(f"Tune trial {trial_id} was lost with the snapshot: its Optuna trial {number} failed")
    missing = [t for t in ids if t not in known]
    if missing:
        by_id = {t.user_attrs.get("ray_trial_id"): t for t in stored}
        for trial_id in missing:
            if trial_id in by_id:
                known[trial_id] = optuna.trial.Trial(study, by_id[trial_id]._trial_id)
                changed.append(f"Tune trial {trial_id} tied again to Optuna trial {by_id[trial_id].number}")
    running = {t for t in live if t in known and stored[known[t].number].state == optuna.trial.TrialState.RUNNING}
    if state["_completed_trials"] & running:
        changed.append(f"searcher will take the results of {sorted(state['_completed_trials'] & running)} again")
    state["_completed_trials"] = {t for t in state["_completed_trials"] if t in ids and t not in running}
    if changed:
        _save(path, state)
    return changed


def _forget_cache(study: optuna.Study) -> None:
    """Optuna's cache in front of a database is pickled with the searcher, and a trial it saw
    finish is never read again: a searcher saved after a trial completed would see it complete
    while the database (rolled back with the run) holds it running, so the lost trial would stay
    running forever (seen in CI). Emptied in place, so the searcher's Trial objects, which hold
    the same storage object, read the database again too."""
    storage = study._storage
    if isinstance(storage, optuna.storages._CachedStorage):
        storage.__init__(storage._backend)


def _grid_generator(path: Path, created: int, live: set[str]) -> list[str]:
    """BasicVariantGenerator (ablation and grid studies): one grid expanded in a fixed order,
    consumed from the front. Rewound or advanced to the trial list by expanding it again."""
    from ray.tune.search.variant_generator import generate_variants

    state = _load(path)
    (grid,) = state["_iterators"]  # one experiment, num_samples 1 (engine.make_tuner)
    variants = grid.variants
    if variants is None or grid.counter == created:
        return []
    every = list(
        generate_variants(grid.unresolved_spec, constant_grid_search=grid.constant_grid_search, random_state=None)
    )
    before = grid.counter
    variants.iterable = every[created:]
    variants._has_next = bool(variants.iterable)
    grid.counter = created
    state["_live_trials"] = set(live)
    state["_finished"] = False
    _save(path, state)
    return [f"grid generator had created {before} trials, the trial list holds {created}"]
