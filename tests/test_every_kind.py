"""Every member of the block union goes through everything said per kind: its tiny preset,
training, export and its model card, `inspect`, and the benchmark's model spec and step. The union
is the only registry of kinds (docs/guide.md, "Adding a mechanism"): a new kind that forgets one of
these fails here, with no list of kinds to update."""

import sys
from pathlib import Path

import pytest

from titans_nas import load_spec
from titans_nas.cli import main
from titans_nas.config import union_members
from titans_nas.export import export, load_export
from titans_nas.spec import BlockSpec
from titans_nas.tasks import CopySpec
from titans_nas.train import TrainSpec, train

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))

KINDS = list(union_members(BlockSpec))


def test_the_union_holds_the_paper_kinds():
    assert {"attention", "swa", "lmm", "mac", "mag", "mal"} <= set(KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_every_block_kind_trains_exports_inspects_and_benchmarks(kind, tmp_path, capsys):
    import models  # bench/models.py

    spec = load_spec(f"{kind}-tiny", ["dim=16", "heads=2", "depth=1", "vocab_size=16"])
    cfg = TrainSpec(steps=2, batch_size=2, eval_every=2, eval_batches=1, warmup_steps=1, log_every=1)
    train(spec, CopySpec(length=4, symbols=8), cfg, tmp_path / "run")
    out = export(tmp_path / "run", tmp_path / "export")
    card = (out / "README.md").read_text()
    assert spec.block.describe() in card
    loaded, _, _ = load_export(out)
    assert loaded == spec

    assert main(["inspect", f"{kind}-tiny", "--seq", "128"]) == 0  # the FLOP count at 2048 takes ~20 s for mac
    assert kind in capsys.readouterr().out

    small = {"dim": 16, "heads": 2, "depth": 1, "seq": 32, "window": 8, "segment": 16, "chunk": 8, "persistent": 2}
    bench = {**models.DEFAULTS, **small, "impl": kind}
    assert models.spec_for(bench).block.kind == kind and kind in models.KINDS
    step, _ = models.make_step(bench)
    step()


@pytest.mark.parametrize("kind", ["lmm", "mac", "mag", "mal"])
def test_the_split_benchmark_removes_the_memory_op_and_keeps_the_rest(kind):
    """bench/split.py's "memory_op: off": the gates, which only the op reads, get a zero gradient
    (they still reach the loss: their layers are timed whole), while the memory's projection keeps
    a gradient; with the op on, the gates' gradient is not zero."""
    import models  # bench/models.py

    from components.neural_memory import NeuralMemory

    small = {"dim": 16, "heads": 2, "depth": 1, "seq": 32, "window": 8, "segment": 16, "chunk": 8, "batch": 2}
    for op in ("on", "off"):
        step, model = models.make_step({**models.DEFAULTS, **small, "impl": kind, "memory_op": op})
        step()
        memory = next(m for m in model.modules() if isinstance(m, NeuralMemory))
        gates = memory.gates.proj.weight.grad
        assert gates is not None and memory.qkv.weight.grad.abs().sum() > 0
        assert (gates.abs().sum() > 0) == (op == "on"), f"{kind}, memory op {op}: gate gradient {gates.abs().sum()}"


def test_the_split_report_takes_the_op_as_the_difference_of_its_two_rows():
    """bench/report.py split: a kind's step with its op (on) minus the step without it (off)."""
    import report  # bench/report.py

    row = {"threads": 1, "dim": 64, "seq": 256, "batch": 16}
    ms = lambda t: 16 * 256 / (t / 1e3)  # noqa: E731  tokens/s of a step of t ms
    rows = [
        {**row, "impl": "swa", "tokens_per_s": ms(97)},
        {**row, "impl": "lmm", "memory_op": "on", "tokens_per_s": ms(455)},
        {**row, "impl": "lmm", "memory_op": "off", "tokens_per_s": ms(118)},
    ]
    line = report.split_report(rows).splitlines()[-1]
    assert line.startswith("| 1 | 64 | 256 | 97 | 455 = 337 + 118 (74%) |"), line


def test_the_layer_benchmark_times_the_layer_without_its_op_in_a_column_of_its_own():
    """bench/memory.py's "memory_op: off" is the layer's rest: its gates get a zero gradient, its
    projection does not; bench/report.py memory shows it as "exact rest", not as "exact"."""
    import memory  # bench/memory.py
    import report  # bench/report.py

    small = {"dim": 16, "heads": 2, "seq": 32, "chunk": 8, "batch": 2, "depth": 1}
    for op in ("on", "off"):
        step, layer = memory.make_step({**memory.DEFAULTS, **small, "memory_op": op})
        step()
        assert layer.qkv.weight.grad.abs().sum() > 0
        assert (layer.gates.proj.weight.grad.abs().sum() > 0) == (op == "on")
    with pytest.raises(ValueError, match="titans-pytorch"):
        memory.build({**memory.DEFAULTS, **small, "impl": "titans-pytorch", "memory_op": "off"})
    row = {"seq": 1024, "mode": "fwdbwd", "chunk": 64, "depth": 1}
    rows = [{**row, "impl": "exact", "tokens_per_s": 20_000.0}, {**row, "impl": "exact", "memory_op": "off",
            "tokens_per_s": 40_000.0}, {**row, "impl": "titans-pytorch", "tokens_per_s": 32_000.0}]  # fmt: skip
    line = report.memory_report(rows).splitlines()[2]
    assert line.startswith("| 1024 | fwdbwd | 64 | 1 | 20,000 | - | - | - | 32,000 | - | - | 40,000 | 0.62x |"), line


def test_the_benchmarks_time_a_model_from_its_spec_file(tmp_path):
    """bench/models.py's `spec`: the model of a spec file (a study's trial, a preset), its own
    vocabulary for the tokens, with the memory op removable as for the benchmark's own models."""
    import models  # bench/models.py

    path = tmp_path / "spec.yaml"
    path.write_text("extends: mal-tiny\nvocab_size: 40\n")
    cfg = {**models.DEFAULTS, "impl": "mal", "spec": str(path), "batch": 2, "seq": 16}
    assert models.spec_for(cfg) == load_spec(path) and load_spec(path).block.kind == "mal"
    for op in ("on", "off"):
        step, model = models.make_step({**cfg, "memory_op": op})
        step()  # tokens beyond the vocabulary would fail in the embedding
        assert model.embedding.num_embeddings == 40
