"""The study engine: `ray.tune.Tuner` + `OptunaSearch` (define-by-run) + `ASHAScheduler` for
searches, `tune.grid_search` over the points of ablations and grids; one trainable for all.

The run directory holds everything: `study.yaml` (resolved), `state.json` (the unique Optuna study
name, the Ray temp dir), `optuna.db` (default storage), `tune/` (Tune's experiment state and
checkpoints), `trials/<id>/` (spec, metrics, checkpoint, result of each trial), `interrupted/`
(trials a killed driver started that the resumed experiment replaced), `trials.json`
and the report. `resume` restores Tune's experiment: finished trials are neither lost nor rerun.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console

from titans_nas.search.study import AblationStudySpec, GridStudySpec, SearchStudySpec, Study, dump_study, load_study
from titans_nas.train import refuse_links

EXPERIMENT = "tune"
console = Console(highlight=False)


# ---------------------------------------------------------------------------------------------
# the Optuna side


def define_by_run(trial: Any, space: dict[str, Any], run_dir: str) -> dict[str, Any]:
    """OptunaSearch's `space`: sample through the one `sample` function; constants ride along.
    Module level (the searcher's state is pickled with it)."""
    from titans_nas.search.space import sample

    sample(trial, space)
    return {"run_dir": run_dir}


# sampler name -> (Optuna class, the argument that sets its random startup phase, or None)
SAMPLERS = {
    "tpe": ("TPESampler", "n_startup_trials"),
    "gp": ("GPSampler", "n_startup_trials"),
    "nsga2": ("NSGAIISampler", "population_size"),
    "random": ("RandomSampler", None),
}


def make_sampler(spec: SearchStudySpec):
    """The study's Optuna sampler (seeded), of a class Tune can pickle with the searcher."""
    import optuna

    from titans_nas.search.tune_parts import SAMPLER_CLASSES

    name, startup = SAMPLERS[spec.sampler]
    kwargs = {startup: spec.startup_trials} if startup and spec.startup_trials is not None else {}
    cls = SAMPLER_CLASSES.get(name) or getattr(optuna.samplers, name)
    return cls(seed=spec.seed, **kwargs)


def startup_count(spec: SearchStudySpec) -> int | None:
    """Trials the sampler draws at random before it models results (None: it never models);
    the sampler's own default where the study does not set it."""
    import inspect

    import optuna

    name, startup = SAMPLERS[spec.sampler]
    if startup is None:
        return None
    default = inspect.signature(getattr(optuna.samplers, name)).parameters[startup].default
    return spec.startup_trials or default


def read_state(run_dir: Path) -> dict[str, Any]:
    """The run's state.json; a directory without one is not a study run (exit 2, no traceback)."""
    from titans_nas.config import SpecError

    path = run_dir / "state.json"
    if not path.is_file():
        raise SpecError(str(run_dir), "", "not a study run directory (no state.json)")
    if not (run_dir / "study.yaml").is_file():
        raise SpecError(str(run_dir), "", "not a study run directory (no study.yaml)")
    try:
        state = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise SpecError(str(path), "", f"broken state file: {str(e).splitlines()[0]}") from None
    need = {"study_name": str, "finished": bool}
    for key, kind in need.items():
        if not isinstance(state, dict) or not isinstance(state.get(key), kind):
            raise SpecError(str(path), key, f"broken state file: missing or not a {kind.__name__}")
    return state


def storage_url(study: Study, run_dir: Path) -> str:
    return study.spec.storage or f"sqlite:///{run_dir / 'optuna.db'}"


# ---------------------------------------------------------------------------------------------
# Ray


def _ray_env(local: bool) -> None:
    """Environment for Ray 2.60 before it is imported (research/ray_optuna.md pitfalls)."""
    defaults = {
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AIR_NEW_OUTPUT": "0",
        "RAY_CHDIR_TO_TRIAL_DIR": "0",
        "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "100000",
        "RAY_DEDUP_LOGS": "0",
        # Tune would add its TensorBoard logger to every run; `_loggers` adds the CSV and JSON
        # ones always and TensorBoard only when the study's `tracking` asks
        "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
        # Ctrl-C is the engine's (tune_parts.catching_sigint; Tune's handler would end fit() as
        # if the study were done): the run is marked interrupted and `resume` continues it
        "TUNE_DISABLE_SIGINT_HANDLER": "1",
    }
    if local:  # loopback only: no token file, node IP pinned to 127.0.0.1
        defaults.update({"RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    for key, value in defaults.items():
        os.environ.setdefault(key, value)


@contextmanager
def ray_session(study: Study, state: dict[str, Any], run_dir: Path) -> Iterator[None]:
    """Join the Ray that is already up (tests share one), a cluster (`ray.address`), or start a
    local one in a temp dir of its own and shut it down afterwards: the processes it started
    (recorded in state.json, `processes.py`) are stopped and its temp dir removed."""
    from titans_nas.search import processes

    address = study.spec.ray.address
    _ray_env(local=address is None)
    import ray

    if ray.is_initialized():
        yield
        return
    if address is None:
        state["ray_temp_dir"] = processes.new_temp_dir(run_dir)
        _write_state(run_dir, state)
        ray.init(
            num_cpus=study.spec.ray.num_cpus,
            include_dashboard=False,
            log_to_driver=False,
            logging_level="ERROR",
            _temp_dir=state["ray_temp_dir"],
        )
        record_processes(run_dir)
    else:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    try:
        yield
    finally:
        ray.shutdown()
        if address is None:  # our private session dir: logs of a finished run (trial errors are in trials/)
            _clean_up(run_dir, read_state(run_dir))


def record_processes(run_dir: Path) -> None:
    """Add the Ray processes below this driver (pid, start time) to state.json: what a later
    `resume` may stop if this driver dies without cleaning up (Tune calls it at each trial start)."""
    from titans_nas.search import processes

    state = read_state(run_dir)
    known = {pid: start for pid, start in state.get("ray_pids", [])}
    state["ray_pids"] = sorted((known | processes.descendants(os.getpid())).items())
    _write_state(run_dir, state)


def _clean_up(run_dir: Path, state: dict[str, Any]) -> None:
    """Stop the recorded Ray processes of this run and delete its Ray temp dir: only what this
    run dir verifiably created (`processes.owned_temp_dir`); a copied or edited state.json
    names nothing that is deleted or killed."""
    from titans_nas.search import processes

    temp = processes.owned_temp_dir(run_dir, state.get("ray_temp_dir"))
    processes.stop(state.get("ray_pids"), temp)
    if temp is not None:
        shutil.rmtree(temp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# the Tuner


def _trainable(study: Study):
    from ray import tune

    from titans_nas.search.trainable import run_trial

    r = study.spec.resources
    return tune.with_resources(run_trial, {"cpu": r.cpu, "gpu": r.gpu})


def _run_config(run_dir: Path, study: Study, state: dict[str, Any]):
    from ray import tune

    from titans_nas.search.tune_parts import Progress, RecordProcesses, StopOnSigint

    # the processes of a Ray this run started itself are recorded, to be stopped after a crash
    own = [RecordProcesses(str(run_dir))] if state.get("ray_temp_dir") else []

    return tune.RunConfig(
        name=EXPERIMENT,
        storage_path=str(run_dir),
        verbose=0,
        failure_config=tune.FailureConfig(max_failures=0),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        callbacks=[
            Progress([o.metric for o in study.spec.objectives]),
            StopOnSigint(),
            *own,
            *_loggers(study, run_dir),
        ],
    )


def _loggers(study: Study, run_dir: Path) -> list:
    """Ray Tune's own logger callbacks: its CSV and JSON result files, and the study's `tracking`."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    tracking, out = study.spec.tracking, [CSVLoggerCallback(), JsonLoggerCallback()]
    if tracking.mlflow is not None:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        m = tracking.mlflow
        out.append(
            MLflowLoggerCallback(
                tracking_uri=m.tracking_uri or f"sqlite:///{run_dir / 'mlflow.db'}",
                experiment_name=m.experiment or study.spec.name,
                tags={"study": study.spec.name, "run_dir": str(run_dir)},
                save_artifact=m.save_artifact,
            )
        )
    if tracking.tensorboard is not None:
        from ray.tune.logger import TBXLoggerCallback

        out.append(TBXLoggerCallback())
    return out


def make_tuner(study: Study, run_dir: Path, state: dict[str, Any]):
    from ray import tune

    spec = study.spec
    if isinstance(spec, SearchStudySpec):
        import optuna
        from ray.tune.schedulers import ASHAScheduler

        metrics = [o.metric for o in spec.objectives]
        modes = [o.mode for o in spec.objectives]
        model_space = {k: v for k, v in study.space.items()}
        from titans_nas.search.space import enqueued_params
        from titans_nas.search.tune_parts import StudySearch

        search = StudySearch(
            space=functools.partial(define_by_run, space=model_space, run_dir=str(run_dir)),
            metric=metrics if len(metrics) > 1 else metrics[0],
            mode=modes if len(modes) > 1 else modes[0],
            sampler=make_sampler(spec),
            storage=optuna.storages.RDBStorage(storage_url(study, run_dir)),
            study_name=state["study_name"],
            points_to_evaluate=enqueued_params(spec.enqueue, study.space, study.source) or None,
            startup=startup_count(spec) if spec.wait_for_startup else None,
        )
        scheduler = None
        if spec.scheduler is not None:
            scheduler = ASHAScheduler(
                time_attr="evals",  # reported by the trainable: evaluations done, from the step
                metric=metrics[0],
                mode=modes[0],
                max_t=spec.scheduled_evals(),
                grace_period=spec.scheduler.grace_period,
                reduction_factor=spec.scheduler.reduction_factor,
            )
        config = tune.TuneConfig(
            search_alg=search,
            scheduler=scheduler,
            num_samples=spec.trials,
            max_concurrent_trials=spec.concurrency,
            reuse_actors=True,
        )
        return tune.Tuner(_trainable(study), tune_config=config, run_config=_run_config(run_dir, study, state))
    assert isinstance(spec, AblationStudySpec | GridStudySpec)
    config = tune.TuneConfig(num_samples=1, max_concurrent_trials=spec.concurrency, reuse_actors=True)
    space = {"point": tune.grid_search(study.points()), "run_dir": str(run_dir)}
    return tune.Tuner(
        _trainable(study), param_space=space, tune_config=config, run_config=_run_config(run_dir, study, state)
    )


# ---------------------------------------------------------------------------------------------
# run / resume / status


def run(study_path: str | Path, run_dir: str | Path, overrides: tuple[str, ...] = ()) -> Path:
    """Validate the study (before Ray starts), create the run directory, run every trial."""
    study = load_study(study_path, list(overrides))
    _check_local_gpu(study, str(study_path))
    run_dir = Path(run_dir).absolute()
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(run_dir):
        refuse_links(run_dir, RUN_DIR_FILES)
        if (run_dir / "state.json").exists():
            from titans_nas.config import SpecError

            raise SpecError(str(run_dir), "", "already holds a study run: use `study resume` or another --out")
        return _start(study, run_dir)


def _start(study: Study, run_dir: Path) -> Path:
    (run_dir / "study.yaml").write_text(dump_study(study))
    state = {
        "study": study.spec.name,
        "kind": study.kind,
        "study_name": f"{study.spec.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
        "ray_temp_dir": None,  # set when the local Ray starts (ray_session)
        "ray_pids": [],
        "created": time.time(),
        "finished": False,
    }
    _write_state(run_dir, state)
    console.print(f"study {study.spec.name} ({study.kind}): {_size(study)} -> {run_dir}")
    return _fit(study, run_dir, state, restore=False)


def _check_local_gpu(study: Study, source: str) -> None:
    """On a local Ray, trials asking for a GPU this machine lacks would wait forever: refuse."""
    if study.spec.ray.address is None and study.spec.resources.gpu > 0:
        import torch

        if not torch.cuda.is_available():
            from titans_nas.config import SpecError

            raise SpecError(source, "resources.gpu", "this machine has no GPU torch can use (local Ray)")


def resume(run_dir: str | Path) -> Path:
    """Continue an interrupted run: finished trials stay, unfinished ones restart from their
    last checkpoint, the searcher continues where it was."""
    run_dir = Path(run_dir).absolute()
    read_state(run_dir)  # not a study run: refused before a lock file is created in it
    with run_lock(run_dir):
        refuse_links(run_dir, RUN_DIR_FILES)
        state = read_state(run_dir)
        study = load_study(run_dir / "study.yaml")
        _clean_up(run_dir, state)  # what a killed driver left behind
        state.update(ray_temp_dir=None, ray_pids=[], interrupted=None)
        _write_state(run_dir, state)
        console.print(f"resuming study {study.spec.name} in {run_dir}")
        return _fit(study, run_dir, state, restore=True)


RUN_DIR_FILES = (
    "study.yaml", "state.json", "optuna.db", "trials.json", "report.md", "trials.csv", "tune", "trials", "interrupted",
    "mlflow.db",
)  # fmt: skip
"""What a study writes at the top of its run directory (a link among them is refused)."""


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold an OS lock on the run dir (`.lock`, flock) while a driver runs or resumes it: a second
    `study run` / `resume` on it exits 2 instead of racing the first. The OS drops the lock when
    its holder dies, so a killed driver never leaves the run locked."""
    import fcntl

    from titans_nas.config import SpecError

    with open(run_dir / ".lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SpecError(
                str(run_dir), "", "another titans-nas driver is running this study (its lock is held)"
            ) from None
        yield


def _fit(study: Study, run_dir: Path, state: dict[str, Any], restore: bool) -> Path:
    with ray_session(study, state, run_dir):
        from ray import tune

        from titans_nas.search import tune_parts

        if restore and tune.Tuner.can_restore(str(run_dir / EXPERIMENT)):
            from titans_nas.search import snapshot

            for change in snapshot.reconcile(run_dir / EXPERIMENT):  # a driver killed mid-snapshot
                console.print(f"snapshot repaired: {change}")
            tuner = tune.Tuner.restore(
                str(run_dir / EXPERIMENT),
                trainable=_trainable(study),
                resume_unfinished=True,
                resume_errored=False,
                restart_errored=False,
            )
        else:
            tuner = make_tuner(study, run_dir, state)
        try:
            with tune_parts.catching_sigint() as sigint:
                grid = tuner.fit()
                if sigint.is_set():  # its KeyboardInterrupt was swallowed and Tune ended anyway
                    raise KeyboardInterrupt
        except KeyboardInterrupt:  # Ctrl-C: resumable, not finished (the CLI exits 130)
            state["interrupted"] = time.time()
            _write_state(run_dir, state)
            raise
        trials = []
        for result in grid:
            last = result.metrics or {}
            found = re.search(r"_([0-9a-f]{5}_\d{5})_", Path(result.path).name) if result.path else None
            trial_id = last.get("trial_id") or (found.group(1) if found else "?")
            trials.append(
                {
                    "trial_id": trial_id,
                    "status": tune_parts.trial_status(last, result.error is not None),
                    "config": {k: v for k, v in (result.config or {}).items() if k != "run_dir"},
                    "metrics": {k: v for k, v in last.items() if isinstance(v, (int, float, str, bool))},
                    "error": str(result.error).splitlines()[0] if result.error is not None else None,
                }
            )
    (run_dir / "trials.json").write_text(json.dumps(trials, indent=2, default=str))
    _set_aside_orphans(run_dir, {t["trial_id"] for t in trials})
    state["finished"] = True
    _write_state(run_dir, state)
    return run_dir


def _set_aside_orphans(run_dir: Path, known: set[str]) -> None:
    """A driver killed between starting a trial and Tune's next experiment snapshot leaves that
    trial's directory behind, unknown to the restored experiment, which runs a new trial in its
    place. Such a directory (no result, not in the summary) moves to `interrupted/`: kept for
    inspection, not counted as a trial of the study."""
    for d in sorted((run_dir / "trials").glob("*")) if (run_dir / "trials").is_dir() else []:
        if d.is_dir() and not d.is_symlink() and d.name not in known and not (d / "result.json").is_file():
            (run_dir / "interrupted").mkdir(exist_ok=True)
            d.rename(run_dir / "interrupted" / d.name)


def _write_state(run_dir: Path, state: dict[str, Any]) -> None:
    tmp = run_dir / "state.json.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(run_dir / "state.json")


def _size(study: Study) -> str:
    s = study.spec
    n = s.trials if isinstance(s, SearchStudySpec) else len(study.points())
    return f"{n} trials, {s.concurrency} at a time, {s.train.steps} steps each"
