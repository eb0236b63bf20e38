"""The console script end to end (one subprocess) and `inspect` / `schema` in process."""

import argparse
import json
import subprocess
import sys

import pytest
import torch

from titans_nas import build_model, load_spec
from titans_nas.cli import main
from titans_nas.config import preset_names


@pytest.mark.parametrize("preset", [p for p in preset_names() if p.endswith("-tiny")])
def test_inspect_counts_match_the_built_model(preset, capsys):
    assert main(["inspect", f"components/presets/{preset}.yaml", "--set", "depth=3", "--seq", "64"]) == 0
    out = capsys.readouterr().out
    assert "depth: 3" in out
    total_line = next(line for line in out.splitlines() if line.strip().startswith("total"))
    reported = int(total_line.split()[-1].replace(",", ""))
    model = build_model(load_spec(preset, ["depth=3"]))
    assert reported == sum(p.numel() for p in model.parameters())
    assert "FLOPs per token" in out


def test_inspect_counts_tied_embeddings_once(capsys):
    main(["inspect", "attention-tiny", "--set", "tie_embeddings=true", "--seq", "32"])
    out = capsys.readouterr().out
    total = int(
        next(line for line in out.splitlines() if line.strip().startswith("total")).split()[-1].replace(",", "")
    )
    model = build_model(load_spec("attention-tiny", ["tie_embeddings=true"]))
    assert total == sum(p.numel() for p in model.parameters())
    assert model.head is None


def test_schema_is_json(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["title"] == "ModelSpec" and "block" in schema["properties"]


def test_console_script_exit_code_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: attention-tiny\nheads: 7\n")
    proc = subprocess.run([sys.executable, "-m", "titans_nas.cli", "inspect", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "heads" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_train_command_runs(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "attention-tiny",
            "--task",
            "copy",
            "--task-set",
            "length=4",
            "--steps",
            "4",
            "--eval-every",
            "2",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    assert (out / "checkpoint" / "model.safetensors").is_file()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["split"] == "eval"] == [2, 4]
    assert torch.isfinite(torch.tensor(lines[-1]["loss"]))


def test_eval_and_niah_grid_on_a_trained_run(tmp_path, capsys):
    out = tmp_path / "run"
    niah = ["--task", "niah", "--task-set", "context_len=256", "--task-set", "digits=3"]
    assert main(["train", "mag-tiny", *niah, "--steps", "2", "--eval-every", "2", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), *niah, "--batches", "1", "--batch-size", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert 0.0 <= report["exact_match"] <= 1.0 and report["task"]["kind"] == "niah"
    grid = ["--lengths", "256,300", "--depths", "0,1", "--samples", "2", "--digits", "3"]
    assert main(["niah", str(out), *grid]) == 0
    table = (out / "niah" / "niah-passkey.md").read_text()
    assert "| 256 |" in table and "| 300 |" in table
    assert (out / "niah" / "niah-passkey.png").stat().st_size > 1000


def test_eval_refuses_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert main(["eval", str(tmp_path), "--task", "copy"]) == 2
    assert "not a training run" in capsys.readouterr().err


def test_help_is_complete_every_command_and_flag_says_what_it_does():
    from titans_nas.cli import EXIT_CODES, parser

    p = parser()
    commands = next(a for a in p._actions if a.dest == "command")
    top = p.format_help()
    assert all(name in top for name in commands.choices) and EXIT_CODES.splitlines()[0] in top
    for name, sub in commands.choices.items():
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings[0]} has no help"
                has_default = action.default not in (None, False, [], argparse.SUPPRESS)
                if has_default and not isinstance(action, argparse._StoreTrueAction):
                    assert "default" in action.help, f"{name} {action.option_strings[0]}: default not stated"


def test_attention_flops_are_counted_on_cpu_as_on_meta():
    """SDPA on CPU tensors runs a kernel torch's FlopCounterMode has no formula for
    (titans_nas.flops adds it): the forward counts on CPU tensors (the benchmarks' counter) and on
    the meta device (`inspect`) agree, and attention's backward is counted too."""
    from titans_nas.flops import flop_counter
    from titans_nas.summary import flops_per_token

    spec = load_spec("attention-tiny", ["depth=1"])
    model = build_model(spec)
    tokens = torch.zeros(1, 128, dtype=torch.long)
    with flop_counter() as counter:
        model(tokens)[0].sum().backward()
    ops = {str(op) for op in counter.get_flop_counts()["Global"]}
    assert "aten._scaled_dot_product_flash_attention_for_cpu_backward" in ops, ops
    with flop_counter() as counter:
        with torch.no_grad():
            model(tokens)
    assert counter.get_total_flops() / 128 == flops_per_token(spec, 128)
