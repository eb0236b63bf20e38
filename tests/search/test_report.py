"""The report's first lines for a search ("## Found") from trial records, without Ray."""

from titans_nas.search.report import TrialRecord, best_trials, findings

OBJECTIVES = [("accuracy", "max"), ("params", "min")]


def record(tid, kind, acc, params, status="completed"):
    return TrialRecord(tid, status, {"params": {"block.kind": kind}}, {"accuracy": acc, "params": params}, 300)


def test_found_names_the_best_kind_its_margin_over_swa_and_the_front():
    records = [
        record("a", "swa", 0.10, 40_000),
        record("b", "swa", 0.12, 42_000),
        record("c", "mal", 0.54, 77_000),
        record("d", "lmm", 0.38, 53_000),
        record("e", "mac", 0.60, 90_000, status="stopped early"),  # not a finished model
        record("f", "mag", 0.15, 80_000),
    ]
    lines = findings(records, OBJECTIVES, best_trials(records, OBJECTIVES))
    text = "\n".join(lines)
    assert "Best kind: **mal**, accuracy 0.54 (`c`); **+0.42** over the best `swa` (0.12, `b`)" in text
    assert "Best per kind: mal 0.54, lmm 0.38, mag 0.15, swa 0.12." in text
    assert "Pareto front (accuracy, params): 4 points" in text  # mal, lmm, both swa (mag is dominated)
    assert "5 of 6 trials completed" in text


def test_found_says_when_there_is_no_baseline_to_compare_with():
    records = [record("c", "mal", 0.54, 77_000), record("d", "lmm", 0.38, 53_000)]
    text = "\n".join(findings(records, OBJECTIVES[:1], best_trials(records, OBJECTIVES[:1])))
    assert "no `swa` trial completed" in text and "Pareto" not in text


def test_ablation_over_several_tasks_reports_the_mean_over_tasks(tmp_path):
    from tests.search.conftest import write_study
    from titans_nas.search.report import ablation_table
    from titans_nas.search.study import load_study

    tasks = {"a": {"kind": "mqar", "seq_len": 16, "num_kv_pairs": 2, "vocab": 16}, "b": {"kind": "recall"}}
    path = write_study(
        tmp_path, kind="ablation", tasks=tasks, variants={"base": [], "other": ["block.memory.conv=null"]},
        baseline="base", seeds=[0, 1], objectives=[{"metric": "accuracy", "mode": "max"}],
    )  # fmt: skip
    study = load_study(path)
    acc = {("base", "a"): [0.2, 0.4], ("base", "b"): [0.6, 0.6], ("other", "a"): [1.0, 1.0], ("other", "b"): [0.5, 0.5]}
    records = [
        TrialRecord(f"{v}{t}{s}", "completed", {"variant": v, "task": t, "seed": s}, {"accuracy": x}, 10)
        for (v, t), xs in acc.items()
        for s, x in enumerate(xs)
    ]
    records.append(TrialRecord("x", "failed", {"variant": "other", "task": "a", "seed": 2}, {"accuracy": 0.0}, 1))
    table = ablation_table(study, records)
    assert "mean accuracy over tasks" in table.splitlines()[0]
    assert "| base | 0.3 ± 0.14 | 0.6 ± 0 | 0.45 |" in table  # (0.3 + 0.6) / 2
    assert "| other | 1 ± 0 | 0.5 ± 0 | 0.75 |" in table  # the failed trial does not count


def test_ablation_columns_and_best_are_per_task_for_the_objectives_each_task_reports(tmp_path):
    from tests.search.conftest import TINY_MODEL, write_study
    from titans_nas.search.report import ablation_table, best_per_task
    from titans_nas.search.study import load_study

    tasks = {
        "lm": {"kind": "lm", "seq_len": 32},
        "mqar": {"kind": "mqar", "seq_len": 16, "num_kv_pairs": 2, "vocab": 16},
    }
    objectives = [{"metric": "accuracy", "mode": "max"}, {"metric": "bits_per_byte", "mode": "min"}]
    path = write_study(
        tmp_path, kind="ablation", tasks=tasks, variants={"base": [], "other": ["block.memory.conv=null"]},
        baseline="base", seeds=[0], objectives=objectives, model={**TINY_MODEL, "vocab_size": 256},
    )  # fmt: skip
    study = load_study(path)
    got = {("base", "lm"): {"bits_per_byte": 2.5}, ("other", "lm"): {"bits_per_byte": 2.4},
           ("base", "mqar"): {"accuracy": 0.3}, ("other", "mqar"): {"accuracy": 0.2}}  # fmt: skip
    records = [
        TrialRecord(f"{v}-{t}", "completed", {"variant": v, "task": t, "seed": 0}, m, 10) for (v, t), m in got.items()
    ]
    head = ablation_table(study, records).splitlines()[0]
    assert "lm: bits_per_byte" in head and "mqar: accuracy" in head
    assert "lm: accuracy" not in head and "mqar: bits_per_byte" not in head  # never reported: no empty column
    best = {
        task: [r.trial_id for r in found]
        for task, found in best_per_task(study, records, [("accuracy", "max"), ("bits_per_byte", "min")])
    }
    assert best == {"lm": ["other-lm"], "mqar": ["base-mqar"]}


def test_importances_name_their_thin_parameters_instead_of_warning():
    """A parameter that only one trial has (a knob of a kind sampled once) or that only one trial
    lacks makes Optuna warn that its importance is inaccurate: `ped_anova` names it instead (the
    report marks it), and a parameter every trial has stays unmarked."""
    import warnings

    import optuna

    from titans_nas.search.report import ped_anova

    lr = optuna.distributions.FloatDistribution(1e-3, 1e-1, log=True)
    window = optuna.distributions.CategoricalDistribution([8, 16])
    study = optuna.create_study(direction="maximize")
    for i in range(10):
        params, dists = {"lr": 10 ** (-3 + 2 * i / 9)}, {"lr": lr}
        if i == 9:  # the one trial of a kind with a window
            params["window"], dists["window"] = 8, window
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=params["lr"]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        importances, thin = ped_anova(study)
    assert set(importances) == {"lr", "window"}
    assert thin == ["window"]
    assert not [w for w in caught if "regimes for parameter" in str(w.message)]
