"""StudySpec: a study as data (DESIGN §8). Three kinds share one engine:

- `search`: Optuna samples the search space (define-by-run) for `trials` trials; ASHA may stop
  poor trials early; one or several objectives (several give a Pareto front);
- `ablation`: a base model and named one-at-a-time variants, each trained with every seed on
  every task; reported like the paper's Table 5 (mean +- std, delta to the baseline row);
- `grid`: every combination of the listed values of dotted spec paths, with every seed and task.

Everything is validated when the file is loaded, before Ray starts.
"""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from components.base import Spec, SpecRuleError
from titans_nas.config import SpecError, compose, dump_spec, read_yaml, union_members, validate
from titans_nas.spec import ModelSpec
from titans_nas.tasks import TaskSpec
from titans_nas.train import TrainSpec, check_compatible, curriculum_task


class ObjectiveSpec(Spec):
    """A metric the study optimises."""

    metric: str
    """A reported metric: `loss`, the task's metric (e.g. `exact_match`, `accuracy`,
    `bits_per_byte`), `params`, `tokens_per_s` or `peak_mem_mb`."""
    mode: Literal["min", "max"]
    """Whether smaller or larger is better."""


class ASHASpec(Spec):
    """Asynchronous successive halving (Ray Tune's ASHAScheduler) on the first objective."""

    kind: Literal["asha"] = "asha"
    grace_period: int = Field(1, ge=1)
    """Evaluations every trial gets before it can be stopped."""
    reduction_factor: float = Field(2.0, gt=1.0)
    """Keep the top 1/reduction_factor at each rung."""


class ResourcesSpec(Spec):
    """Resources one trial holds."""

    cpu: float = Field(1.0, gt=0.0)
    """CPU cores per trial."""
    gpu: float = Field(0.0, ge=0.0)
    """GPUs per trial (fractions share a GPU)."""


class RaySpec(Spec):
    """Where trials run."""

    address: str | None = None
    """null: start a local Ray; `auto`: join the cluster this machine belongs to; or host:port."""
    num_cpus: int | None = Field(None, ge=1)
    """CPUs of a local Ray (null: all of this machine's)."""


class MLflowSpec(Spec):
    """Log every trial as an MLflow run (Ray Tune's MLflowLoggerCallback): its parameters, each
    evaluation's metrics, and with `save_artifact` its trial directory."""

    tracking_uri: str | None = None
    """MLflow tracking URI; null = a local SQLite store in the run directory (`RUN/mlflow.db`;
    `mlflow ui --backend-store-uri sqlite:///RUN/mlflow.db` shows it)."""
    experiment: str | None = None
    """MLflow experiment name; null = the study's name."""
    save_artifact: bool = False
    """Also upload each trial's directory (checkpoints included) as run artifacts."""


class TensorBoardSpec(Spec):
    """Write each trial's reported metrics as TensorBoard events (Ray Tune's TBXLoggerCallback)
    into the trial's Tune directory: `tensorboard --logdir RUN/tune`."""


class TrackingSpec(Spec):
    """Experiment trackers fed by Ray Tune's own callbacks; each null = off."""

    mlflow: MLflowSpec | None = None
    """MLflow runs, one per trial."""
    tensorboard: TensorBoardSpec | None = None
    """TensorBoard event files, one directory per trial."""


class StudyBase(Spec):
    """Fields every study kind has."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    """Study name (letters, digits, `_.-`); the run gets a unique Optuna study name from it."""
    model: str | dict[str, Any]
    """The base model: a preset name, a spec path (relative to the study file) or an inline spec."""
    train: TrainSpec = TrainSpec(steps=200, eval_every=50)
    """Training budget of every trial (`eval_every` is also ASHA's time unit)."""
    objectives: list[ObjectiveSpec] = Field(min_length=1)
    """What to optimise or report; the first one also drives the scheduler and `best`."""
    concurrency: int = Field(2, ge=1)
    """Trials running at the same time."""
    resources: ResourcesSpec = ResourcesSpec()
    """Per trial."""
    storage: str | None = None
    """Optuna storage URL (search studies); null = SQLite in the run directory. Use PostgreSQL
    (`postgresql://...`) when several drivers or a cluster share it."""
    ray: RaySpec = RaySpec()
    """Local Ray or a cluster."""
    tracking: TrackingSpec = TrackingSpec()
    """Experiment tracking (MLflow, TensorBoard); off by default."""

    def scheduled_evals(self) -> int:
        return max(1, self.train.steps // self.train.eval_every)


class SearchStudySpec(StudyBase):
    """Optuna (through Ray Tune's OptunaSearch) samples a search space."""

    kind: Literal["search"] = "search"
    space: str | dict[str, Any]
    """The search space: a path (relative to the study file) or an inline mapping."""
    task: TaskSpec
    """The task every trial trains on."""
    trials: int = Field(8, ge=1)
    """Configurations to sample."""
    sampler: Literal["tpe", "nsga2", "gp", "random"] = "tpe"
    """Optuna sampler (TPE and NSGA-II handle several objectives)."""
    seed: int = Field(0, ge=0)
    """Seed of the sampler; every trial also trains with train.seed."""
    startup_trials: int | None = Field(None, ge=2)
    """Trials the sampler draws at random before it models the results (TPE / GP
    `n_startup_trials`, NSGA-II `population_size`); null = the sampler's default (10, 10, 50).
    Enqueued trials count among them."""
    wait_for_startup: bool = True
    """Concurrent trials wait for the startup trials to finish, so exactly `startup_trials` are
    random (otherwise every trial asked while they run is random too: ray-project/ray#52535)."""
    scheduler: ASHASpec | None = ASHASpec()
    """Early stopping; null = every trial gets the full budget."""
    enqueue: list[dict[str, Any]] = []
    """Configurations tried first (e.g. the paper's defaults), by parameter name:
    `{block.kind: mag, block.mag.window: 32, heads: 4}`; the others are sampled."""

    @property
    def named_tasks(self) -> dict[str, TaskSpec]:
        return {"task": self.task}

    def trial_setup(
        self, base: ModelSpec, space: dict[str, Any] | None, config: dict[str, Any]
    ) -> tuple[ModelSpec, Any, TrainSpec]:
        """A trial's model (the base with the sampled parameters), task and training config."""
        from titans_nas.search.space import replay

        spec, train_over = replay(base, space, config["params"])
        train = validate({**self.train.model_dump(mode="json"), **train_over}, TrainSpec, {"": "search space"})
        return spec, self.task, train

    @model_validator(mode="after")
    def _sampler_fits(self) -> SearchStudySpec:
        if len(self.objectives) > 1 and self.sampler == "gp":
            raise SpecRuleError("sampler", "the GP sampler takes one objective; use tpe or nsga2 for several")
        if self.sampler == "random" and self.startup_trials is not None:
            raise SpecRuleError("startup_trials", "the random sampler has no startup phase (every trial is random)")
        try:
            curriculum_task(self.task, self.train)
        except SpecRuleError as e:
            raise e.under("train") from None
        return self


class MultiTaskStudy(StudyBase):
    """Fields of the studies that train every configuration on several named tasks."""

    tasks: dict[str, TaskSpec] = Field(min_length=1)
    """Named tasks; every configuration trains on each."""
    task_train: dict[str, dict[str, Any]] = {}
    """Per-task changes to `train` (e.g. a smaller batch for a long-context task):
    `{niah: {batch_size: 8, steps: 300}}`."""

    evaluate_at: dict[str, dict[str, list[Any]]] = {}
    """Per task, one of its fields and values for it: after training, the trained model is also
    scored on the task with that field set to each value, recorded as `{metric}@{value}`
    (`{niah: {context_len: [256, 1024, 4096]}}`: length generalisation, the grid of the paper's
    Table 2; the report gives a table and a heatmap per task)."""

    @model_validator(mode="after")
    def _evaluate_at_fits(self) -> MultiTaskStudy:
        for name, sweep in self.evaluate_at.items():
            where = f"evaluate_at.{name}"
            if name not in self.tasks:
                raise SpecRuleError(where, f"'{name}' is not one of the tasks: {', '.join(self.tasks)}")
            if len(sweep) != 1:
                raise SpecRuleError(where, f"name exactly one field of the task to vary, not {len(sweep)}")
            (field, values), task = next(iter(sweep.items())), self.tasks[name]
            if field not in type(task).model_fields or field == "kind":
                raise SpecRuleError(f"{where}.{field}", f"not a field of the {task.kind} task")
            if not values:
                raise SpecRuleError(f"{where}.{field}", "give at least one value")
            for i, _ in enumerate(values):
                try:
                    self.task_at(name, i)
                except ValidationError as e:
                    raise SpecRuleError(f"{where}.{field}.{i}", e.errors()[0]["msg"]) from None
        return self

    def task_at(self, name: str, i: int) -> Any:
        """Task `name` with its `evaluate_at` field set to the i-th value (validated)."""
        ((field, values),) = self.evaluate_at[name].items()
        task = self.tasks[name]
        return type(task).model_validate({**task.model_dump(), field: values[i]})

    @model_validator(mode="after")
    def _task_train_fits(self) -> MultiTaskStudy:
        for name in self.task_train:
            if name not in self.tasks:
                raise SpecRuleError(f"task_train.{name}", f"'{name}' is not one of the tasks: {', '.join(self.tasks)}")
            try:
                self.train_for(name)
            except ValidationError as e:
                err = e.errors()[0]
                rule = (err.get("ctx") or {}).get("error")
                if isinstance(rule, SpecRuleError):  # a rule of TrainSpec's: its own path and reason
                    raise rule.under(f"task_train.{name}") from None
                where = ".".join(str(x) for x in err["loc"])
                raise SpecRuleError(f"task_train.{name}.{where}", err["msg"]) from None
        for name, task in self.tasks.items():  # a curriculum must fit each task it applies to
            try:
                curriculum_task(task, self.train_for(name))
            except SpecRuleError as e:
                own = "curriculum" in self.task_train.get(name, {})
                raise e.under(f"task_train.{name}" if own else "train") from None
        return self

    def train_for(self, task: str) -> TrainSpec:
        return TrainSpec.model_validate({**self.train.model_dump(), **self.task_train.get(task, {})})

    @property
    def named_tasks(self) -> dict[str, TaskSpec]:
        return self.tasks

    def trial_setup(
        self, base: ModelSpec, space: dict[str, Any] | None, point: dict[str, Any]
    ) -> tuple[ModelSpec, Any, TrainSpec]:
        """A trial's model (`point_spec`), its task and that task's training config at its seed."""
        train = self.train_for(point["task"]).model_copy(update={"seed": point["seed"]})
        return self.point_spec(base, point), self.tasks[point["task"]], train

    @abstractmethod
    def point_spec(self, base: ModelSpec, point: dict[str, Any]) -> ModelSpec:
        """The model of one trial: the base with the point's change."""

    @abstractmethod
    def points(self) -> list[dict[str, Any]]:
        """One dict per trial: what changes the base model, the task, the seed."""


class AblationStudySpec(MultiTaskStudy):
    """The base model and named variants of it, one change each (the paper's Table 5)."""

    kind: Literal["ablation"] = "ablation"
    variants: dict[str, list[str] | dict[str, Any]] = Field(min_length=1)
    """Row name -> the change to the base model: dotted overrides (`block.memory.momentum=null`)
    or a nested mapping. An empty list is the base itself."""
    baseline: str
    """The row the others are compared with (delta columns)."""
    seeds: list[int] = Field([0, 1], min_length=1)
    """Training seeds; the report gives mean +- std over them."""

    @model_validator(mode="after")
    def _baseline_listed(self) -> AblationStudySpec:
        if self.baseline not in self.variants:
            raise SpecRuleError("baseline", f"'{self.baseline}' is not one of the variants: {', '.join(self.variants)}")
        return self

    def points(self) -> list[dict[str, Any]]:
        """One trial per variant, task and seed."""
        return [
            {"variant": v, "task": t, "seed": seed} for v in self.variants for t in self.tasks for seed in self.seeds
        ]

    def point_spec(self, base: ModelSpec, point: dict[str, Any]) -> ModelSpec:
        return variant_spec(base, self.variants[point["variant"]], f"variants.{point['variant']}")


class GridStudySpec(MultiTaskStudy):
    """Every combination of values of dotted spec paths."""

    kind: Literal["grid"] = "grid"
    grid: dict[str, Annotated[list[Any], Field(min_length=1)]] = Field(min_length=1)
    """Dotted spec path -> the values to try (`block.window: [16, 32, 64]`)."""
    seeds: list[int] = Field([0], min_length=1)
    """Training seeds."""

    def points(self) -> list[dict[str, Any]]:
        """One trial per combination of the grid's values, task and seed."""
        combos: list[dict[str, Any]] = [{}]
        for path, values in self.grid.items():
            combos = [{**c, path: v} for c in combos for v in values]
        return [{"values": c, "task": t, "seed": seed} for c in combos for t in self.tasks for seed in self.seeds]

    def point_spec(self, base: ModelSpec, point: dict[str, Any]) -> ModelSpec:
        return variant_spec(base, [f"{k}={json_value(v)}" for k, v in point["values"].items()], "grid")


StudySpec = Annotated[SearchStudySpec | AblationStudySpec | GridStudySpec, Field(discriminator="kind")]


# ---------------------------------------------------------------------------------------------


class Study:
    """A loaded study: the spec, the resolved base model, the resolved space, and the trial
    configurations it runs (`points` for ablation and grid)."""

    def __init__(
        self,
        spec: SearchStudySpec | AblationStudySpec | GridStudySpec,
        base: ModelSpec,
        space: dict[str, Any] | None,
        source: str,
    ) -> None:
        self.spec, self.base, self.space, self.source = spec, base, space, source

    @property
    def kind(self) -> str:
        return self.spec.kind

    def points(self) -> list[dict[str, Any]]:
        """Ablation and grid: one dict per trial (variant or grid values, task, seed)."""
        return self.spec.points()

    def trial_setup(self, config: dict[str, Any]) -> tuple[ModelSpec, Any, TrainSpec]:
        """The model spec, task and training config of one trial, from its Tune config."""
        return self.spec.trial_setup(self.base, self.space, config)


def json_value(v: Any) -> str:
    """A value as the right-hand side of a dotted override (YAML flow syntax)."""
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


def variant_spec(base: ModelSpec, change: list[str] | dict[str, Any], where: str) -> ModelSpec:
    """base + one ablation change (dotted overrides or a nested mapping), validated."""
    layers = [(where, base.model_dump(mode="json"))] + ([(where, change)] if isinstance(change, dict) else [])
    overrides = change if isinstance(change, list) else ()
    data, provenance = compose(*layers, overrides=overrides, cls=ModelSpec)
    return validate(data, ModelSpec, provenance)


def load_study(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Study:
    """Read, compose (`extends`, `--set`) and validate a study file, its base model, its space and
    every trial's model. Raises SpecError (file, dotted path, reason) before anything runs."""
    from titans_nas.search.space import check_space

    data, provenance = compose(path, overrides=overrides, presets=Path(path).parent)
    kind = data.get("kind")
    members = union_members(StudySpec)
    if kind not in members:
        raise SpecError(
            str(path), "kind", f"unknown or missing study kind {kind!r} (expected one of: {', '.join(members)})"
        )
    spec = validate(data, members[kind], provenance)
    here = Path(path).parent
    base = _load_model(spec.model, here, str(path))
    space = None
    if isinstance(spec, SearchStudySpec):
        space, space_source = _load_space(spec.space, here, str(path))
        train_space = space.get("train")
        model_space = {k: v for k, v in space.items() if k != "train"}
        check_space(model_space, base, space_source)
        if train_space is not None:
            _check_train_space(train_space, space_source)
        from titans_nas.search.space import enqueued_params

        enqueued_params(spec.enqueue, space, str(path))
        check_compatible(base, spec.task)
    study = Study(spec, base, space, str(path))
    _check_objectives(spec.objectives, spec.named_tasks, str(path))
    if not isinstance(spec, SearchStudySpec):
        for point in study.points():
            model, task, _ = study.trial_setup(point)
            try:
                check_compatible(model, task)
            except SpecError as e:
                raise SpecError(str(path), f"tasks.{point['task']}", e.reason) from None
    return study


TRAINING_METRICS = ("loss", "params", "tokens_per_s", "peak_mem_mb", "grad_norm", "grad_norm_max")
"""What every trial reports besides its task's own metrics."""


def reported_metrics(task: Any) -> set[str]:
    """The metrics a trial on `task` reports: the training ones and what the task's `score`
    returns (read off one scored example, so nothing is listed twice)."""
    import torch

    batch = task.sample(1, torch.Generator().manual_seed(0), "eval")
    logits = torch.zeros(*batch.targets.shape, task.vocab_size)
    return {*TRAINING_METRICS, *task.score(logits, batch)}


def _check_objectives(objectives: list[ObjectiveSpec], tasks: dict[str, Any], source: str) -> None:
    """Every objective must be a metric some task of the study reports (else its column stays
    empty and the search optimises nothing): refused before Ray starts."""
    known = {name: reported_metrics(task) for name, task in tasks.items()}
    for i, objective in enumerate(objectives):
        if not any(objective.metric in metrics for metrics in known.values()):
            offered = sorted(set().union(*known.values()))
            reason = f"no task reports '{objective.metric}' (they report: {', '.join(offered)})"
            raise SpecError(source, f"objectives.{i}.metric", reason)


def _load_model(model: str | dict[str, Any], here: Path, source: str) -> ModelSpec:
    """A preset name, a spec path (relative to the study file first) or an inline spec that
    may itself `extends:` presets or paths."""
    inline = (f"{source} (model)", model) if isinstance(model, dict) else model
    data, provenance = compose(inline, cls=ModelSpec, relative_to=here)
    return validate(data, ModelSpec, provenance)


def _load_space(space: str | dict[str, Any], here: Path, source: str) -> tuple[dict[str, Any], str]:
    if isinstance(space, dict):
        return space, f"{source} (space)"
    candidates = [here / space, Path(space)]
    for candidate in candidates:
        if candidate.is_file():
            return read_yaml(candidate), str(candidate)
    raise SpecError(source, "space", f"no search space file '{space}'")


def _check_train_space(space: Any, source: str) -> None:
    from titans_nas.search.space import _check_leaf, is_leaf

    if not isinstance(space, dict):
        raise SpecError(source, "train", "train knobs are a mapping of TrainSpec fields")
    for key, value in space.items():
        if key not in TrainSpec.model_fields:
            raise SpecError(source, f"train.{key}", f"unknown training field '{key}'")
        if is_leaf(value):
            _check_leaf(value, source, f"train.{key}")


def dump_study(study: Study) -> str:
    """The resolved study (model inlined, space inlined): what the run directory keeps."""
    data = study.spec.model_dump(mode="json")
    data["model"] = study.base.model_dump(mode="json")
    if study.space is not None:
        data["space"] = study.space
    return yaml.safe_dump(data, sort_keys=False)


__all__ = ["Study", "StudySpec", "dump_spec", "dump_study", "load_study"]
