"""Export and safe loading: the round trip is exact, tampering and pickles are refused (exit 2),
an exported architecture retrains from its spec."""

import hashlib
import json
import os
import pickle

import pytest
import torch

from titans_nas import load_model, load_spec
from titans_nas.cli import main
from titans_nas.evaluate import evaluate_task, load_run
from titans_nas.export import FILES, export, load_export
from titans_nas.tasks import CompressionSpec, CopySpec
from titans_nas.train import TrainSpec, train

SPEC = load_spec("mag-tiny", ["dim=16", "heads=2", "depth=1", "vocab_size=16", "block.window=4"])
TASK = CopySpec(length=4, symbols=8)
CFG = TrainSpec(steps=6, batch_size=4, eval_every=3, eval_batches=2, warmup_steps=1, log_every=3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    train(SPEC, TASK, CFG, run)
    return run


@pytest.fixture
def exported(trained, tmp_path):
    return export(trained, tmp_path / "export")


def test_export_holds_every_file_and_reproduces_the_run_exactly(trained, exported):
    assert sorted(p.name for p in exported.iterdir()) == sorted(FILES)
    spec, model, metrics = load_export(exported)
    assert spec == SPEC and "extends" not in (exported / "spec.yaml").read_text()
    final = [json.loads(x) for x in (trained / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in final if r["split"] == "eval"][-1]
    e = metrics["eval"]
    again = evaluate_task(model, spec, TASK, batches=e["batches"], batch_size=e["batch_size"], seed=e["seed"])
    assert again["loss"] == final["loss"] and again["accuracy"] == final["accuracy"]
    tokens = torch.randint(0, 16, (2, 12), generator=torch.Generator().manual_seed(0))
    _, from_checkpoint = load_run(trained)
    assert torch.equal(load_model(exported)(tokens)[0], from_checkpoint(tokens)[0])
    assert metrics["steps"] == CFG.steps and metrics["task"]["kind"] == "copy"
    card = (exported / "README.md").read_text()
    assert f"{sum(p.numel() for p in model.parameters()):,}" in card and "memory as gate" in card


def test_cli_eval_of_an_export_uses_its_own_task_and_eval_set(trained, exported, capsys):
    assert main(["eval", str(exported)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["loss"] == json.loads((exported / "metrics.json").read_text())["final_eval"]["loss"]


def _rehash(export_dir, name):
    prov = json.loads((export_dir / "provenance.json").read_text())
    prov["sha256"][name] = hashlib.sha256((export_dir / name).read_bytes()).hexdigest()
    (export_dir / "provenance.json").write_text(json.dumps(prov))


def _refused(export_dir, capsys, *needles):
    assert main(["eval", str(export_dir)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and all(n in err for n in needles), err


def test_changed_weights_are_refused(exported, capsys):
    data = bytearray((exported / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (exported / "model.safetensors").write_bytes(bytes(data))
    _refused(exported, capsys, "model.safetensors", "sha256 differs")


def test_changed_spec_is_refused(exported, capsys):
    text = (exported / "spec.yaml").read_text().replace("seed: 0", "seed: 1")
    (exported / "spec.yaml").write_text(text)
    _refused(exported, capsys, "spec.yaml", "sha256 differs")


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_a_pickle_renamed_to_safetensors_is_refused_even_with_matching_hashes(exported, capsys, how):
    weights = {k: v.clone() for k, v in load_model(exported).state_dict().items()}
    path = exported / "model.safetensors"
    if how == "pickle":
        path.write_bytes(pickle.dumps(weights))
    else:
        torch.save(weights, path)
    _rehash(exported, "model.safetensors")
    _refused(exported, capsys, "refused", "only safetensors")


def test_missing_file_and_newer_schema_are_clear_errors(exported, capsys):
    (exported / "spec.yaml").write_text(
        (exported / "spec.yaml").read_text().replace("schema_version: 1", "schema_version: 7")
    )
    _rehash(exported, "spec.yaml")
    _refused(exported, capsys, "schema_version", "newer titans-nas", "upgrade")
    (exported / "model.safetensors").unlink()
    _refused(exported, capsys, "model.safetensors", "missing")


def test_export_into_a_full_dir_or_from_a_non_run_is_refused(trained, exported, tmp_path, capsys):
    assert main(["export", str(trained), "--out", str(exported)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "not a finished training run" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["metrics.json", "task.yaml", "README.md"])
def test_every_shipped_file_is_hashed(exported, capsys, name):
    with open(exported / name, "a") as f:
        f.write("\n")
    _refused(exported, capsys, name, "sha256 differs")


@pytest.mark.parametrize("file", ["spec.yaml", "task.yaml"])
@pytest.mark.parametrize("how", ["extends", "absolute extends", "env interpolation", "field interpolation"])
def test_an_exported_spec_is_data_that_reads_nothing_else(exported, tmp_path, capsys, monkeypatch, file, how):
    """A hostile export (hashes recomputed) cannot make the loader read other files or the
    environment, and nothing it would have read shows in the error."""
    secret = tmp_path / "secret.yaml"
    secret.write_text("dim: 48  # SECRET-FROM-FILE\n")
    monkeypatch.setenv("TITANS_SECRET", "SECRET-FROM-ENV")
    text = (exported / file).read_text()
    change = {
        "extends": f"extends: {os.path.relpath(secret, exported)}\n" + text,
        "absolute extends": f"extends: {secret}\n" + text,
        "env interpolation": text + "kind_note: ${oc.env:TITANS_SECRET}\n",
        "field interpolation": text + "note: ${seed}\n",
    }[how]
    assert change != text
    (exported / file).write_text(change)
    _rehash(exported, file)
    assert main(["eval", str(exported)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "SECRET" not in err and "a saved spec is data" in err, err


def test_a_symlinked_export_file_is_refused(exported, tmp_path, capsys):
    outside = tmp_path / "task.yaml"
    outside.write_text((exported / "task.yaml").read_text())
    (exported / "task.yaml").unlink()
    (exported / "task.yaml").symlink_to(outside)
    _refused(exported, capsys, "task.yaml", "symbolic link")


def test_a_failed_export_leaves_nothing_and_the_retry_works(trained, tmp_path, monkeypatch):
    import titans_nas.export as export_module

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_module, "model_card", broken)
    with pytest.raises(OSError):
        export(trained, tmp_path / "best")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no half-written directory, no temp dir
    monkeypatch.undo()
    assert sorted(p.name for p in export(trained, tmp_path / "best").iterdir()) == sorted(FILES)


def test_an_exported_architecture_retrains_at_a_larger_budget(exported, tmp_path):
    out = tmp_path / "retrain"
    args = ["train", str(exported / "spec.yaml"), "--task", str(exported / "task.yaml"), "--steps", "8"]
    assert main([*args, "--out", str(out)]) == 0
    assert load_spec(out / "spec.yaml") == SPEC
    assert json.loads((out / "result.json").read_text())["step"] == 8


def test_a_task_read_out_head_trains_and_is_exported_with_the_model(tmp_path):
    """MAD compression decodes with its own head: trained, saved with the weights, rebuilt from the
    run's task.yaml on every load, so an export re-scores exactly."""
    task = CompressionSpec(seq_len=8, vocab=16)
    run = tmp_path / "run"
    train(SPEC, task, CFG, run)
    spec, model, metrics = load_export(export(run, tmp_path / "export"))
    assert any(k.startswith("readout.") for k in model.state_dict())
    e = metrics["eval"]
    again = evaluate_task(model, spec, task, batches=e["batches"], batch_size=e["batch_size"], seed=e["seed"])
    assert again["loss"] == metrics["final_eval"]["loss"]
    _, plain = load_run(run)
    tokens = task.sample(2, torch.Generator().manual_seed(0)).inputs
    assert torch.equal(plain(tokens)[0], model(tokens)[0]) and model(tokens)[0].shape == (2, 8, 16)
