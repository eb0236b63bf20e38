"""Study reports: the trials table (markdown + CSV), the best configurations, the Pareto front,
parameter importances and learning curves (PNG), and the paper's Table-5 view for ablations.
Everything is read from the run directory, so `study status` works on a live run too."""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from titans_nas.search.study import AblationStudySpec, SearchStudySpec, Study, load_study
from titans_nas.train import read_metrics


@dataclass
class TrialRecord:
    trial_id: str
    status: str
    point: dict[str, Any]
    metrics: dict[str, Any]
    steps: int
    curve: list[dict[str, Any]] = field(default_factory=list)
    dir: Path | None = None

    def value(self, metric: str) -> float | None:
        v = self.metrics.get(metric)
        return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None

    def label(self) -> str:
        if "variant" in self.point:
            return f"{self.point['variant']} / {self.point['task']} / seed {self.point['seed']}"
        if "values" in self.point:
            vals = ", ".join(f"{k}={v}" for k, v in self.point["values"].items())
            return f"{vals} / {self.point['task']} / seed {self.point['seed']}"
        return ", ".join(f"{k}={_short(v)}" for k, v in sorted(self.point.get("params", {}).items()))


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def load_trials(run_dir: Path) -> list[TrialRecord]:
    """Every trial of the run. Status from the engine's final summary when the run finished,
    otherwise from what each trial left on disk (a live or interrupted run)."""
    summary = {}
    if (run_dir / "trials.json").is_file():
        summary = {t["trial_id"]: t for t in json.loads((run_dir / "trials.json").read_text())}
    records = []
    for d in sorted((run_dir / "trials").glob("*")) if (run_dir / "trials").is_dir() else []:
        info = json.loads((d / "trial.json").read_text()) if (d / "trial.json").is_file() else {}
        evals = read_metrics(d / "metrics.jsonl", "eval")
        metrics = dict(evals[-1]) if evals else {}
        if (d / "evaluate_at.json").is_file():  # the study's `evaluate_at` scores, after training
            metrics |= json.loads((d / "evaluate_at.json").read_text())
        result = json.loads((d / "result.json").read_text()) if (d / "result.json").is_file() else None
        if d.name in summary:
            status = summary[d.name]["status"]
        elif result is not None:
            status = result["status"]
        elif (d / "error.txt").is_file():
            status = "failed"
        else:
            status = "running"
        if status == "diverged":
            metrics = {k: math.nan for k in metrics} | {"step": metrics.get("step")}
        point = {k: v for k, v in info.items() if k not in ("trial_id", "node")}
        # the steps it trained: where it stopped (its result), else its last evaluation (a live run)
        steps = result["step"] if result is not None and "step" in result else metrics.get("step")
        records.append(TrialRecord(d.name, status, point, metrics, int(steps or 0), evals, d))
    known = {r.trial_id for r in records}
    for tid, t in summary.items():  # trials that failed before writing anything
        if tid not in known:
            records.append(TrialRecord(tid, t["status"], t.get("config", {}), {}, 0))
    return records


def pareto(records: list[TrialRecord], objectives: list[tuple[str, str]]) -> list[TrialRecord]:
    """Non-dominated completed trials."""
    done = [r for r in records if r.status == "completed" and all(r.value(m) is not None for m, _ in objectives)]
    sign = {m: (1 if mode == "min" else -1) for m, mode in objectives}

    def dominates(a: TrialRecord, b: TrialRecord) -> bool:
        pa = [sign[m] * a.value(m) for m, _ in objectives]
        pb = [sign[m] * b.value(m) for m, _ in objectives]
        return all(x <= y for x, y in zip(pa, pb)) and any(x < y for x, y in zip(pa, pb))

    return [r for r in done if not any(dominates(o, r) for o in done if o is not r)]


def status_counts(records: list[TrialRecord]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in records:
        counts[r.status] = counts.get(r.status, 0) + 1
    return counts


def trials_table(records: list[TrialRecord], metrics: list[str]) -> str:
    rows = [
        "| trial | status | steps | " + " | ".join(metrics) + " | configuration |",
        "|" + "---|" * (len(metrics) + 4),
    ]
    for r in records:
        vals = [_fmt(r.metrics.get(m)) for m in metrics]
        rows.append(f"| {r.trial_id} | {r.status} | {r.steps} | " + " | ".join(vals) + f" | {r.label()} |")
    return "\n".join(rows)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return "-" if v is None else str(v)


def report(run_dir: str | Path) -> Path:
    """Write report.md, trials.csv, best/ (specs) and PNG plots into the run directory."""
    run_dir = Path(run_dir)
    study = load_study(run_dir / "study.yaml")
    records = load_trials(run_dir)
    objectives = [(o.metric, o.mode) for o in study.spec.objectives]
    shown = list(dict.fromkeys([m for m, _ in objectives] + ["loss", "params", "tokens_per_s"]))
    lines = [
        f"# Study {study.spec.name} ({study.kind})",
        "",
        "Trials: " + ", ".join(f"{n} {s}" for s, n in sorted(status_counts(records).items())),
        "",
    ]
    if isinstance(study.spec, AblationStudySpec):
        lines += [
            "## Ablation (mean +- std over seeds; delta to the baseline row)",
            "",
            ablation_table(study, records),
            "",
        ]
    if getattr(study.spec, "evaluate_at", None):
        lines += evaluate_at_tables(study, records)
    best = best_trials(records, objectives)
    if isinstance(study.spec, SearchStudySpec):
        lines += findings(records, objectives, best)
    lines += ["## Best", ""]
    groups = [(None, best)] if isinstance(study.spec, SearchStudySpec) else best_per_task(study, records, objectives)
    if not any(found for _, found in groups):
        lines.append("No trial completed its full budget.")
    for task, found in groups:
        for r in found:
            vals = ", ".join(f"{m} {_fmt(r.value(m))}" for m, _ in objectives if r.value(m) is not None)
            where = f"{task}: " if task else ""
            lines.append(f"- {where}`{r.trial_id}`: {vals}; {r.label()} (spec: `trials/{r.trial_id}/spec.yaml`)")
    lines += ["", "## Trials", "", trials_table(records, shown), ""]
    plots = write_plots(run_dir, study, records, objectives)
    if any(p.name == "importance.png" for p in plots):
        found = yaml.safe_load((run_dir / "importance.yaml").read_text())
        lines += [f"## Parameter importance ({found['basis']})", ""]
        thin = set(found.get("thin", []))
        lines += [
            f"- `{name}`: {value:.3f}"
            + (" (inaccurate: set in, or absent from, fewer than 2 trials)" if name in thin else "")
            for name, value in found["importances"].items()
        ] + [""]
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    (run_dir / "report.md").write_text("\n".join(lines))
    with open(run_dir / "trials.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial", "status", "steps", *shown, "configuration"])
        for r in records:
            w.writerow([r.trial_id, r.status, r.steps, *[r.metrics.get(m, "") for m in shown], r.label()])
    return run_dir / "report.md"


def findings(records: list[TrialRecord], objectives: list[tuple[str, str]], front: list[TrialRecord]) -> list[str]:
    """The report's first lines for a search: the best block kind on the first objective, its
    margin over the best `swa` trial (the attention-only baseline), and the front."""
    metric, mode = objectives[0]
    sign = 1 if mode == "max" else -1
    kind_of = lambda r: r.point.get("params", {}).get("block.kind")  # noqa: E731
    by_kind: dict[str, TrialRecord] = {}
    for r in records:
        kind, v = kind_of(r), r.value(metric)
        if r.status == "completed" and kind is not None and v is not None:
            if kind not in by_kind or sign * v > sign * by_kind[kind].value(metric):
                by_kind[kind] = r
    lines = ["## Found", ""]
    if not by_kind:
        return lines + ["No completed trial names a block kind (`block.kind` is not searched).", ""]
    ranked = sorted(by_kind.items(), key=lambda kv: -sign * kv[1].value(metric))
    (top, r), rest = ranked[0], dict(ranked[1:])
    line = f"- Best kind: **{top}**, {metric} {_fmt(r.value(metric))} (`{r.trial_id}`)"
    if top != "swa" and "swa" in rest:
        margin = r.value(metric) - rest["swa"].value(metric)
        line += f"; **{margin:+.4g}** over the best `swa` ({_fmt(rest['swa'].value(metric))}, `{rest['swa'].trial_id}`)"
    elif top != "swa":
        line += "; no `swa` trial completed, so no margin over the baseline"
    lines.append(line + ".")
    lines.append("- Best per kind: " + ", ".join(f"{k} {_fmt(t.value(metric))}" for k, t in ranked) + ".")
    if len(objectives) > 1:
        points = "; ".join(
            f"{kind_of(r) or '?'} " + ", ".join(f"{m} {_fmt(r.value(m))}" for m, _ in objectives) for r in front
        )
        lines.append(f"- Pareto front ({', '.join(m for m, _ in objectives)}): {len(front)} points: {points}.")
    done = sum(r.status == "completed" for r in records)
    lines.append(f"- {done} of {len(records)} trials completed their full budget.")
    return lines + [""]


def best_trials(records: list[TrialRecord], objectives: list[tuple[str, str]]) -> list[TrialRecord]:
    """The best completed trial (one objective) or the Pareto front (several), best first on the
    first objective."""
    metric, mode = objectives[0]
    front = pareto(records, objectives)
    return sorted(front, key=lambda r: r.value(metric) * (1 if mode == "min" else -1))


def best_per_task(
    study: Study, records: list[TrialRecord], objectives: list[tuple[str, str]]
) -> list[tuple[str, list[TrialRecord]]]:
    """Ablations and grids: per task, the best trial (or front) on the objectives that task reports."""
    out = []
    for task in study.spec.tasks:
        mine = [r for r in records if r.point.get("task") == task]
        own = [(m, mode) for m, mode in objectives if any(r.value(m) is not None for r in mine)]
        out.append((task, best_trials(mine, own) if own else []))
    return out


def ablation_table(study: Study, records: list[TrialRecord]) -> str:
    spec = study.spec
    assert isinstance(spec, AblationStudySpec)
    metrics = [o.metric for o in spec.objectives]
    done = [r for r in records if r.status == "completed"]
    # a column per task and objective that task reports (Shakespeare has no accuracy, MQAR no
    # bits per byte); before any trial finished, every pair
    reported = {(r.point.get("task"), m) for r in done for m in metrics if r.value(m) is not None}
    cols = [(t, m) for t in spec.tasks for m in metrics if (t, m) in reported or not done]

    def values(variant: str, task: str, metric: str) -> list[float]:
        return [
            v
            for r in done
            if r.point.get("variant") == variant and r.point.get("task") == task
            for v in [r.value(metric)]
            if v is not None
        ]

    def mean_std(xs: list[float]) -> str:
        if not xs:
            return "-"
        return f"{statistics.mean(xs):.4g} ± {statistics.stdev(xs):.2g}" if len(xs) > 1 else f"{xs[0]:.4g}"

    # with several tasks, the first objective's mean over tasks (MAD's protocol score, for one)
    same = all(type(t).metric == metrics[0] for t in spec.tasks.values())
    overall = metrics[0] if len(spec.tasks) > 1 and same else None

    def over_tasks(variant: str) -> str:
        means = [statistics.mean(xs) for t in spec.tasks for xs in [values(variant, t, overall)] if xs]
        return f"{statistics.mean(means):.4g}" if len(means) == len(spec.tasks) else "-"

    head = (
        "| variant | "
        + " | ".join(f"{t}: {m}" for t, m in cols)
        + (f" | mean {overall} over tasks" if overall else "")
        + " | "
        + " | ".join(f"Δ {t}: {m}" for t, m in cols)
        + " |"
    )
    rows = [head, "|" + "---|" * (1 + 2 * len(cols) + bool(overall))]
    for variant in spec.variants:
        cells = [mean_std(values(variant, t, m)) for t, m in cols] + ([over_tasks(variant)] if overall else [])
        deltas = []
        for t, m in cols:
            mine, base = values(variant, t, m), values(spec.baseline, t, m)
            deltas.append(
                "-"
                if variant == spec.baseline or not mine or not base
                else f"{statistics.mean(mine) - statistics.mean(base):+.4g}"
            )
        rows.append(f"| {variant} | " + " | ".join(cells) + " | " + " | ".join(deltas) + " |")
    return "\n".join(rows)


def row_name(r: TrialRecord) -> str:
    """A multi-task trial's row: its ablation variant or grid values (without task and seed)."""
    if "variant" in r.point:
        return r.point["variant"]
    return ", ".join(f"{k}={v}" for k, v in r.point.get("values", {}).items())


def evaluate_at_grid(
    study: Study, records: list[TrialRecord], task: str
) -> tuple[str, str, list[Any], dict[str, list[list[float]]]]:
    """One task's `evaluate_at` scores: (field, metric, values, row -> per value the scores over
    seeds). The metric is the first objective's where the trials recorded it, else the task's."""
    ((varied, values),) = study.spec.evaluate_at[task].items()
    done = [r for r in records if r.status == "completed" and r.point.get("task") == task]
    metric = study.spec.objectives[0].metric
    if not any(f"{metric}@{values[0]}" in r.metrics for r in done):
        metric = type(study.spec.tasks[task]).metric
    rows: dict[str, list[list[float]]] = {}
    for r in done:
        cells = rows.setdefault(row_name(r), [[] for _ in values])
        for cell, value in zip(cells, values):
            v = r.value(f"{metric}@{value}")
            if v is not None:
                cell.append(v)
    return varied, metric, values, rows


def evaluate_at_tables(study: Study, records: list[TrialRecord]) -> list[str]:
    """The report's section for `evaluate_at`: per task, rows x values, mean (+- std over seeds)."""
    lines = []
    for task in study.spec.evaluate_at:
        name, metric, values, rows = evaluate_at_grid(study, records, task)
        lines += [f"## {task}: {metric} at each {name} (after training)", ""]
        lines.append("| | " + " | ".join(f"{name} {v}" for v in values) + " | mean |")
        lines.append("|" + "---|" * (len(values) + 2))
        for row, cells in rows.items():
            shown = [
                "-" if not c else f"{statistics.mean(c):.3g}" + (f" ± {statistics.stdev(c):.2g}" if len(c) > 1 else "")
                for c in cells
            ]
            means = [statistics.mean(c) for c in cells if c]
            mean = f"{statistics.mean(means):.3g}" if len(means) == len(cells) else "-"
            lines.append(f"| {row} | " + " | ".join(shown) + f" | {mean} |")
        lines.append("")
    return lines


def _evaluate_at_heatmap(run_dir: Path, study: Study, records: list[TrialRecord], plt: Any) -> Path | None:
    """One panel per task (rows x values, the layout of the paper's Table 2), colour = mean."""
    grids = [(task, *evaluate_at_grid(study, records, task)) for task in study.spec.evaluate_at]
    grids = [g for g in grids if g[4]]
    if not grids:
        return None
    n_rows = max(len(g[4]) for g in grids)
    fig, axes = plt.subplots(1, len(grids), figsize=(1.5 + 3.2 * len(grids), 1.2 + 0.42 * n_rows), squeeze=False)
    for ax, (task, varied, metric, values, rows) in zip(axes[0], grids):
        names = list(rows)
        means = [[statistics.mean(c) if c else math.nan for c in rows[n]] for n in names]
        bounded = metric in ("accuracy", "exact_match")
        im = ax.imshow(means, cmap="RdYlGn", aspect="auto", vmin=0 if bounded else None, vmax=1 if bounded else None)
        ax.set_xticks(range(len(values)), [str(v) for v in values], fontsize=8)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_xlabel(varied)
        for i, row in enumerate(means):
            for j, v in enumerate(row):
                ax.text(j, i, "-" if math.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=7)
        ax.set_title(f"{task}: {metric}", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    return _save(fig, run_dir / "evaluate_at.png")


def write_plots(
    run_dir: Path, study: Study, records: list[TrialRecord], objectives: list[tuple[str, str]]
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: list[Path] = []
    metric = objectives[0][0]
    curves = [r for r in records if r.curve and any(metric in c for c in r.curve)]
    if curves:
        fig, ax = plt.subplots(figsize=(7, 4))
        for r in curves:
            pts = [(c["step"], c[metric]) for c in r.curve if isinstance(c.get(metric), (int, float))]
            ax.plot(*zip(*pts), marker=".", alpha=0.8, label=r.trial_id)
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.set_title(f"{study.spec.name}: learning curves")
        if len(curves) <= 12:
            ax.legend(fontsize=6)
        fig.tight_layout()
        out.append(_save(fig, run_dir / "curves.png"))
    if getattr(study.spec, "evaluate_at", None) and (heat := _evaluate_at_heatmap(run_dir, study, records, plt)):
        out.append(heat)
    health = [r for r in records if any("grad_norm" in c for c in r.curve)]
    if health:
        out.append(_health_plot(run_dir / "memory_health.png", study.spec.name, health, plt))
    if len(objectives) >= 2:
        (m1, _), (m2, _) = objectives[:2]
        done = [r for r in records if r.status == "completed" and r.value(m1) is not None and r.value(m2) is not None]
        front = pareto(records, objectives)
        if done:
            fig, ax = plt.subplots(figsize=(6, 4))
            ax.scatter([r.value(m1) for r in done], [r.value(m2) for r in done], c="grey", label="completed")
            pts = sorted((r.value(m1), r.value(m2)) for r in front)
            ax.plot(*zip(*pts), "o-", c="C3", label="Pareto front")
            ax.set_xlabel(m1)
            ax.set_ylabel(m2)
            ax.legend()
            ax.set_title(f"{study.spec.name}: Pareto front")
            fig.tight_layout()
            out.append(_save(fig, run_dir / "pareto.png"))
    if isinstance(study.spec, SearchStudySpec):
        importances, basis, thin = param_importances(run_dir, study, records)
        if importances:
            fig, ax = plt.subplots(figsize=(7, 0.8 + 0.35 * len(importances)))
            names = list(importances)[::-1]
            ax.barh(names, [importances[n] for n in names])
            ax.set_xlabel("importance (PED-ANOVA, Optuna default)")
            ax.set_title(f"{study.spec.name}: importance for {metric}, {basis}", fontsize=9)
            fig.tight_layout()
            out.append(_save(fig, run_dir / "importance.png"))
            found = {"metric": metric, "basis": basis, "importances": importances, "thin": thin}
            (run_dir / "importance.yaml").write_text(yaml.safe_dump(found, sort_keys=False))
    return out


def _health_plot(path: Path, name: str, records: list[TrialRecord], plt: Any) -> Path:
    """Per trial over the evaluations: the memory's surprise at the end of the sequence (mean over
    blocks of `block.<i>.surprise_end`; a memory that memorizes drives it down) and the pre-clip
    gradient norm (median of the steps since the previous evaluation)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for r in records:
        ends = [
            (c["step"], statistics.mean(v for k, v in c.items() if k.endswith(".surprise_end")))
            for c in r.curve
            if any(k.endswith(".surprise_end") for k in c)
        ]
        if ends:
            left.plot(*zip(*ends), marker=".", alpha=0.8, label=r.trial_id)
        norms = [(c["step"], c["grad_norm"]) for c in r.curve if isinstance(c.get("grad_norm"), (int, float))]
        right.plot(*zip(*norms), marker=".", alpha=0.8, label=r.trial_id)
    left.set(xlabel="step", ylabel="inner loss, last quarter of the sequence", title=f"{name}: memory surprise")
    right.axhline(10, color="grey", ls=":", lw=1)
    right.set(xlabel="step", ylabel="pre-clip grad norm (median)", yscale="log", title=f"{name}: outer gradient")
    if len(records) <= 12:
        right.legend(fontsize=6)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def param_importances(
    run_dir: Path, study: Study, records: list[TrialRecord]
) -> tuple[dict[str, float], str, list[str]]:
    """PED-ANOVA importances (Optuna's default evaluator) of the search parameters for the first
    objective, what they were computed on (the full-budget results when at least 4 trials
    completed; otherwise, as ASHA stops most trials, every trial's value at the deepest evaluation
    step all of them reached, so that the stopped trials count too: one budget, never mixed), and
    the parameters whose importance is thin (`ped_anova`)."""
    import optuna

    from titans_nas.search.engine import storage_url

    metric, mode = study.spec.objectives[0].metric, study.spec.objectives[0].mode
    state = json.loads((run_dir / "state.json").read_text())
    try:
        stored = optuna.load_study(study_name=state["study_name"], storage=storage_url(study, run_dir))
    except (KeyError, ValueError):
        return {}, "", []
    distributions: dict[str, Any] = {}
    for t in stored.trials:
        distributions.update(t.distributions)
    ran = [r for r in records if r.status in ("completed", "stopped early") and r.point.get("params")]
    completed = [r for r in ran if r.status == "completed"]
    if len(completed) >= 4:
        pool, step, basis = completed, None, "full-budget trials"
    else:
        reached = [max((c["step"] for c in r.curve if metric in c), default=0) for r in ran]
        step = min(reached, default=0)
        pool, basis = ran, f"all trials at step {step}"
    scratch = optuna.create_study(direction="minimize" if mode == "min" else "maximize")
    for r in pool:
        value = next((c[metric] for c in r.curve if c["step"] == step), None) if step else r.value(metric)
        params = r.point["params"]
        if not isinstance(value, (int, float)) or not math.isfinite(value) or not set(params) <= set(distributions):
            continue
        trial = optuna.trial.create_trial(
            params=params, distributions={k: distributions[k] for k in params}, value=float(value)
        )
        scratch.add_trial(trial)
    if len(scratch.trials) < 3:
        return {}, "", []
    try:
        importances, thin = ped_anova(scratch)
    except (RuntimeError, ValueError):
        return {}, "", []
    return importances, basis, thin


def ped_anova(study: Any) -> tuple[dict[str, float], list[str]]:
    """Optuna's default importances of a study, and its thin parameters: those set in, or absent
    from, fewer than 2 trials (a PED-ANOVA regime that small). Optuna warns once per such
    parameter; the report marks it beside its figure instead. Other warnings are passed on."""
    import optuna

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        importances = dict(optuna.importance.get_param_importances(study))
    thin = sorted({m.group(1) for w in caught if (m := _THIN.search(str(w.message)))})
    for w in caught:
        if not _THIN.search(str(w.message)):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return importances, thin


_THIN = re.compile(r"regimes for parameter `([^`]+)` have less than 2 trials")
