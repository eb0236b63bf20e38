"""YAML composition, round trips and the error messages users see."""

from pathlib import Path

import pytest
import yaml

from titans_nas.cli import main
from titans_nas.config import SpecError, compose, dump_spec, load_spec, preset_names
from titans_nas.spec import ModelSpec


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_validates_and_round_trips(preset, tmp_path):
    spec = load_spec(preset)
    text = dump_spec(spec)
    again = load_spec(write(tmp_path, "again.yaml", text))
    assert again == spec
    assert dump_spec(again) == text


def test_extends_merges_deeply_and_later_wins(tmp_path):
    write(tmp_path, "base.yaml", "extends: attention-tiny\ndepth: 3\nblock: {attention: {rope: {base: 500}}}\n")
    child = write(tmp_path, "child.yaml", "extends: base.yaml\ndepth: 5\n")
    spec = load_spec(child, ["block.attention.heads=2"])
    assert (spec.depth, spec.dim, spec.block.attention.rope.base, spec.block.attention.heads) == (5, 64, 500, 2)


def test_a_change_of_kind_keeps_shared_fields_and_drops_the_others():
    spec = load_spec("mag-tiny", ["block.kind=mac", "block.segment_len=32"])
    # memory and persistent carry over from the MAG preset; its window (no MAC field) does not
    assert spec.block.kind == "mac" and spec.block.memory.chunk_size == 8 and spec.block.persistent.num_tokens == 4
    assert "window" not in spec.block.model_dump()
    swa = load_spec("mag-tiny", ["block.kind=swa"])
    assert swa.block.window == 16 and swa.block.persistent.num_tokens == 4


def _switched_by(entry: str, tmp_path: Path) -> ModelSpec:
    """mag-tiny with its block switched to MAC (segment 32), through one of the pipeline's users."""
    from titans_nas.search.space import apply
    from titans_nas.search.study import _load_model, variant_spec

    change = {"block": {"kind": "mac", "segment_len": 32}}
    if entry == "--set":
        return load_spec("mag-tiny", ["block.kind=mac", "block.segment_len=32"])
    if entry == "study model":
        return _load_model({"extends": "mag-tiny", **change}, tmp_path, "study.yaml")
    if entry == "ablation variant":
        return variant_spec(load_spec("mag-tiny"), change, "study.yaml")
    return ModelSpec.model_validate(apply(load_spec("mag-tiny").model_dump(mode="json"), change))


@pytest.mark.parametrize("entry", ["--set", "study model", "ablation variant", "search space"])
def test_rule_1_a_change_of_kind_keeps_shared_fields_in_every_user_of_the_pipeline(entry, tmp_path):
    spec = _switched_by(entry, tmp_path)
    assert spec.block.kind == "mac" and spec.block.segment_len == 32
    assert spec.block.memory.chunk_size == 8 and spec.block.persistent.num_tokens == 4  # shared: kept
    assert "window" not in spec.block.model_dump()  # MAG's own: dropped


def test_rule_2_a_sub_spec_without_kind_is_of_the_default_kind(tmp_path):
    from titans_nas.config import load_union
    from titans_nas.tasks import TaskSpec

    spec = load_spec("attention-tiny", ["norm.eps=1e-5"])
    assert spec.norm.kind == ModelSpec.model_fields["norm"].default.kind and spec.norm.eps == 1e-5
    data = {"vocab_size": 16, "dim": 8, "depth": 1, "heads": 2, "block": {"kind": "attention"}, "norm": {"eps": 2}}
    with pytest.raises(SpecError) as e:  # validated as the default kind's field, not refused for its missing tag
        load_spec(write(tmp_path, "s.yaml", yaml.safe_dump(data)))
    assert e.value.path == "norm.eps" and "less than 1" in e.value.reason
    task = load_union("mqar", TaskSpec, ["num_kv_pairs=2"])  # a task named by kind: its defaults, changed
    assert task.kind == "mqar" and task.num_kv_pairs == 2


def test_rule_3_provenance_names_the_layer_that_set_each_field(tmp_path):
    from titans_nas.config import compose

    write(tmp_path, "base.yaml", "extends: attention-tiny\ndepth: 3\n")
    child = write(tmp_path, "child.yaml", "extends: base.yaml\ndim: 64\n")
    _, prov = compose(child, overrides=["heads=2"])
    assert prov["vocab_size"].endswith("presets/attention-tiny.yaml")
    assert prov["depth"].endswith("base.yaml") and prov["dim"].endswith("child.yaml")
    assert prov["heads"] == "--set heads=2" and prov[""].endswith("child.yaml") and prov["*"] == "--set heads=2"
    inline = ("study.yaml (model)", {"extends": "base.yaml", "dim": 32})  # an inline spec that extends a file
    _, prov = compose(inline, relative_to=tmp_path)
    assert prov["depth"].endswith("base.yaml") and prov["dim"] == "study.yaml (model)"


def test_null_switches_a_mechanism_off():
    spec = load_spec("attention-tiny", ["block.attention.rope=null", "mlp=null"])
    assert spec.block.attention.rope is None and spec.mlp is None


def test_provenance_names_the_file_that_set_the_field(tmp_path):
    write(tmp_path, "base.yaml", "extends: attention-tiny\ndepth: 0\n")
    child = write(tmp_path, "child.yaml", "extends: base.yaml\ndim: 64\n")
    with pytest.raises(SpecError) as e:
        load_spec(child)
    assert e.value.source.endswith("base.yaml") and e.value.path == "depth"
    _, prov = compose(child)
    assert prov["dim"].endswith("child.yaml")


ERRORS = {
    # name: (yaml text, overrides, expected path, words in the reason)
    "malformed yaml": ("dim: [64\n", [], "", ["malformed YAML", "line"]),
    "unknown field": ("extends: attention-tiny\ndpeth: 3\n", [], "dpeth", ["unknown field", "did you mean 'depth'"]),
    "nested unknown field": (
        "extends: attention-tiny\nblock: {attention: {rop: null}}\n",
        [],
        "block.attention.rop",
        ["did you mean 'rope'"],
    ),
    "wrong type": ("extends: attention-tiny\ndepth: three\n", [], "depth", ["valid integer", "'three'"]),
    "out of range": ("extends: attention-tiny\ndepth: 0\n", [], "depth", ["greater than or equal to 1"]),
    "impossible combination": ("extends: attention-tiny\nheads: 5\n", [], "heads", ["do not divide dim 64"]),
    "nested impossible combination": (
        "extends: attention-tiny\nblock: {attention: {heads: 8}}\ndim: 60\nheads: 4\n",
        [],
        "block.attention.heads",
        ["do not divide"],
    ),
    "odd head dim with rope": ("extends: attention-tiny\ndim: 60\n", [], "block.attention.rope", ["even head dim"]),
    "unknown kind": ("extends: attention-tiny\nblock: {kind: mamba}\n", [], "block", ["unknown kind 'mamba'"]),
    "missing field": ("dim: 64\ndepth: 2\nheads: 4\nblock: {kind: attention}\n", [], "vocab_size", ["required"]),
    "missing preset": (
        "extends: attention-tinny\n",
        [],
        "",
        ["no preset or file named 'attention-tinny'", "did you mean 'attention-tiny'"],
    ),
    "bad override": ("extends: attention-tiny\n", ["depth"], "", ["expected KEY=VALUE"]),
    "override out of range": ("extends: attention-tiny\n", ["norm.eps=2"], "norm.eps", ["less than 1"]),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_each_error_names_file_path_and_reason(name, tmp_path):
    text, overrides, path, words = ERRORS[name]
    spec_file = write(tmp_path, "spec.yaml", text)
    with pytest.raises(SpecError) as e:
        load_spec(spec_file, overrides)
    assert e.value.path == path
    for w in words:
        assert w in e.value.reason
    expected_source = f"--set {overrides[0]}" if overrides else "spec.yaml"
    assert expected_source in e.value.source or "command line" in e.value.source or name == "missing preset"


@pytest.mark.parametrize("name", ["malformed yaml", "unknown field", "impossible combination", "missing preset"])
def test_cli_prints_one_line_and_exits_2(name, tmp_path, capsys):
    text, overrides, path, words = ERRORS[name]
    spec_file = write(tmp_path, "spec.yaml", text)
    code = main(["inspect", str(spec_file), *[a for o in overrides for a in ("--set", o)]])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err
    assert str(spec_file) in err or "spec.yaml" in err
    assert words[0] in err


def test_missing_preset_on_command_line(capsys):
    assert main(["inspect", "no-such-preset"]) == 2
    assert "no preset or file named 'no-such-preset'" in capsys.readouterr().err


def test_schema_has_every_field_documented():
    schema = ModelSpec.model_json_schema()
    for name, prop in schema["properties"].items():
        assert prop.get("description"), f"ModelSpec.{name} has no docstring"
    for name, sub in schema["$defs"].items():
        for field, prop in sub.get("properties", {}).items():
            assert field == "kind" or prop.get("description"), f"{name}.{field} has no docstring"


def test_dump_is_plain_yaml():
    data = yaml.safe_load(dump_spec(load_spec("attention-tiny")))
    assert data["block"]["kind"] == "attention" and "extends" not in data


def test_partial_sub_spec_edits_the_default_kind():
    spec = load_spec("attention-tiny", ["norm.eps=1e-5"])
    assert spec.norm.kind == "rmsnorm" and spec.norm.eps == 1e-5
