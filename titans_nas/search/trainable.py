"""The Ray Tune function trainable every study trial runs: one call of `titans_nas.train.train`,
reporting each evaluation (with its checkpoint) to Tune, resuming from Tune's checkpoint."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import traceback
from functools import cache
from pathlib import Path
from typing import Any

from titans_nas.search.study import Study, load_study


@cache
def _study(run_dir: str) -> Study:
    return load_study(Path(run_dir) / "study.yaml")


def trial_params(config: dict[str, Any]) -> dict[str, Any]:
    """What identifies the trial inside its study: Optuna's params, or an ablation/grid point."""
    if "point" in config:
        return config["point"]
    return {"params": {k: v for k, v in config.items() if k != "run_dir"}}


def trial_device(study: Study) -> str:
    """A trial that holds a GPU (`resources.gpu > 0`; Ray sets CUDA_VISIBLE_DEVICES) trains on it."""
    if study.spec.resources.gpu > 0:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("the study gives each trial a GPU (resources.gpu) but this node's torch sees none")
        return "cuda"
    return "cpu"


def evaluate_at(study: Study, task: str, out: Path, cfg: Any, device: str) -> dict[str, float]:
    """The trained trial scored on its task at each value of the study's `evaluate_at` field:
    `{metric}@{value}` (loss and every metric the task reports), on the same fixed evaluation
    set recipe as during training."""
    import torch

    from titans_nas.evaluate import load_run
    from titans_nas.train import evaluate

    _, model = load_run(out)
    model = model.to(device)
    ((_, values),) = study.spec.evaluate_at[task].items()
    scores: dict[str, float] = {}
    for i, value in enumerate(values):
        got = evaluate(model, study.spec.task_at(task, i), cfg, torch.device(device))
        scores |= {f"{k}@{value}": v for k, v in got.items() if not k.startswith("block.")}
    return scores


def run_trial(config: dict[str, Any]) -> None:
    from ray import tune

    from titans_nas.config import dump_spec
    from titans_nas.train import read_metrics, train

    run_dir = Path(config["run_dir"])
    study = _study(str(run_dir))
    trial_id = tune.get_context().get_trial_id()
    out = run_dir / "trials" / trial_id
    out.mkdir(parents=True, exist_ok=True)
    point = trial_params(config)
    import ray

    node = ray.get_runtime_context().get_node_id()
    record = {"trial_id": trial_id, **point, "node": node, "pid": os.getpid(), "started": time.time()}
    (out / "trial.json").write_text(json.dumps(record, indent=2, default=str))
    try:
        spec, task, cfg = study.trial_setup(point)
        cfg = cfg.model_copy(update={"checkpoint_every": cfg.eval_every})
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:  # restarted (resume, or ASHA's pause): continue exactly
            with checkpoint.as_directory() as d:
                shutil.rmtree(out / "checkpoint", ignore_errors=True)
                shutil.copytree(d, out / "checkpoint")
        # without Tune's: a restart whose snapshot named a replaced checkpoint (snapshot.py) continues
        # from the newest one the trial wrote; a new trial's directory holds none
        resume = (out / "checkpoint" / "state.pt").is_file()
        (out / "spec.yaml").write_text(dump_spec(spec))
        objectives = [o.metric for o in study.spec.objectives]

        reported: list[int] = []

        def on_eval(rec: dict[str, Any], written: Path | None) -> None:
            reported.append(rec["step"])
            metrics = {k: v for k, v in rec.items() if k != "split"}
            # evals: the scheduler's clock, counted from the step so a restarted trial keeps it
            metrics.update(full_budget=rec["step"] >= cfg.steps, status="running", evals=rec["step"] // cfg.eval_every)
            ckpt = tune.Checkpoint.from_directory(str(written)) if written is not None else None
            tune.report(metrics, checkpoint=ckpt)

        result = train(spec, task, cfg, out, resume=resume, on_eval=on_eval, device=trial_device(study))
        if result.status == "completed" and not reported:  # restarted at its last step: Tune gets its result
            on_eval(read_metrics(out / "metrics.jsonl", "eval")[-1], None)
        if result.status == "completed" and point.get("task") in getattr(study.spec, "evaluate_at", {}):
            scores = evaluate_at(study, point["task"], out, cfg, trial_device(study))
            (out / "evaluate_at.json").write_text(json.dumps(scores, indent=2))
        if result.status == "diverged":
            tune.report(
                {
                    **{m: math.nan for m in objectives},
                    "step": result.step,
                    "full_budget": False,
                    "status": "diverged",
                    "message": result.message,
                }
            )
    except Exception as e:
        (out / "error.txt").write_text("".join(traceback.format_exception(e)))
        raise
