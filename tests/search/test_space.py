"""Search spaces without Ray: grammar, validation before anything runs, define-by-run sampling,
conditional knobs, FixedTrial replay."""

import glob

import optuna
import pytest
import yaml

from titans_nas import load_spec
from titans_nas.config import SpecError
from titans_nas.search.space import check_space, sample, spec_from_params
from titans_nas.search.study import load_study

BASE = load_spec("lmm-tiny", ["dim=32", "heads=2"])


@pytest.mark.parametrize("path", sorted(glob.glob("studies/*.yaml")))
def test_shipped_studies_and_their_spaces_validate(path):
    study = load_study(path)
    assert study.base is not None


def test_sampled_specs_are_valid_and_conditional_knobs_follow_their_kind():
    study = load_study("studies/quickstart.yaml")
    s = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    kinds = set()
    for _ in range(30):
        trial = s.ask()
        spec = spec_from_params(study.base, study.space, dict(sample_params(trial, study.space)))
        kinds.add(spec.block.kind)
        params = trial.params
        for name in params:
            if name.startswith("block.mac."):
                assert params["block.kind"] == "mac"
            if name.startswith("block.memory.model.mlp."):
                assert params["block.memory.model.kind"] == "mlp"
        if spec.block.kind in ("mag", "mal", "swa"):
            assert spec.block.window == params[f"block.{spec.block.kind}.window"]
        if spec.block.kind == "swa":  # the shared memory knobs skip the kind without a memory
            assert not any(name.startswith("block.memory.") for name in params), params
        s.tell(trial, 0.0)
    assert kinds == {"swa", "lmm", "mag", "mal", "mac"}


def sample_params(trial, space):
    sample(trial, space)
    return trial.params


def test_fixed_trial_replay_reproduces_the_spec():
    study = load_study("studies/quickstart.yaml")
    s = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    trial = s.ask()
    overrides = sample(trial, study.space)
    replayed = spec_from_params(study.base, study.space, trial.params)
    assert replayed == spec_from_params(study.base, study.space, dict(trial.params))
    assert replayed.block.kind == overrides["block"]["kind"]


def test_choices_of_mappings_and_null_switch_mechanisms():
    space = {"block": {"memory": {"momentum": {"choice": [None, {"init": 0.2}]}}}}
    off = spec_from_params(BASE, space, {"block.memory.momentum": "null"})
    on = spec_from_params(BASE, space, {"block.memory.momentum": '{"init": 0.2}'})
    assert off.block.memory.momentum is None and on.block.memory.momentum.init == 0.2


BAD = {
    "unknown field": ({"dpeth": {"int": [1, 2]}}, "dpeth", "did you mean 'depth'"),
    "unknown nested field": ({"block": {"memory": {"chunk": {"int": [4, 8]}}}}, "block.memory.chunk", "unknown field"),
    "low above high": ({"depth": {"int": [4, 2]}}, "depth", "above high"),
    "log of zero": (
        {"block": {"memory": {"lr": {"theta_max": {"float": [0.0, 0.1], "log": True}}}}},
        "block.memory.lr.theta_max",
        "positive",
    ),
    "empty choice": ({"depth": {"choice": []}}, "depth", "non-empty"),
    "two domains": ({"depth": {"int": [1, 2], "choice": [1]}}, "depth", "exactly one"),
    "float bounds for int": ({"depth": {"int": [1.5, 2]}}, "depth", "integers"),
    "unknown variant": ({"block": {"variants": {"rnn": {}}}}, "block.variants.rnn", "unknown kind 'rnn'"),
    "knob of another kind": (
        {"block": {"variants": {"mac": {"window": {"int": [8, 16]}}}}},
        "block.window",
        "unknown field",
    ),
    "shared knob no listed kind has": (
        {"block": {"variants": {"swa": {}, "attention": {}}, "memory": {"conv": {"choice": [None]}}}},
        "block.memory",
        "unknown field",
    ),
    "variants on a plain field": ({"depth": {"variants": {"a": {}}}}, "depth.variants", "a field with kinds"),
    "impossible variant": (
        {"block": {"variants": {"lmm": {}, "mac": {"segment_len": {"choice": [12, 20]}}}}},
        "block.segment_len",
        "block.kind=mac",
    ),
    "impossible everywhere": ({"heads": {"choice": [3, 5]}}, "heads", "no sampled configuration is valid"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_spaces_are_refused_with_a_path(name):
    space, path, words = BAD[name]
    with pytest.raises(SpecError) as e:
        check_space(space, BASE, "space.yaml")
    assert e.value.source == "space.yaml"
    assert e.value.path == path, e.value
    assert words in str(e.value)


def test_invalid_study_file_fails_before_ray_starts(tmp_path, capsys):
    import ray

    from titans_nas.cli import main

    bad_space = tmp_path / "space.yaml"
    bad_space.write_text(yaml.safe_dump({"block": {"memory": {"chunk": {"int": [4, 8]}}}}))
    study = tmp_path / "study.yaml"
    study.write_text(
        yaml.safe_dump(
            {
                "name": "bad",
                "kind": "search",
                "model": "lmm-tiny",
                "space": "space.yaml",
                "task": {"kind": "copy"},
                "objectives": [{"metric": "loss", "mode": "min"}],
            }
        )
    )
    was_up = ray.is_initialized()
    assert main(["study", "run", str(study), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "space.yaml: block.memory.chunk: unknown field" in err
    assert not (tmp_path / "run").exists() and ray.is_initialized() == was_up


def test_study_file_errors_name_the_field(tmp_path):
    study = tmp_path / "study.yaml"
    study.write_text(
        yaml.safe_dump(
            {
                "name": "x",
                "kind": "ablation",
                "model": "lmm-tiny",
                "tasks": {"c": {"kind": "copy"}},
                "variants": {"base": []},
                "baseline": "nope",
                "objectives": [{"metric": "loss", "mode": "min"}],
            }
        )
    )
    with pytest.raises(SpecError) as e:
        load_study(study)
    assert e.value.path == "baseline" and "not one of the variants" in e.value.reason


def test_enqueued_points_are_encoded_like_samples_and_checked():
    from titans_nas.search.space import enqueued_params

    space = {"heads": {"choice": [2, 4]}, "block": {"memory": {"momentum": {"choice": [None, {"init": 0.2}]}}}}
    [params] = enqueued_params([{"heads": 4, "block.memory.momentum": {"init": 0.2}}], space, "s.yaml")
    trial = optuna.trial.FixedTrial(params)
    assert sample(trial, space) == {"heads": 4, "block": {"memory": {"momentum": {"init": 0.2}}}}
    with pytest.raises(SpecError, match=r"enqueue\.0: heads: 3 is not one of the choices"):
        enqueued_params([{"heads": 3}], space, "s.yaml")
    with pytest.raises(SpecError, match=r"enqueue\.0: not parameters of the space here: dim"):
        enqueued_params([{"dim": 3}], space, "s.yaml")


def test_per_task_training_changes_apply_to_their_task_only_and_are_validated():
    study = load_study("studies/paper_ablation.yaml")
    budgets = {p["task"]: study.trial_setup(p)[2] for p in study.points()}
    assert budgets["lm"].batch_size == 16 and budgets["mqar"].batch_size == study.spec.train.batch_size == 32
    with pytest.raises(SpecError) as e:
        load_study("studies/paper_ablation.yaml", ["task_train.lm.batch_size=0"])
    assert e.value.path == "task_train.lm.batch_size" and "greater than or equal to 1" in e.value.reason
    with pytest.raises(SpecError) as e:
        load_study("studies/paper_ablation.yaml", ["task_train.nope.steps=3"])
    assert e.value.path == "task_train.nope" and "not one of the tasks" in e.value.reason


@pytest.mark.parametrize(
    "change, path, reason",
    [
        ("evaluate_at.nope={seq_len: [512]}", "evaluate_at.nope", "not one of the tasks"),
        ("evaluate_at.lm={seq_len: [512], corpus: [shakespeare]}", "evaluate_at.lm", "exactly one field"),
        ("evaluate_at.lm={context_len: [512]}", "evaluate_at.lm.context_len", "not a field of the lm task"),
        ("evaluate_at.lm={seq_len: []}", "evaluate_at.lm.seq_len", "at least one value"),
        ("evaluate_at.mqar={seq_len: [128, 4]}", "evaluate_at.mqar.seq_len.1", "greater than or equal to 8"),
    ],
)
def test_evaluate_at_names_one_field_of_its_task_and_values_the_task_accepts(change, path, reason):
    study = load_study("studies/paper_niah.yaml")
    assert [study.spec.task_at("s-niah-3", i).context_len for i in range(4)] == [256, 512, 1024, 2048]
    assert study.spec.task_at("s-niah-3", 2).variant == "uuid"  # the rest of the task is kept
    with pytest.raises(SpecError) as e:
        load_study("studies/paper_ablation.yaml", [change])
    assert e.value.path == path and reason in e.value.reason


@pytest.mark.parametrize("sampler", ["tpe", "nsga2", "gp", "random"])
def test_every_sampler_a_study_can_name_samples_the_space_and_pickles(sampler):
    from ray import cloudpickle

    from titans_nas.search.engine import make_sampler

    over = [f"sampler={sampler}", "objectives=[{metric: accuracy, mode: max}]"]
    study = load_study("studies/quickstart.yaml", over + (["startup_trials=null"] if sampler == "random" else []))
    s = optuna.create_study(sampler=make_sampler(study.spec), direction="maximize")
    for i in range(12):  # past the random start-up trials, so the model-based path runs
        if i == 6:  # Tune pickles the searcher with its sampler (Optuna 5.1's NSGA-II holds a lock)
            s.sampler = cloudpickle.loads(cloudpickle.dumps(s.sampler))
        trial = s.ask()
        spec = spec_from_params(study.base, study.space, sample_params(trial, study.space))
        s.tell(trial, float(spec.depth + i % 3))
    assert len(s.trials) == 12


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_a_local_study_asking_for_a_gpu_this_machine_lacks_is_refused(tmp_path, capsys):
    from titans_nas.cli import main

    out = tmp_path / "run"
    assert main(["study", "run", "studies/quickstart.yaml", "--set", "resources.gpu=1", "--out", str(out)]) == 2
    assert "resources.gpu: this machine has no GPU" in capsys.readouterr().err and not out.exists()


def test_replay_separates_train_knobs_from_the_model_spec():
    from titans_nas.search.space import replay

    space = {"heads": {"choice": [2, 4]}, "train": {"lr": {"float": [0.001, 0.01], "log": True}}}
    spec, train = replay(BASE, space, {"heads": 4, "train.lr": 0.002})
    assert spec.heads == 4 and train == {"lr": 0.002}
    assert spec_from_params(BASE, space, {"heads": 2, "train.lr": 0.002}).heads == 2


def test_the_random_sampler_refuses_a_startup_phase(tmp_path):
    from tests.search.conftest import write_study

    path = write_study(tmp_path, space={"depth": {"int": [1, 2]}}, sampler="random", startup_trials=4)
    with pytest.raises(SpecError) as e:
        load_study(path)
    assert e.value.path == "startup_trials" and "no startup phase" in str(e.value)
