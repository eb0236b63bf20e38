"""The Ray Tune pieces the engine plugs in. This module imports Ray at its top, so the engine
imports it only after setting Ray's environment; its classes are module level, so Tune pickles
them by reference."""

from __future__ import annotations

import signal
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import optuna
from ray.tune import Callback
from ray.tune.search.optuna import OptunaSearch
from rich.console import Console

console = Console(highlight=False)


class NSGAIISampler(optuna.samplers.NSGAIISampler):
    """Optuna's NSGA-II, picklable again: from Optuna 5.1 the GA samplers keep a threading.Lock
    for their generation cache, which pickle cannot copy, and Tune pickles the searcher with its
    sampler (the Tuner's state, every searcher checkpoint). The lock is left out when pickled and
    made anew when unpickled; nothing else changes."""

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_thread_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._thread_lock = threading.Lock()


# Optuna sampler name -> the class the engine builds where it is not Optuna's own
SAMPLER_CLASSES: dict[str, type] = {"NSGAIISampler": NSGAIISampler}


class StudySearch(OptunaSearch):
    """OptunaSearch that tells Optuna the truth about trials that did not finish: a trial ASHA
    stopped early is PRUNED (not a COMPLETE full-budget result), a diverged or crashed trial is
    FAIL. Only full-budget results reach the sampler and the Pareto front."""

    def __init__(self, *args: Any, startup: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.startup = startup

    def suggest(self, trial_id: str) -> dict | None:
        """Hold a trial back (Tune asks again later) while the sampler's random startup trials
        are all out but not all finished: concurrent asks would otherwise be drawn at random
        too, past the startup count (ray-project/ray#52535; docs/decisions/0008)."""
        if self.startup is not None and self._ot_study is not None and trial_id not in self._ot_trials:
            states = [t.state for t in self._ot_study.get_trials(deepcopy=False)]
            asked = sum(st != optuna.trial.TrialState.WAITING for st in states)
            done = sum(st in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for st in states)
            running = states.count(optuna.trial.TrialState.RUNNING)
            if asked >= self.startup and done < self.startup and running > 0:
                return None
        config = super().suggest(trial_id)
        if config is not None and trial_id in self._ot_trials:  # found again after a lost snapshot (snapshot.py)
            self._ot_trials[trial_id].set_user_attr("ray_trial_id", trial_id)
        return config

    def _setup_study(self, mode: str | list) -> None:
        super()._setup_study(mode)
        # the objectives' names in the storage: optuna-dashboard (`study dashboard`) shows them
        # instead of "Objective 0, 1"
        metrics = self._metric if isinstance(self._metric, list) else [self._metric]
        if self._ot_study is not None and self._ot_study.metric_names is None:
            with warnings.catch_warnings():  # experimental since Optuna 3.2, stable in use
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                self._ot_study.set_metric_names(metrics)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """Intermediate values keyed by evaluations done (the trainable's `evals`), not by Tune's
        iteration, which a trial restarted without Tune's checkpoint counts from 1 again. The
        full-budget result is the trial's last: Optuna is told it at once, not when Tune sees the
        trial end. Then the next trial is staged before the finished trial's actor is let go, so
        Tune keeps that actor for it: in the wait for the startup trials (`suggest`) Tune caches one
        idle actor only, and the second trial after the wait started a fresh process (5-6 s)."""
        if trial_id in self._completed_trials:  # its last result arrives again as Tune's "done"
            return
        if "evals" in result:
            result = {**result, "training_iteration": result["evals"]}
        super().on_trial_result(trial_id, result)
        if result.get("full_budget", False):
            self.on_trial_complete(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials:  # told at its full-budget result (on_trial_result)
            return
        if error or (result is not None and result.get("status") == "diverged"):
            return super().on_trial_complete(trial_id, None, error=True)
        if result is None or not result.get("full_budget", False):
            return super().on_trial_complete(trial_id, None, error=False)
        return super().on_trial_complete(trial_id, result, error=False)


def trial_status(last: dict[str, Any], error: bool) -> str:
    """completed | diverged | failed | stopped early, from a trial's last reported result."""
    if error:
        return "failed"
    if last.get("status") == "diverged":
        return "diverged"
    if last.get("full_budget"):
        return "completed"
    return "stopped early" if last else "not started"


class RecordProcesses(Callback):
    """At each trial start, the Ray processes below the driver (its workers) go into state.json,
    so a `resume` after the driver was killed can stop exactly those (engine.record_processes)."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        from pathlib import Path

        from titans_nas.search.engine import record_processes

        record_processes(Path(self.run_dir))


SIGINT_RECEIVED = threading.Event()
"""Set by the driver's Ctrl-C handler (`catching_sigint`) and read by `StopOnSigint`."""


@contextmanager
def catching_sigint() -> Iterator[threading.Event]:
    """Ctrl-C during `Tuner.fit()`, made reliable. A KeyboardInterrupt raised by the handler
    can land in a finalizer (Ray's object references and SQLAlchemy run them all the time):
    Python prints it with a traceback and carries on, and the study ran to its end and exited
    0 (seen in CI). So the handler only sets `SIGINT_RECEIVED`; `StopOnSigint` raises the
    KeyboardInterrupt at a known place of Tune's loop (its next step, well under a second
    away), and the engine checks it once more after fit() returns."""
    SIGINT_RECEIVED.clear()

    def note(signum: int, frame: Any) -> None:
        SIGINT_RECEIVED.set()

    previous = signal.signal(signal.SIGINT, note)
    try:
        yield SIGINT_RECEIVED
    finally:
        signal.signal(signal.SIGINT, previous)
        SIGINT_RECEIVED.clear()


class StopOnSigint(Callback):
    """Raises the KeyboardInterrupt of a Ctrl-C that was swallowed elsewhere, at the start of
    Tune's next step (Tune's loop lets it through: it catches `Exception` only)."""

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if SIGINT_RECEIVED.is_set():
            raise KeyboardInterrupt


class Progress(Callback):
    """Live progress in the terminal: one line per evaluation and per finished trial."""

    def __init__(self, objectives: list[str]) -> None:
        self.objectives = objectives
        self.started = time.time()

    def _line(self, trial: Any, text: str) -> None:
        console.print(f"[{time.time() - self.started:6.0f}s] {trial.trial_id:>12}  {text}")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        values = "  ".join(f"{m} {result[m]:.4g}" for m in self.objectives if isinstance(result.get(m), (int, float)))
        self._line(trial, f"step {result.get('step', '?'):>5}  {values}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(trial, f"done: {trial_status(trial.last_result or {}, error=False)}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(trial, "failed (see trials/<id>/error.txt)")
